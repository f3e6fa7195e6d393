"""The benchmark scripts run (tiny CPU setting): they are what BENCHMARKS.md's figures come from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_script_tiny_cpu(tmp_path):
    env = {
        **os.environ,
        "DEVICE": "cpu",
        "SAMPLES": "2",
        "PER_CLASS": "8",
        "EPOCHS": "2",
        "BACKBONE": "resnet18",
        "SIZE": "32",
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tail = proc.stdout[proc.stdout.index("== gpu_check summary ==") :]
    assert "efficiency" in tail and "search on" in tail and "search off" in tail and "speed-up" in tail
    extract = json.loads((tmp_path / "out" / "extract.json").read_text())
    assert extract["full_images_per_s"] > 0 and 0 < extract["efficiency"]
    runs = [r for m in ("on", "off") for r in json.loads((tmp_path / "out" / f"search_{m}.json").read_text())["runs"]]
    assert [r["mode"] for r in runs] == ["on", "off"]
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
