"""Scale-out for real: a 3-node Ray cluster on this machine, the search CLI joining it with --address.

Each node is its own ``ray start`` (own raylet, object store and worker processes; see
``benchmarks/local_cluster.py``): a head with 1 CPU and no GPU, and two workers with 1 CPU and 2 GPUs each
(logical ones on a CPU-only machine: Ray still assigns GPU ids to trials, and ``torch.cuda`` reports none,
so trials train on the CPU). Trials take 1 CPU and half a GPU, so they run on the workers only, one at a
time on each. One cluster serves the module: the search over both workers first, then the test that
kills a worker (it must be last: the killed node stays dead). The searches run in subprocesses, exactly
as a user runs them, so this test process never touches Ray.
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

from conftest import search_argv  # noqa: E402
from local_cluster import LocalCluster  # noqa: E402

EPOCHS = 15
SPACE = f"""\
metric: valid/acc
mode: max
max_epochs: {EPOCHS}
params:
  backbone: resnet18
  image_size: 32
  head: pooled
  aug_policy: standard
  views: 1
  hidden: {{choice: [0, 16]}}
  lr: {{loguniform: [1.0e-3, 1.0e-1]}}
  batch_size: 16
"""

NUM_SAMPLES = 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head without GPUs, two workers with 2 logical GPUs each; their processes (the trials) on the tests'
    isolated caches."""
    base = tmp_path_factory.getbasetemp()
    env = {
        "TUNE_RICE_OFFLINE": "1",
        "TUNE_RICE_CACHE": str(base / "tune_rice_cache"),
        "TORCH_HOME": str(base / "torch"),
    }
    t0 = time.perf_counter()
    with LocalCluster(env=env) as c:
        c.add_node(head=True, num_cpus=1, num_gpus=0)
        c.add_nodes(2, num_cpus=1, num_gpus=2)
        print(f"cluster up {time.perf_counter() - t0:.1f}s")
        yield c


def scalar_tags(folder: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags = set()
    for events in folder.glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(events)).Load():
            tags.update(v.tag for v in event.summary.value)
    return tags


@pytest.mark.slow
def test_inline_trials_spread_over_both_workers(cluster, separable, tmp_path):
    """Trials that read the images (``--feature-cache off``) run on both workers. They take seconds, longer
    than a worker process takes to start, so each worker's trial process is up before the other's trial
    ends. (Trials on a bank end in about a second: Tune then hands a finished trial's process to the next
    trial, even one whose own process is still starting on another node, and they may all run on one
    node; docs/scale.md.)"""
    (tmp_path / "space.yaml").write_text(SPACE)
    storage = tmp_path / "shared"  # what every node can reach: an NFS mount or s3:// on a real cluster
    argv = search_argv(separable, tmp_path / "space.yaml", storage, "multinode")
    argv += ["--address", cluster.address, "--num-samples", NUM_SAMPLES, "--feature-cache", "off"]
    argv += ["--gpus-per-trial", 0.5, "--cpus-per-trial", 1, "--max-concurrent", 2, "--grace-period", EPOCHS]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "tune_rice.search", *map(str, argv)],
        env={**os.environ, **cluster.client_env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    print(f"search {time.perf_counter() - t0:.1f}s")

    exp = storage / "multinode"
    df = pd.read_csv(exp / "results.csv", dtype={"trial_id": str, "node_id": str, "gpu_ids": str})
    probes = set(df.loc[df["kind"] == "probe", "trial_id"])  # the linear probe has rows of its own
    df = df[df["kind"] == "trial"]
    assert len(df) == NUM_SAMPLES and (df["status"] == "TERMINATED").all(), df
    names = {n["node_id"]: n["name"] for n in cluster.nodes}
    print("trials per node:", df["node_id"].map(names).value_counts().to_dict())
    # trials ran on both workers (the head has no GPU), each with GPU ids assigned by Ray
    assert set(df["node_id"].map(names)) == {"w1", "w2"}, df[["trial_id", "node_id"]]
    assert df["gpu_ids"].notna().all() and (df["gpu_ids"].str.len() > 0).all(), df[["trial_id", "gpu_ids"]]
    assert (df["device"] == "cpu").all(), df["device"]  # logical GPUs: torch sees none
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
def test_search_survives_a_worker_node_dying(cluster, capsys):
    """benchmarks/node_failure.py as a test, on the module's cluster (last: the node stays dead): every
    process of a worker node (raylet and the trial's process with it) is SIGKILLed while a trial runs
    there; the trial resumes on the other worker from a checkpoint (not epoch 1) and all 3 trials
    finish. The whole node rather than its raylet alone: a raylet-only kill leaves the trial's process
    training for seconds, so with short trials it could finish before the failure is noticed."""
    import node_failure

    # 15 epochs: a node kill stops the trial at once, so it lands mid-trial well before its last epoch
    argv = ["--kill", "node", "--epochs", "15", "--num-samples", "3", "--timeout", "1100"]  # a hang guard only
    rc = node_failure.main(argv, cluster=cluster)
    out = capsys.readouterr().out
    print(out)
    assert rc == 0, out
    assert "RESULT: PASS" in out
