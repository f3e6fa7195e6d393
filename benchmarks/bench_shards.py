"""Sharded extraction on a local multi-node cluster: how the passes divide over 1, 2 and 4 workers, the
overhead of each shard, and the driver's memory with banks by reference against the earlier path.

Each worker is its own ``ray start`` node (see ``local_cluster.py``) with 1 CPU and 1 logical GPU (on a
CPU-only machine torch runs the shards on the CPU), beside a head with 1 CPU and no GPU. The same passes
run with each worker count: a generated demo set, resnet18 (random init), two passes (64 px with K=2
views, and 96 px with K=1), batch 16, no cache. Per run: wall time, images/s, shards and the nodes that
ran them, the sum of the shards' own seconds (the work) and the time a shard spends outside its forward
passes (building the network, starting the loader: the per-shard overhead).

Driver memory (in the last run): the driver's peak RSS added (sampled every 20 ms) while a 150 MB bank
made by a task on a worker is handed to the trials, (a) by reference (a dict of ObjectRefs put in the
object store, as the search gives ``tune.with_parameters``), and (b) the earlier path: the bank fetched
into the driver with ``ray.get`` and put back (what ``tune.with_parameters`` did with the banks).

This machine has 2 cores shared with other work: 4 single-CPU workers oversubscribe it, so read the
1 -> 2 step for scaling, and 4 for how the shards divide. Keep it small:

    python benchmarks/bench_shards.py [--per-class 12] [--workers 1 2 4] [--out benchmarks/results/shards.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from local_cluster import LocalCluster  # noqa: E402
from run_info import run_info  # noqa: E402


def rss() -> int:
    """This process's resident memory in bytes (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The process's peak resident memory between start and stop, sampled in a thread."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self.base = rss()

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def added_mb(self) -> float:
        return (self.peak - self.base) / 1e6


def dataset(root: Path, per_class: int):
    from tune_rice.data import read_labels
    from tune_rice.demo import generate_demo
    from tune_rice.prepare import prepare_dataset

    folder = generate_demo(root / "demo", per_class=per_class, size=128, seed=0, workers=1)
    return read_labels(prepare_dataset(folder, progress=False, allow_small_classes=True, workers=1).labels_csv)


from tune_rice.features import FeatureSpec  # noqa: E402

SPECS = [
    FeatureSpec(backbone="resnet18", image_size=64, views=2, feature_layer=layer) for layer in ("pooled", "logits")
] + [FeatureSpec(backbone="resnet18", image_size=96, views=1)]
MEMORY_BANK_MB = 150  # a bank big enough to see in a driver's RSS (one of 1M images x 1 view x 75 floats16)


