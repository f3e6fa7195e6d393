"""Scale-out for real: a 2-node Ray cluster on this machine, the search CLI joining it with --address.

Each node is its own ``ray start`` (own raylet, object store and worker processes; see
``benchmarks/local_cluster.py``), and each advertises 2 GPUs (logical ones on a CPU-only machine: Ray still
assigns GPU ids to trials, and ``torch.cuda`` reports none, so trials train on the CPU). One trial slot
per node is 1 CPU and trials take 1 CPU, two at a time, so the first two are placed one on each node;
40 epochs a trial keep the head busy while the worker starts its trial process (with Tune reusing
actors, trials of a few milliseconds could otherwise all run in the head's process). The search runs in
a subprocess, exactly as a user runs it, so this test process never touches Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from local_cluster import LocalCluster  # noqa: E402

SPACE = """\
metric: valid/acc
mode: max
max_epochs: 40
params:
  backbone: resnet18
  image_size: 32
  head: pooled
  aug_policy: standard
  views: 1
  hidden: {choice: [0, 16]}
  lr: {loguniform: [1.0e-3, 1.0e-1]}
  batch_size: 16
"""

NUM_SAMPLES = 6


def scalar_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags = set()
    for events in folder.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(events)).Load():
            tags.update(v.tag for v in event.summary.value)
    return tags


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_search_spreads_over_two_nodes(separable, tmp_path):
    t0 = time.perf_counter()
    (tmp_path / "space.yaml").write_text(SPACE)
    storage = tmp_path / "shared"  # what every node can reach: an NFS mount or s3:// on a real cluster
    with LocalCluster() as cluster:
        head = cluster.add_node(head=True, num_cpus=1, num_gpus=2)
        worker = cluster.add_node(num_cpus=1, num_gpus=2)
        t_up = time.perf_counter() - t0
        # Trials on a bank finish faster than a worker process starts; with reused actors one node could
        # then run them all. The first two trials wait for each other after their first epoch (a worker
        # setup hook, tests/search_driver.py), so both nodes' workers hold a trial at the same moment.
        spec = {"dir": str(tmp_path / "hold"), "together": 2}
        (tmp_path / "hold").mkdir()
        cmd = [
            sys.executable,
            str(REPO / "tests" / "search_driver.py"),
            json.dumps(spec),
            "--address",
            cluster.address,
            "--data",
            str(separable),
            "--search-space",
            str(tmp_path / "space.yaml"),
            "--num-samples",
            str(NUM_SAMPLES),
            "--weights",
            "none",
            "--gpus-per-trial",
            "0.5",
            "--cpus-per-trial",
            "1",
            "--max-concurrent",
            "2",
            "--grace-period",
            "40",
            "--storage-path",
            str(storage),
            "--name",
            "multinode",
            "--no-report",
        ]
        proc = subprocess.run(
            cmd, env={**os.environ, **cluster.client_env}, cwd=tmp_path, capture_output=True, text=True, timeout=240
        )
        t_search = time.perf_counter() - t0 - t_up
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    print(f"cluster up {t_up:.1f}s, search {t_search:.1f}s, total {time.perf_counter() - t0:.1f}s")

    exp = storage / "multinode"
    df = pd.read_csv(exp / "results.csv", dtype={"trial_id": str, "node_id": str, "gpu_ids": str})
    probes = set(df.loc[df["kind"] == "probe", "trial_id"])  # the linear probe has rows of its own
    df = df[df["kind"] == "trial"]
    assert len(df) == NUM_SAMPLES and (df["status"] == "TERMINATED").all(), df
    print(
        "trials per node:",
        df["node_id"].map({head["node_id"]: "head", worker["node_id"]: "worker"}).value_counts().to_dict(),
    )
    # trials really ran on both nodes, each with GPU ids assigned by Ray
    assert set(df["node_id"]) == {head["node_id"], worker["node_id"]}, df[["trial_id", "node_id"]]
    assert df["gpu_ids"].notna().all() and (df["gpu_ids"].str.len() > 0).all(), df[["trial_id", "gpu_ids"]]
    assert set(df["device"]) <= {"cpu", "cuda"}
    # every trial's checkpoint and TensorBoard scalars are in the shared storage path
    for trial_id in df["trial_id"]:
        trial_dir = exp / f"trial_{trial_id}"
        assert list(trial_dir.glob("checkpoint_*/state.pt")), f"no checkpoint in {trial_dir}"
        assert {"train/loss", "valid/loss", "valid/acc"} <= scalar_tags(trial_dir), trial_dir
    # the deployed model (the best trial rebuilt from its checkpoint, or the probe when no trial beat it
    # by more than the noise on valid) was scored once on test
    test = json.loads((exp / "test_metrics.json").read_text())
    assert test["trial_id"] in set(df["trial_id"]) | probes and test["test_count"] == 9
    assert (exp / "best" / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_search_survives_a_worker_node_dying(capsys):
    """benchmarks/node_failure.py as a test: every process of the worker node (raylet and the trial's
    process with it) is SIGKILLed while a trial runs there; the trial resumes on the head from a
    checkpoint (not epoch 1) and all 4 trials finish (~40-90 s). The whole node rather than its raylet
    alone: a raylet-only kill leaves the trial's process training for seconds, so with short trials it
    could finish before the failure is noticed."""
    import node_failure

    rc = node_failure.main(["--kill", "node", "--epochs", "30", "--timeout", "240"])
    out = capsys.readouterr().out
    print(out)
    assert rc == 0, out
    assert "RESULT: PASS" in out
