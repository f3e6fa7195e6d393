"""The benchmark scripts run (tiny CPU setting): they are what BENCHMARKS.md's figures come from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a search and two extractions: minutes on 2 cores loaded 6-fold
def test_gpu_check_script_tiny_cpu(tmp_path):
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "SAMPLES": "2",
        "PER_CLASS": "8",
        "EPOCHS": "2",
        "BACKBONE": "resnet18",
        "SIZE": "32",
        "PHOTOS": "256 320x240",
        "PHOTO_IMAGES": "8",
        "PHOTO_DISTINCT": "4",
        "MODES": "on",  # the off search is the same loop with --modes off; tests/test_search.py runs --bank off
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
    }
    # No wall-clock limit of its own (pytest-timeout's ends a hung run); its own process group, so that a
    # test ended early leaves no search running behind it.
    proc = subprocess.Popen(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    tail = stdout[stdout.index("== gpu_check summary ==") :]
    assert "efficiency" in tail and "search on" in tail and "search off" not in tail
    extract = json.loads((tmp_path / "out" / "extract.json").read_text())
    assert extract["full_images_per_s"] > 0 and 0 < extract["efficiency"]
    photos = json.loads((tmp_path / "out" / "photos.json").read_text())
    assert [r["size"] for r in photos["rows"]] == ["256", "320x240"] and "| 320x240 | 0.08 |" in tail
    assert all(r["pipeline"]["pass_images_per_s"] > 0 and r["gpu_decode"]["measured"] is False for r in photos["rows"])
    runs = json.loads((tmp_path / "out" / "search_on.json").read_text())["runs"]
    assert [r["mode"] for r in runs] == ["on"] and not (tmp_path / "out" / "search_off.json").exists()
    assert all(r["trials"] == 2 and 0 <= r["test_acc"] <= 1 for r in runs)


def test_procmem_measures_a_child_tree(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from procmem import run_measured

    code = (
        "import subprocess, sys, time; b = bytearray(60 * 2**20); subprocess.run([sys.executable, '-c', "
        "'x = bytearray(40 * 2**20); import time; time.sleep(1.5)']); time.sleep(0.5)"
    )
    m = run_measured([sys.executable, "-c", code])
    assert m["rc"] == 0
    assert m["peak_pss_mb"] > 90  # parent 60 MB + child 40 MB, both counted
