"""A worker node dies in the middle of a search: do its trials come back, and how fast?

Starts a real Ray cluster on this machine, a head and ``--workers`` worker nodes (``ray start`` per node,
see ``local_cluster.py``; 1 CPU = one trial slot each), runs ``python -m tune_rice.search --address ...``
in a subprocess with two trials at a time, waits until a trial on a worker has reported a few epochs
(each one checkpointed), then SIGKILLs that worker: its raylet (``--kill raylet``, the default), or every
process of the node at once (``--kill node``, as when the machine is lost). Ray Tune's
``FailureConfig(max_failures=2)`` (set in ``search.py``) must start the lost trial again on another node
from its last checkpoint, and the search must end with every trial complete and the best model scored.

Measured from the kill: the driver's "Trial task failed" line (failure noticed), Ray's "Restored ... from
checkpoint" line, and the lost trial's next reported epoch (recovered); also when the trials on other
nodes ended (with one worker, the retry needs the head's only slot). Prints a compact report; exits 1
when a check fails.

    python benchmarks/node_failure.py [--kill raylet|node] [--workers 1|2] [--epochs 50] [--keep]

Trials run with ``--bank off`` (the backbone inside every epoch) so that an epoch takes a
fraction of a second on CPU and the kill lands mid-trial. The space optimises ``valid/loss``, which keeps
improving, so each epoch writes a checkpoint and a restored trial visibly resumes at a later epoch
(``search.py`` checkpoints a trial only when its metric improves).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

from conftest import make_separable_dataset  # noqa: E402
from local_cluster import LocalCluster  # noqa: E402

SPACE = """\
# node-failure benchmark: small, and valid/loss keeps improving, so every epoch checkpoints
metric: valid/loss
mode: min
max_epochs: {epochs}
params:
  backbone: resnet18
  image_size: 32
  head: pooled
  aug_policy: standard
  views: 1
  hidden: {{choice: [0, 16]}}
  lr: {{loguniform: [1.0e-4, 1.0e-3]}}
  batch_size: 8
"""


class Lines(threading.Thread):
    """Reads the driver's output, timestamps each line on arrival, tees it to a log file."""

    def __init__(self, stream, log_path: Path):
        super().__init__(daemon=True)
        self.stream, self.log_path, self.lines = stream, log_path, []

    def run(self):
        with open(self.log_path, "w") as log:
            for line in self.stream:
                self.lines.append((time.time(), line.rstrip("\n")))
                log.write(line)
                log.flush()

    def first(self, pattern: str, after: float) -> tuple[float, str] | None:
        rx = re.compile(pattern)
        return next(((t, s) for t, s in list(self.lines) if t >= after and rx.search(s)), None)


def read_results(staging_glob: str) -> dict[str, list[dict]]:
    """trial id -> its results so far, from the driver's result.json files (one JSON object a line)."""
    out = {}
    for path in glob.glob(staging_glob):
        rows = []
        try:
            with open(path) as f:
                for line in f:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a line being written
        except OSError:
            continue
        out[Path(path).parent.name.removeprefix("trial_")] = rows
    return out


class Watch:
    """Polls the driver's result.json files; remembers when each result line was first seen."""

    def __init__(self, pattern: str):
        self.pattern, self.rows, self.seen_at = pattern, {}, {}

    def poll(self) -> dict[str, list[dict]]:
        now = time.time()
        self.rows = read_results(self.pattern)
        for tid, rows in self.rows.items():
            times = self.seen_at.setdefault(tid, [])
            times.extend([now] * (len(rows) - len(times)))
        return self.rows


