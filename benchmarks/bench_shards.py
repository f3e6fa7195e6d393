"""Sharded extraction on a local multi-node cluster: how the passes divide over 1, 2 and 4 workers, the
overhead of each shard, and the driver's memory with banks by reference against the earlier path.

Each worker is its own ``ray start`` node (see ``local_cluster.py``) with 1 CPU (``--worker-cpus``) and
1 logical GPU (on a CPU-only machine torch runs the shards on the CPU), beside a head with 1 CPU and no
GPU; a shard task takes min(2, the worker's CPUs), as the search gives it. The same passes
run with each worker count: a generated demo set, resnet18 (random init), two passes (64 px with K=2
views, and 96 px with K=1), batch 16, no cache. Per run: wall time, images/s, shards and the nodes that
ran them, the sum of the shards' own seconds (the work) and the time a shard spends outside its forward
passes (building the network, starting the loader: the per-shard overhead).

Driver memory (in the last run): the driver's peak RSS added (sampled every 20 ms) while a 150 MB bank
made by a task on a worker is handed to the trials, (a) by reference (a dict of ObjectRefs put in the
object store, as the search gives ``tune.with_parameters``), and (b) the earlier path: the bank fetched
into the driver with ``ray.get`` and put back (what ``tune.with_parameters`` did with the banks).

Ray Data against the shard tasks (``--methods tasks data``, both by default): the same passes as one
Ray Data pipeline, rows of one extraction batch each (pass, split, image range: the same batches as the
shards), ``map_batches`` of decode tasks (1 CPU each, on any node) streaming into an actor pool of one
forward actor per GPU (1 GPU, 0 CPU), then one assembly task as in the shard path. Each method runs as a
driver of its own on the same cluster (the order alternates with the worker count), saves its banks,
and the two are compared bit for bit (``banks_equal_other_method``).

This machine has 2 cores shared with other work: 4 single-CPU workers oversubscribe it, so read the
1 -> 2 step for scaling, and 4 for how the shards divide. Keep it small:

    python benchmarks/bench_shards.py [--per-class 12] [--workers 1 2 4] [--methods tasks data]
        [--worker-cpus 1] [--out benchmarks/results/shards_tasks_vs_data.json]

(``benchmarks/results/shards.json`` is the tasks-only run of ``--methods tasks``, before Ray Data was
added.)
"""

from __future__ import annotations

import argparse
import json
import logging
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
    from tune_rice.data.demo import generate_demo
    from tune_rice.data.images import read_labels
    from tune_rice.data.prepare import prepare_dataset

    folder = generate_demo(root / "demo", per_class=per_class, size=128, seed=0, workers=1)
    return read_labels(prepare_dataset(folder, progress=False, allow_small_classes=True, workers=1).labels_csv)


from tune_rice.features.bank import FeatureSpec  # noqa: E402


def pass_specs(backbone: str, sizes: list[int]) -> list[FeatureSpec]:
    """Two passes: the first size with K=2 views for a pooled and a logits bank, the second with K=1."""
    first = [
        FeatureSpec(backbone=backbone, image_size=sizes[0], views=2, feature_layer=f) for f in ("pooled", "logits")
    ]
    return first + [FeatureSpec(backbone=backbone, image_size=sizes[1], views=1)]


METHODS = ("tasks", "data")
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