def driver_memory(mb: int) -> dict:
    """Driver RSS added while a bank made on a worker reaches the trials, by reference and the earlier way."""
    import numpy as np
    import ray

    @ray.remote(num_gpus=1, num_cpus=1)
    def make_bank():
        return {"features": np.ones((mb * 1_000_000 // 2 // 512, 1, 512), dtype=np.float16)}

    ref = make_bank.remote()
    ray.wait([ref], fetch_local=False)
    with PeakRSS() as by_ref:
        data = ray.put({"bank": ref})  # what the search hands tune.with_parameters now
    with PeakRSS() as old:
        bank = ray.get(ref)  # the earlier path: the bank into the driver ...
        data_old = ray.put({"bank": bank})  # ... and back into the object store by tune.with_parameters
    del data, data_old, bank
    return {
        "memory_bank_mb": mb,
        "driver_added_mb_by_reference": by_ref.added_mb,
        "driver_added_mb_old_path": old.added_mb,
    }


def one_run(labels_csv: str, n_workers: int, batch: int, memory: bool) -> dict:
    """In a driver process of its own joined to the cluster (Ray reads the cluster's token settings when
    it is imported): the passes, by reference, and with ``memory`` the driver-memory comparison."""
    import ray

    from tune_rice.data import read_labels
    from tune_rice.shards import extract_banks_sharded

    table = read_labels(labels_csv)
    ray.init(address="auto", logging_level="WARNING")
    try:
        t0 = time.perf_counter()
        banks = extract_banks_sharded(table, SPECS, weights=weights(), use_cache=False, batch_size=batch)
        trial_data = ray.put({name: b.ref for name, b in banks.items()})  # what the search hands the trials
        wall = time.perf_counter() - t0
        per_pass = {id(b.info["shards"]): b.info["shards"] for b in banks.values()}  # a pass's banks share them
        unique = [s for shards in per_pass.values() for s in shards]
        out = {
            "workers": n_workers,
            "wall_s": wall,
            "shards": len(unique),
            "nodes_used": len({s["node"] for s in unique}),
            "shard_seconds_sum": sum(s["seconds"] for s in unique),
            "shard_seconds_mean": sum(s["seconds"] for s in unique) / len(unique),
            "images_per_shard_mean": sum(s["stop"] - s["start"] for s in unique) / len(unique),
            "bank_mb": sum(b.nbytes() for b in banks.values()) / 1e6,
        }
        if memory:
            out.update(driver_memory(MEMORY_BANK_MB))
        del trial_data
        return out
    finally:
        ray.shutdown()


def weights():
    from tune_rice.model import resolve_weights

    return {"resnet18": resolve_weights("resnet18", "none")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=12, help="demo images per class (scaled by its class sizes)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "shards.json"))
    p.add_argument("--child", nargs=4, metavar=("LABELS", "WORKERS", "MEMORY", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("TUNE_RICE_OFFLINE", "1")
    if args.child:
        labels, n, memory, out = args.child
        Path(out).write_text(json.dumps(one_run(labels, int(n), args.batch_size, memory == "1")))
        return 0

    info = run_info()  # the date, versions and the load average at the start
    with tempfile.TemporaryDirectory() as tmp:
        table = dataset(Path(tmp), args.per_class)
        n_train, n_valid = len(table.split("train")), len(table.split("valid"))
        runs = []
        for i, n in enumerate(args.workers):
            memory = i == len(args.workers) - 1
            with LocalCluster(object_store_mb=500 if memory else 100) as cluster:
                cluster.add_node(head=True, num_cpus=1, num_gpus=0)
                for _ in range(n):
                    cluster.add_node(num_cpus=1, num_gpus=1)
                child_out = Path(tmp) / f"run{n}.json"
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--batch-size",
                        str(args.batch_size),
                        "--child",
                        str(table.csv_path),
                        str(n),
                        "1" if memory else "0",
                        str(child_out),
                    ],
                    env={**os.environ, **cluster.client_env, "RAY_ADDRESS": cluster.address},
                    check=True,
                    timeout=900,
                )
            run = json.loads(child_out.read_text())
            run["images_per_s"] = 2 * (n_train + n_valid) / run["wall_s"]  # two passes over train + valid
            runs.append(run)
            print(
                f"{n} worker(s): {run['wall_s']:.1f}s wall, {run['shards']} shards on {run['nodes_used']} node(s),"
                f" shards {run['shard_seconds_mean']:.2f}s each ({run['shard_seconds_sum']:.1f}s of work)",
                flush=True,
            )
    result = {
        **info,
        "load_average_end": list(os.getloadavg()),
        "note": "2 shared cores; workers are 1-CPU local ray nodes with 1 logical GPU each (CPU forward)",
        "weights": "random init",
        "backbone": "resnet18",
        "passes": ["64px K=2 (pooled+logits)", "96px K=1"],
        "per_class": args.per_class,
        "batch_size": args.batch_size,
        "train_images": n_train,
        "valid_images": n_valid,
        "runs": runs,
    }
    last = runs[-1]
    if "driver_added_mb_old_path" in last:
        print(
            f"driver memory added for a {last['memory_bank_mb']} MB bank: by reference "
            f"{last['driver_added_mb_by_reference']:.1f} MB, earlier path {last['driver_added_mb_old_path']:.1f} MB"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