def run(args, cluster: LocalCluster | None = None) -> int:
    """``cluster``: one already up (its nodes named ``head``, ``w1``...), used as it is and left running
    (the worker killed stays dead; with a head without GPUs the trials run on the workers only, and the
    lost trial's retry waits for the other worker's slot); without it, a head and ``--workers`` workers
    of 1 CPU and 2 GPUs each."""
    work = Path(tempfile.mkdtemp(prefix="node_failure_"))
    make_separable_dataset(work / "data", per_class=args.per_class, size=48)
    (work / "space.yaml").write_text(SPACE.format(epochs=args.epochs))
    env = {"TUNE_RICE_OFFLINE": "1", "TUNE_RICE_CACHE": str(work / "cache"), "TORCH_HOME": str(work / "torch")}
    name = "node-failure"
    report = {}
    failures = []
    t0 = time.time()
    own = cluster is None
    cluster = LocalCluster(env=env) if cluster is None else cluster
    proc = None
    try:
        # One trial slot per node (1 CPU; trials take 1 CPU) and two trials at once. With one worker the
        # first two trials are placed together, one on each node, so one is certainly on the worker, and
        # its retry waits for the head's slot. With two workers a slot is always free when one dies.
        if own:
            cluster.add_node(head=True, num_cpus=1, num_gpus=2)
            cluster.add_nodes(args.workers, num_cpus=1, num_gpus=2)
        head = cluster.node("head")
        workers = [n for n in cluster.nodes if n["name"] != "head"]
        names = {head["node_id"]: "head", **{w["node_id"]: w["name"] for w in workers}}
        report["cluster up"] = (
            f"{time.time() - t0:.1f}s: "
            + ", ".join(f"{n} {i[:8]}" for i, n in names.items())
            + " (1 CPU = 1 trial slot each)"
        )
        cmd = [
            sys.executable,
            "-m",
            "tune_rice.search",
            "--address",
            cluster.address,
            "--data",
            str(work / "data"),
            "--search-space",
            str(work / "space.yaml"),
            "--num-samples",
            str(args.num_samples),
            "--weights",
            "none",
            "--bank",
            "off",
            "--grace-period",
            str(args.epochs),
            "--cpus-per-trial",
            "1",
            "--gpus-per-trial",
            "0.5",
            "--max-concurrent",
            "2",
            "--storage-path",
            str(work / "runs"),
            "--name",
            name,
            "--no-report",
        ]
        t_search = time.time()
        proc = subprocess.Popen(
            cmd,
            env={**os.environ, **cluster.client_env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=work,
        )
        lines = Lines(proc.stdout, work / "driver.log")
        lines.start()
        watch = Watch(f"{head['temp_dir']}/session_*/artifacts/*/{name}/driver_artifacts/trial_*/result.json")

        def running_on(node_id: str, results) -> dict[str, int]:
            return {
                tid: len(rows)
                for tid, rows in results.items()
                if rows and rows[-1].get("node_id") == node_id and rows[-1]["training_iteration"] < args.epochs
            }

        # 1. wait for a trial on a worker with a few epochs (each improving epoch is a checkpoint), kill it
        victim, victims, others, t_kill = None, {}, {}, None
        deadline = time.time() + args.timeout
        while time.time() < deadline and proc.poll() is None and t_kill is None:
            results = watch.poll()
            for w in workers:
                running = running_on(w["node_id"], results)
                if any(n >= args.kill_after for n in running.values()):
                    t_kill = cluster.kill_node(w["name"], whole=args.kill == "node")
                    victim, victims = w, running
                    others = {
                        tid: rows[-1]["node_id"]
                        for tid, rows in results.items()
                        if tid not in running and rows and rows[-1]["training_iteration"] < args.epochs
                    }
                    break
            time.sleep(0.05)
        if t_kill is None:
            failures.append("no trial reached the kill point on a worker node")
            raise RuntimeError(failures[-1])
        report[f"killed {victim['name']} ({args.kill})"] = (
            f"{t_kill - t_search:.1f}s into the search; running there: "
            + ", ".join(f"trial {t} ({e} epochs reported)" for t, e in victims.items())
            + "; elsewhere: "
            + (", ".join(f"trial {t} on {names.get(n, n[:8])}" for t, n in others.items()) or "nothing")
        )

        # 2. watch the lost trials come back on another node
        recovered = {}
        while time.time() < deadline and proc.poll() is None and len(recovered) < len(victims):
            results = watch.poll()
            for tid, before in victims.items():
                rows = results.get(tid, [])
                # the first result from another node (a result already in flight from the dead node may
                # land after the kill; it is not a recovery)
                after = [i for i in range(before, len(rows)) if rows[i].get("node_id") != victim["node_id"]]
                if tid not in recovered and after:
                    recovered[tid] = (watch.seen_at[tid][after[0]], rows[after[0]])
            time.sleep(0.05)
        proc.wait(timeout=max(5.0, deadline - time.time()))
        lines.join(timeout=5)
        t_end = time.time()
        results = watch.poll()

        for label, pattern in (
            ("driver saw the trial fail", r"Trial task failed for trial"),
            ("GCS marked the node dead", r"has been marked dead"),
        ):
            hit = lines.first(pattern, t_kill)
            report[label] = f"+{hit[0] - t_kill:.1f}s after the kill" if hit else "not seen in the driver output"
        hit = lines.first(r"Restored on .* from checkpoint", t_kill)
        if hit:
            path = re.sub(r".*path=([^)]*)\).*", r"\1", hit[1])
            report["trial restored"] = f"+{hit[0] - t_kill:.1f}s after the kill, from {'/'.join(path.split('/')[-2:])}"
        for tid, node_id in others.items():  # when the trials elsewhere ended, freeing their slots
            rows, seen = results.get(tid, []), watch.seen_at.get(tid, [])
            if rows and rows[-1]["training_iteration"] >= args.epochs:
                report[f"trial {tid} on {names.get(node_id, '?')} ended"] = (
                    f"+{seen[-1] - t_kill:.1f}s after the kill (its slot became free)"
                )
        for tid in victims:
            if tid not in recovered:
                failures.append(f"trial {tid} never reported again after the kill")
                continue
            t_rec, first = recovered[tid]
            on = names.get(first.get("node_id"), "?")
            report[f"trial {tid} recovered"] = (
                f"+{t_rec - t_kill:.1f}s after the kill: next result is epoch {first['epoch']} "
                f"(iteration {first['training_iteration']}) on {on}"
            )
            if on in ("?", victim["name"]):
                failures.append(f"trial {tid} resumed on {on}")
            if int(first["epoch"]) <= 1:
                failures.append(f"trial {tid} restarted from scratch (epoch {first['epoch']}), not from a checkpoint")

        # 3. the search finished with every trial and a tested best model
        exp = work / "runs" / name
        report["search rc"] = f"{proc.returncode} after {t_end - t_search:.1f}s (whole run {t_end - t0:.1f}s)"
        if proc.returncode != 0:
            failures.append(f"search exited {proc.returncode}; tail: {lines.lines[-5:] if lines.lines else ''}")
        if (exp / "results.csv").is_file():
            df = pd.read_csv(exp / "results.csv", dtype={"trial_id": str, "node_id": str, "gpu_ids": str})
            if "kind" in df:  # the linear-probe baseline's rows are not trials
                df = df[df["kind"] != "probe"]
            status = df["status"].value_counts().to_dict()
            report["trials"] = (
                f"{len(df)}/{args.num_samples} in results.csv, status {status}, "
                f"epochs {sorted(df['epochs'].astype(int).tolist())}"
            )
            if len(df) != args.num_samples or status.get("TERMINATED", 0) != args.num_samples:
                failures.append(f"results.csv: {len(df)} rows, status {status}")
            if not all(df["epochs"] == args.epochs):
                failures.append("some trial did not run all its epochs")
            for tid in df["trial_id"]:
                rows = [json.loads(line) for line in open(exp / f"trial_{tid}" / "result.json")]
                where = pd.Series([names.get(r["node_id"], "?") for r in rows]).value_counts().to_dict()
                report[f"  trial {tid} epochs per node"] = str(where)
        else:
            failures.append("no results.csv")
        if (exp / "test_metrics.json").is_file():
            test = json.loads((exp / "test_metrics.json").read_text())
            report["best model on test"] = f"trial {test['trial_id']}, accuracy {test['accuracy']:.3f}"
        else:
            failures.append("no test_metrics.json")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if own:
            cluster.shutdown()
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")

    print("\nnode-failure report")
    for key, value in report.items():
        print(f"  {key}: {value}")
    print("  RESULT: " + ("PASS" if not failures else "FAIL\n    - " + "\n    - ".join(failures)))
    return 1 if failures else 0


def main(argv=None, cluster: LocalCluster | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--epochs",
        type=int,
        default=50,
        help="epochs per trial (after a raylet-only kill the trial's process trains on for a few "
        "seconds; enough epochs keep it from finishing before the failure is noticed)",
    )
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--per-class", type=int, default=12, help="images per class in the generated dataset")
    p.add_argument("--kill-after", type=int, default=3, help="kill once a worker trial has reported this many epochs")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker nodes besides the head (1: the retry waits for the head's slot; 2: one is free)",
    )
    p.add_argument(
        "--kill",
        choices=("raylet", "node"),
        default="raylet",
        help="raylet: SIGKILL the worker's raylet; node: SIGKILL every process of the worker node",
    )
    p.add_argument("--timeout", type=float, default=240, help="give up after this many seconds")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (data, runs, driver.log)")
    return run(p.parse_args(argv), cluster)


if __name__ == "__main__":
    sys.exit(main())