def one_run(
    labels_csv: str, n_workers: int, method: str, shard_cpus: int, specs: list, batch: int, memory: bool, out: Path
) -> dict:
    """In a driver process of its own joined to the cluster (Ray reads the cluster's token settings when
    it is imported): the passes by ``method`` (``tasks``: the product's shard tasks, banks by reference;
    ``data``: the Ray Data pipeline; ``shard_cpus``: CPUs of a shard task), each bank's arrays saved under ``out`` for the comparison, and with
    ``memory`` the driver-memory comparison."""
    import numpy as np
    import ray

    from tune_rice.data.images import read_labels
    from tune_rice.search.shards import extract_banks_sharded

    table = read_labels(labels_csv)
    ray.init(address="auto", logging_level="WARNING")
    try:
        if method == "data":
            got = extract_banks_ray_data(table, specs, weights=weights(specs), batch_size=batch, gpus=n_workers)
            banks = got["banks"]
            result = {"workers": n_workers, "method": method, **{k: v for k, v in got.items() if k != "banks"}}
        else:
            t0 = time.perf_counter()
            refs = extract_banks_sharded(
                table, specs, weights=weights(specs), use_cache=False, batch_size=batch, num_cpus=shard_cpus
            )
            trial_data = ray.put({name: b.ref for name, b in refs.items()})  # what the search hands the trials
            wall = time.perf_counter() - t0
            per_pass = {id(b.info["shards"]): b.info["shards"] for b in refs.values()}  # a pass's banks share them
            unique = [s for shards in per_pass.values() for s in shards]
            result = {
                "workers": n_workers,
                "method": method,
                "shard_cpus": shard_cpus,
                "wall_s": wall,
                "shards": len(unique),
                "nodes_used": len({s["node"] for s in unique}),
                "shard_seconds_sum": sum(s["seconds"] for s in unique),
                "shard_seconds_mean": sum(s["seconds"] for s in unique) / len(unique),
                "images_per_shard_mean": sum(s["stop"] - s["start"] for s in unique) / len(unique),
                "bank_mb": sum(b.nbytes() for b in refs.values()) / 1e6,
            }
            if memory:
                result.update(driver_memory(MEMORY_BANK_MB))
            del trial_data
            banks = {name: b.get() for name, b in refs.items()}  # here only to compare the two methods
        for name, bank in banks.items():
            for split, part in bank.splits.items():
                np.save(out / f"{_file_name(name)}-{split}.npy", part.features)
        return result
    finally:
        ray.shutdown()


def _file_name(bank: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in bank)


def same_banks(a: Path, b: Path) -> bool:
    """Whether two runs saved the same bank files with the same arrays, bit for bit."""
    import numpy as np

    files = sorted(f.name for f in a.glob("*.npy"))
    if not files or files != sorted(f.name for f in b.glob("*.npy")):
        return False
    return all(np.array_equal(np.load(a / f), np.load(b / f)) for f in files)


# ------------------------------------------------------------------------- the same passes with Ray Data
def _decode(rows: dict, *, table, groups: list) -> dict:
    """Ray Data's CPU stage: one row per extraction batch (pass, split, first and last image) decoded and
    transformed exactly as a shard's loader does (``pass_dataset``, batches on the same boundaries)."""
    from torch.utils.data import default_collate

    from tune_rice.features.bank import pass_dataset

    p, split, start, stop = int(rows["pass"][0]), str(rows["split"][0]), int(rows["start"][0]), int(rows["stop"][0])
    ds = pass_dataset(table, groups[p], split)
    x, _, idx = default_collate([ds[i] for i in range(start, stop)])
    return {
        "pass": rows["pass"],
        "split": rows["split"],
        "start": rows["start"],
        "x": x.numpy()[None],
        "idx": idx.numpy()[None],
    }


