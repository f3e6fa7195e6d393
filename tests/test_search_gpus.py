"""GPU scheduling without GPUs: Ray's logical GPUs (``ray.init(num_gpus=2)``) on a CPU machine.

Its own module because it needs its own local Ray. A worker setup hook records when each epoch ran, so the
test can see trials overlap in time; and a process's first epoch waits until a second process has begun one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from conftest import local_ray, make_separable_dataset, search_argv

from tune_rice.search import run as search

ray = pytest.importorskip("ray")

SPACE = """\
max_epochs: 3
params:
  backbone: resnet18
  image_size: 32
  views: 1
  lr: {loguniform: [1.0e-3, 3.0e-2]}
  hidden: {choice: [0, 32]}
"""
# How long a process's first epoch waits for a second trial process to begin an epoch: a guard against a
# scheduler that runs one trial at a time (then the test fails on the overlap), never reached otherwise.
RENDEZVOUS_S = 600.0


def _timing_hook(log: str, seconds: float):
    """Runs in every Ray worker: each epoch logs ``pid start end``. The first epoch of a process also logs its
    pid to ``log.started`` and waits (at most ``seconds``) until two processes have, so that trials which can
    run side by side do, whatever the machine's load: Tune hands a finished trial's process to the next trial
    (``reuse_actors``), and on a busy machine one process could run all four short trials before a second
    process has started."""

    def hook():
        import time
        from pathlib import Path

        from tune_rice.heads.engine import HeadRun

        step = HeadRun.step
        started = Path(log + ".started")
        waited = []

        def timed(self):
            start = time.time()
            if not waited:
                waited.append(True)
                with open(started, "a") as f:
                    f.write(f"{os.getpid()}\n")
                while len(set(started.read_text().split())) < 2 and time.time() < start + seconds:
                    time.sleep(0.05)
            out = step(self)
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {start} {time.time()}\n")
            return out

        HeadRun.step = timed

    return hook


@pytest.fixture(scope="module")
def ray_with_logical_gpus(tmp_path_factory):
    log = tmp_path_factory.mktemp("timing") / "epochs.txt"
    with local_ray(
        tmp_path_factory, num_gpus=2, runtime_env={"worker_process_setup_hook": _timing_hook(str(log), RENDEZVOUS_S)}
    ):
        yield log


def _argv(tmp_path: Path, name: str, *extra) -> list[str]:
    labels = make_separable_dataset(tmp_path / "data", per_class=12, size=32)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return search_argv(labels, space, tmp_path / "runs", name, *extra)


@pytest.mark.slow
def test_fractional_logical_gpus_run_trials_side_by_side(ray_with_logical_gpus, tmp_path):
    log = ray_with_logical_gpus
    log.unlink(missing_ok=True)
    Path(f"{log}.started").unlink(missing_ok=True)
    rc = search.main(
        _argv(
            tmp_path, "gpus", "--num-samples", 4, "--gpus-per-trial", 0.5, "--cpus-per-trial", 0.5, "--grace-period", 3
        )
    )
    assert rc == 0
    exp = tmp_path / "runs" / "gpus"
    df = pd.read_csv(exp / "results.csv", dtype={"gpu_ids": str})
    df = df[df["kind"] == "trial"]  # the linear-probe baseline's rows are not trials
    assert len(df) == 4 and set(df["status"]) == {"TERMINATED"}
    assert (df["epochs"] == 3).all()
    assert df["gpu_ids"].notna().all() and set(df["gpu_ids"]) <= {"0", "1"}  # a (logical) GPU each
    assert (df["device"] == "cpu").all()  # ... that is not there, so the trial trains on the CPU
    assert json.loads((exp / "test_metrics.json").read_text())["test_count"] == 9  # 3 of 12 images per class
    # the bank was extracted in shards (tests/test_shards.py checks them bit for bit on several nodes) and
    # the trials and the probe reached it by reference: timings.json names each shard's node
    (bank,) = json.loads((exp / "timings.json").read_text())["banks"].values()
    assert not bank["from_cache"] and len(bank["shards"]) >= 2 and all(s["node"] for s in bank["shards"])
    # the data audit read the bank's view 0 from the object store, and the test images at the end
    assert json.loads((exp / "audit.json").read_text())["checked"] == {"valid": 9, "test": 9}

    # 4 trials x 0.5 GPU on 2 GPUs and 2 CPUs: they overlap in time rather than queue
    epochs = [(int(pid), float(a), float(b)) for pid, a, b in (line.split() for line in log.read_text().splitlines())]
    assert len(epochs) == 12
    spans = {}
    for pid, a, b in epochs:
        lo, hi = spans.get(pid, (a, b))
        spans[pid] = (min(lo, a), max(hi, b))
    assert len(spans) >= 2
    overlapping = max(sum(lo <= t < hi for lo, hi in spans.values()) for t in (lo for lo, _ in spans.values()))
    assert overlapping >= 2, spans


def test_more_gpus_per_trial_than_any_node_has_is_a_user_error(ray_with_logical_gpus, tmp_path, capsys):
    rc = search.main(_argv(tmp_path, "toomany", "--gpus-per-trial", 3))
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: --gpus-per-trial 3") and "\n" not in err, err
    assert "the most on one node: 2" in err
    assert not (tmp_path / "runs" / "toomany").exists()  # nothing left behind to block a retry
