"""Peak memory of a process tree, read from /proc (Linux), without extra dependencies.

PSS (proportional set size) splits shared pages among the processes that map them, so the sum over a
tree counts Ray's shared object store once instead of once per worker that maps it.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree(pid: int) -> list[int]:
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def pss_mb(pid: int) -> float:
    """Sum of PSS over ``pid`` and all its descendants, in MB."""
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


class Sampler:
    """Calls ``sample()`` every ``interval`` seconds on a background thread, inside a ``with`` block."""

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class PeakSampler(Sampler):
    """Samples the PSS of a process tree every ``interval`` seconds; ``peak_mb`` is the maximum seen."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(interval)
        self.pid, self.peak_mb = pid, 0.0

    def sample(self) -> None:
        self.peak_mb = max(self.peak_mb, pss_mb(self.pid))


def run_measured(cmd: list[str], *, env: dict | None = None, log_path: Path | None = None) -> dict:
    """Run ``cmd``; return its exit code, wall seconds and peak PSS of its whole process tree."""
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    with PeakSampler(proc.pid) as sampler:
        rc = proc.wait()
    seconds = time.perf_counter() - t0
    if log_path:
        out.close()
    return {"rc": rc, "seconds": seconds, "peak_pss_mb": sampler.peak_mb}