class _Forward:
    """Ray Data's GPU stage (an actor per GPU): the networks of every pass, built on first use."""

    def __init__(self, groups: list, resolved: dict):
        import torch

        torch.set_num_threads(1)  # as a shard task of 1 CPU: oneDNN's reductions depend on the thread count
        self.groups, self.resolved, self.nets = groups, resolved, {}

    def __call__(self, rows: dict) -> dict:
        import numpy as np
        import ray
        import torch

        from tune_rice.devices import resolve_device
        from tune_rice.features.bank import pass_networks, run_backbones

        device = resolve_device("auto")
        p, split = int(rows["pass"][0]), str(rows["split"][0])
        if p not in self.nets:
            self.nets[p] = pass_networks(self.groups[p], self.resolved, device)
        idx = torch.from_numpy(rows["idx"][0].copy())  # Ray Data hands read-only arrays
        views = self.groups[p][0].views if split == "train" else 1
        out = run_backbones(
            self.nets[p],
            [(torch.from_numpy(rows["x"][0].copy()), None, idx)],
            n=len(idx),
            views=views,
            device=device,
            progress=False,
            first=int(idx[0]),
        )
        feats = np.empty(1, dtype=object)  # the banks of a pass differ in width: one Python object per row
        feats[0] = {f"{name}|{layer}": f for (name, layer), f in out.items()}
        node = np.array([ray.get_runtime_context().get_node_id()])
        return {"pass": rows["pass"], "split": rows["split"], "start": rows["start"], "feats": feats, "node": node}


def _assemble_data(dataset, table, groups: list, resolved: dict, keys: dict, seconds: float):
    """A task: the rows of every pass put in order and assembled as the shard path assembles its shards."""
    from tune_rice.features.bank import assemble_pass

    rows = list(dataset.iter_rows())
    nodes = len({str(r["node"]) for r in rows})  # nodes whose forward actor ran a batch
    banks = []
    for p, group in enumerate(groups):
        mine = sorted((r for r in rows if int(r["pass"]) == p), key=lambda r: (str(r["split"]), int(r["start"])))
        parts = {split: [r["feats"] for r in mine if str(r["split"]) == split] for split in ("train", "valid")}
        banks += assemble_pass(table, group, resolved, keys, parts, seconds, "cpu")
    return banks, nodes


def extract_banks_ray_data(table, specs, *, weights: dict, batch_size: int, gpus: int) -> dict:
    """The passes of ``specs`` as one Ray Data pipeline: rows of (pass, split, batch range), decoded by
    CPU tasks, forwarded by an actor pool of ``gpus`` actors with 1 GPU each; the rows then assembled
    into banks by one task (as the shard path's assembly). Returns the banks by name (in the driver:
    here only to compare them with the shard path's)."""
    import ray
    import ray.data

    from tune_rice.features.bank import plan_banks, shard_align

    plan = plan_banks(table, specs, weights=weights, use_cache=False)
    groups = list(plan.todo.values())
    items = [
        {"pass": p, "split": split, "start": a, "stop": min(a + step, len(table.split(split)))}
        for p, group in enumerate(groups)
        for split in ("train", "valid")
        for step in [shard_align(group[0], split, batch_size)]
        for a in range(0, len(table.split(split)), step)
    ]
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the benchmark prints its own lines
    context.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_decode, batch_size=1, num_cpus=1, fn_kwargs={"table": table, "groups": groups})
    ds = ds.map_batches(
        _Forward,
        batch_size=1,
        num_gpus=1,
        num_cpus=0,  # the decode tasks get the CPUs
        concurrency=gpus,
        fn_constructor_kwargs={"groups": groups, "resolved": plan.resolved},
    )
    rows = ds.select_columns(["pass", "split", "start", "feats", "node"]).materialize()  # blocks stay on the nodes
    assemble = ray.remote(num_cpus=1)(_assemble_data)
    banks, nodes = ray.get(assemble.remote(rows, table, groups, plan.resolved, plan.keys, time.perf_counter() - t0))
    wall = time.perf_counter() - t0
    return {"banks": {b.spec.name: b for b in banks}, "wall_s": wall, "batches": len(items), "nodes_used": nodes}


