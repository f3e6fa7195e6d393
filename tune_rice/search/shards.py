"""Feature banks on a cluster: every extraction pass split into shards run as Ray tasks over all the
cluster's GPUs, several passes at once, and the banks handed to trials as object references.

The work itself is ``features.py`` (Ray-free): a shard is ``extract_pass_shard`` over an index range of
one split, a bank is ``assemble_pass`` (the shards concatenated in order). Here they become tasks:

- shard tasks (1 GPU each) return their arrays into the object store of the node that ran them;
- one assembly task per pass takes the shard references, concatenates, computes the statistics, writes
  the bank to the cache folder and returns each bank as an object of its own;
- the driver holds only references and a few numbers per bank (:class:`BankRef`): no bank is ever
  copied into its memory, and each trial fetches only the bank it trains on.

Shards start at multiples of the extraction batch, so every batch holds the same images as in one
whole pass and the bank is bit-identical to a single-process extraction.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from ..data.images import LabelTable
from ..devices import loader_workers, resolve_device
from ..features.bank import (
    FeatureBank,
    FeatureSpec,
    SplitFeatures,
    assemble_pass,
    extract_pass_shard,
    load_bank,
    plan_banks,
    save_bank,
    shard_align,
)
from ..heads.cv import bank_folds
from ..heads.probe import ProbeResult, fit_probes

log = logging.getLogger(__name__)

# Shards per GPU of the cluster for a pass: more than one lets a fast GPU take another while a slow
# one finishes, and lets several passes share the GPUs.
SHARDS_PER_GPU = 2
MAX_SHARD_IMAGES = 4096  # caps the memory one shard's output holds on its node (and a retry's cost)


@dataclass
class BankRef:
    """A bank in the object store: its reference and the figures the driver reports about it."""

    name: str
    ref: ray.ObjectRef
    seconds: float
    from_cache: bool
    bytes: int
    weights: str
    info: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        return self.bytes

    def get(self) -> FeatureBank:
        return ray.get(self.ref)


def _final_view(bank: FeatureBank) -> FeatureBank:
    train = bank.splits["train"]
    # train keeps its targets and paths (the final choice pools them with valid for cross-validated
    # candidates) but no features: (N, 0, D)
    empty = SplitFeatures(train.features[:, :0], train.targets, train.paths)
    return dataclasses.replace(bank, splits={**bank.splits, "train": empty})


def final_views(banks: dict) -> dict[str, FeatureBank]:
    """For the final phase in the driver: each bank with its valid split and its train targets, without
    the train features (K views per image: most of a bank), cut down where the bank lives."""
    task = ray.remote(num_cpus=1)(_final_view)
    refs = {name: task.remote(b.ref) if isinstance(b, BankRef) else b for name, b in banks.items()}
    return {name: ray.get(r) if isinstance(r, ray.ObjectRef) else r for name, r in refs.items()}


def _probe(bank: FeatureBank, name: str, metric: str, folds) -> ProbeResult:
    return fit_probes({name: bank}, metric=metric, folds=folds)[name]


def _folds(bank: FeatureBank, group_of_path: dict[str, str], k: int, seed: int) -> np.ndarray:
    return bank_folds(bank, group_of_path, k, seed=seed)


def fit_probes_remote(
    banks: dict[str, BankRef], *, metric: str, group_of_path: dict[str, str], k: int, seed: int
) -> tuple[np.ndarray | None, dict[str, ProbeResult]]:
    """The search's baseline where the banks live: the ``k`` folds of train+valid (from the first bank;
    none when ``k`` is 0), then the linear probe of every bank, one task each; (folds, probes by name)."""
    folds = None
    if k:
        first = next(iter(banks.values()))
        folds = ray.get(ray.remote(num_cpus=1)(_folds).remote(first.ref, group_of_path, k, seed))
    task = ray.remote(num_cpus=1)(_probe)
    refs = {name: task.remote(b.ref, name, metric, folds) for name, b in banks.items()}
    return folds, {name: ray.get(r) for name, r in refs.items()}


def plan_shards(n: int, align: int, n_shards: int) -> list[tuple[int, int]]:
    """``n`` images in about ``n_shards`` index ranges whose starts are multiples of ``align``."""
    size = max(align, math.ceil(math.ceil(n / max(1, n_shards)) / align) * align)
    size = min(size, max(align, MAX_SHARD_IMAGES // align * align))
    return [(start, min(n, start + size)) for start in range(0, n, size)]


def _node() -> str:
    return ray.get_runtime_context().get_node_id()


def shard_cpus(nodes: Sequence[dict]) -> float:
    """CPUs a shard task asks for (``nodes``: ``ray.nodes()``), all of them to decode for its GPU: the
    share of one GPU in the node's CPUs, less one left to Ray's other tasks (assembly, probes, loads) on
    the node, at least 2 (or the node's all when it has fewer). On the GPU node with the smallest share:
    a task that no node can hold waits forever, and one that only larger nodes can hold leaves the smaller
    nodes' GPUs idle. A 16-core node with one GPU: 15 (14 decoding workers and the process feeding the
    GPU); 96 cores and 8 GPUs: 11 each."""
    shares = []
    for node in nodes:
        cpu, gpu = node["Resources"].get("CPU", 0.0), node["Resources"].get("GPU", 0.0)
        if node.get("Alive") and gpu >= 1 and cpu > 0:
            shares.append(max(min(2.0, cpu), float(math.floor((cpu - 1) / gpu))))
    return min(shares, default=1.0)


def _shard(table, group, resolved, split, start, stop, batch_size):
    t0 = time.perf_counter()
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    device = resolve_device("auto")
    feats = extract_pass_shard(
        table,
        group,
        resolved,
        split,
        start,
        stop,
        device=device,
        batch_size=batch_size,
        num_workers=loader_workers(device, cpus=cpus),
    )
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the process stays for the next shard (max_calls=0): free what it cached
    return feats, {
        "split": split,
        "start": start,
        "stop": stop,
        "node": _node(),
        "device": str(resolve_device("auto")),
        "seconds": time.perf_counter() - t0,
    }


def _assemble(table, group, resolved, keys, splits, shard_refs, seconds, device, cache_dir, use_cache):
    parts = {split: ray.get(refs) for split, refs in zip(splits, shard_refs)}
    banks = assemble_pass(table, group, resolved, keys, parts, seconds, device=device)
    if use_cache:
        for bank in banks:
            save_bank(bank, cache_dir / bank.key)
    return (*banks, [_summary(b) for b in banks])


def _load(path):
    bank = load_bank(path)
    return bank, [_summary(bank)]


def _summary(bank: FeatureBank) -> dict:
    return {
        "seconds": bank.seconds,
        "from_cache": bank.from_cache,
        "bytes": bank.nbytes(),
        "weights": bank.weights,
        "info": bank.info,
    }


def _submit_pass(shard_task, table: LabelTable, group, resolved, splits, batch_size: int, slots: int):
    """Every shard of one extraction pass submitted: (per split, its shards' feature refs; every shard's
    info ref)."""
    shard_refs, infos = [], []
    for split in splits:
        split_refs = []
        for start, stop in plan_shards(len(table.split(split)), shard_align(group[0], split, batch_size), slots):
            shard: Any = shard_task.remote(table, group, resolved, split, start, stop, batch_size)
            feats, info = shard  # num_returns=2: (arrays, where and how long)
            split_refs.append(feats)
            infos.append(info)
        shard_refs.append(split_refs)
    return shard_refs, infos


def _log_pass(group, shard_info: list[dict], seconds: float) -> None:
    """One line per extraction pass: its banks, images, rate, shards and nodes."""
    images = sum(i["stop"] - i["start"] for i in shard_info)
    nodes = {i["node"] for i in shard_info}
    log.info(
        "extraction pass %dpx/%s/k%d (%d bank%s): %d images in %.1fs, %.1f img/s, %d shards on %d node%s",
        group[0].image_size,
        group[0].policy,
        group[0].views,
        len(group),
        "s" * (len(group) > 1),
        images,
        seconds,
        images / max(seconds, 1e-9),
        len(shard_info),
        len(nodes),
        "s" * (len(nodes) > 1),
    )


def extract_banks_sharded(
    table: LabelTable,
    specs: Sequence[FeatureSpec],
    *,
    weights: dict,
    splits=("train", "valid"),
    cache_dir=None,
    use_cache: bool = True,
    batch_size: int = 64,
    gpus: float | None = None,
    num_cpus: float = 1.0,
) -> dict[str, BankRef]:
    """The banks of ``specs`` by name, as references: cache hits loaded by a task (the cache folder is
    one every node can read), the rest extracted in shards over the cluster's ``gpus`` (default: all).

    Logs one line per pass with its images/s; each bank's ``info["shards"]`` lists its shards with the
    node that ran each (timings.json shows them)."""
    splits = tuple(splits)
    plan = plan_banks(table, specs, weights=weights, splits=splits, cache_dir=cache_dir, use_cache=use_cache)
    gpus = float(ray.cluster_resources().get("GPU", 0.0)) if gpus is None else gpus
    slots = max(1, int(gpus)) * SHARDS_PER_GPU
    # max_calls=0: a worker runs shard after shard. Ray's default for a GPU task is a fresh process per
    # call, which pays the torch import and CUDA start for every shard (a shard's own work is seconds);
    # _shard empties the CUDA cache, so an idle worker keeps only its context.
    shard_task = ray.remote(num_gpus=1 if gpus >= 1 else 0, num_cpus=num_cpus, num_returns=2, max_calls=0)(_shard)
    load_task = ray.remote(num_cpus=1, num_returns=2)(_load)
    refs: dict[str, ray.ObjectRef] = {}
    summary_refs: dict[tuple[str, ...], ray.ObjectRef] = {}  # bank names -> their summaries, one object
    for spec, path in plan.hits.items():
        loaded: Any = load_task.remote(str(path))  # num_returns=2: (bank, summary)
        refs[spec.name], summary_refs[(spec.name,)] = loaded
    passes = []
    t0 = time.perf_counter()
    for group in plan.todo.values():  # every shard of every pass is submitted now: passes run at once
        passes.append((group, *_submit_pass(shard_task, table, group, plan.resolved, splits, batch_size, slots)))
    shards: dict[str, list[dict]] = {}
    for group, shard_refs, infos in passes:
        shard_info = ray.get(infos)  # small dicts; the arrays stay on the nodes that made them
        seconds = time.perf_counter() - t0
        assemble = ray.remote(num_cpus=1, num_returns=len(group) + 1)(_assemble)
        got: Any = assemble.remote(
            table,
            group,
            plan.resolved,
            plan.keys,
            splits,
            shard_refs,
            seconds,
            shard_info[0]["device"],
            plan.cache,
            use_cache,
        )
        names = tuple(spec.name for spec in group)
        refs.update(zip(names, got[:-1]))
        summary_refs[names] = got[-1]
        shards.update({name: shard_info for name in names})
        _log_pass(group, shard_info, seconds)
    banks = {}
    for names, summary_ref in summary_refs.items():
        for name, s in zip(names, ray.get(summary_ref)):
            info = {**s["info"], **({"shards": shards[name]} if name in shards else {})}
            banks[name] = BankRef(
                name=name,
                ref=refs[name],
                seconds=s["seconds"],
                from_cache=s["from_cache"],
                bytes=s["bytes"],
                weights=s["weights"],
                info=info,
            )
    return {spec.name: banks[spec.name] for spec in plan.specs}
