"""A ``python -m tune_rice.search`` child process for the benchmarks: this checkout's code, a feature cache
of the benchmark's own, the output in a log file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def search_env(work: Path, **extra: str) -> dict[str, str]:
    """The child's environment: this checkout first on PYTHONPATH, the feature cache under ``work``."""
    return {
        **os.environ,
        "TUNE_RICE_CACHE": str(work / "cache"),
        **extra,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def search_command(data: str | Path, space: str | Path, work: Path, name: str, *options) -> list[str]:
    """The search of ``data`` over ``space`` into ``work/runs/<name>``, without the report; ``options``
    are further command-line arguments."""
    return [
        sys.executable,
        "-m",
        "tune_rice.search",
        "--data",
        str(data),
        "--search-space",
        str(space),
        "--storage-path",
        str(work / "runs"),
        "--name",
        name,
        "--no-report",
        *map(str, options),
    ]


def check_rc(rc: int, log: Path, what: str) -> None:
    """Exit with the log's tail when the child failed."""
    if rc != 0:
        print(log.read_text()[-3000:])
        raise SystemExit(f"{what} failed (rc {rc}), log: {log}")


def run_logged(cmd: list[str], env: dict[str, str], log: Path, what: str) -> float:
    """Run ``cmd`` with its output in ``log`` (exits when it fails, see :func:`check_rc`); returns seconds."""
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    check_rc(rc, log, what)
    return time.perf_counter() - t