def weights(specs) -> dict:
    from tune_rice.features.model import resolve_weights

    return {s.backbone: resolve_weights(s.backbone, "none") for s in specs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=12, help="demo images per class (scaled by its class sizes)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        help="tasks: the product's shard tasks; data: the same passes as a Ray Data pipeline",
    )
    p.add_argument(
        "--worker-cpus",
        type=int,
        default=1,
        help="CPUs of each worker node; a shard task takes min(2, this), as the search gives it",
    )
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--sizes", type=int, nargs=2, default=[64, 96], help="image sizes of the two passes")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "shards_tasks_vs_data.json"))
    p.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("TUNE_RICE_OFFLINE", "1")
    specs = pass_specs(args.backbone, args.sizes)
    if args.child:
        labels, n, method, shard_cpus, memory, out = args.child
        result = one_run(labels, int(n), method, int(shard_cpus), specs, args.batch_size, memory == "1", Path(out))
        (Path(out) / "run.json").write_text(json.dumps(result))
        return 0

    info = run_info()  # the date, versions and the load average at the start
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        table = dataset(Path(tmp), args.per_class)
        n_train, n_valid = len(table.split("train")), len(table.split("valid"))
        for i, n in enumerate(args.workers):
            memory = i == len(args.workers) - 1 and "tasks" in args.methods
            # One cluster per worker count; each run is a driver (a Ray job) of its own, so none inherits
            # another's worker processes. The order alternates so that no method always goes first.
            order = args.methods if i % 2 == 0 else args.methods[::-1]
            with LocalCluster(object_store_mb=500 if memory else 200) as cluster:
                cluster.add_node(head=True, num_cpus=1, num_gpus=0)
                cluster.add_nodes(n, num_cpus=args.worker_cpus, num_gpus=1)
                outs = {}
                for method in order:
                    outs[method] = out = Path(tmp) / f"run{n}-{method}"
                    out.mkdir()
                    shard_cpus = str(min(2, args.worker_cpus))
                    child = [str(table.csv_path), str(n), method, shard_cpus, "1" if memory else "0", str(out)]
                    flags = ["--batch-size", str(args.batch_size), "--backbone", args.backbone, "--sizes"]
                    subprocess.run(
                        [sys.executable, __file__, *flags, *map(str, args.sizes), "--child", *child],
                        env={**os.environ, **cluster.client_env, "RAY_ADDRESS": cluster.address},
                        check=True,
                        timeout=900,
                    )
            for method in args.methods:
                run = json.loads((outs[method] / "run.json").read_text())
                run["order"] = order.index(method)
                run["images_per_s"] = 2 * (n_train + n_valid) / run["wall_s"]  # two passes over train + valid
                if len(outs) > 1:
                    run["banks_equal_other_method"] = same_banks(*outs.values())
                runs.append(run)
                label = "tasks" if method == "tasks" else "Ray Data"
                shards = (
                    f", {run['shards']} shards on {run['nodes_used']} node(s), shards "
                    f"{run['shard_seconds_mean']:.2f}s each ({run['shard_seconds_sum']:.1f}s of work)"
                    if method == "tasks"
                    else f", {run['batches']} batches, forward on {run['nodes_used']} node(s)"
                )
                same = (
                    f"; banks equal to the other method's: {run['banks_equal_other_method']}" if len(outs) > 1 else ""
                )
                print(
                    f"{n} worker(s), {label}: {run['wall_s']:.1f}s wall, {run['images_per_s']:.1f} img/s{shards}{same}",
                    flush=True,
                )
    result = {
        **info,
        "load_average_end": list(os.getloadavg()),
        "note": f"2 shared cores; workers are {args.worker_cpus}-CPU local ray nodes with 1 logical GPU each "
        "(CPU forward)"
        "; data: decode tasks of 1 CPU (on any node, the head's CPU too), forward actors of 1 GPU and 0 CPU",
        "weights": "random init",
        "backbone": args.backbone,
        "passes": [f"{args.sizes[0]}px K=2 (pooled+logits)", f"{args.sizes[1]}px K=1"],
        "per_class": args.per_class,
        "batch_size": args.batch_size,
        "worker_cpus": args.worker_cpus,
        "train_images": n_train,
        "valid_images": n_valid,
        "runs": runs,
    }
    last = next((r for r in runs if "driver_added_mb_old_path" in r), {})
    if last:
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
