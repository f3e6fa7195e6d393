"""Sharded extraction. Unit level (features.py, Ray-free): shards of a pass assembled in order give the
bank of one whole pass, bit for bit, on two image families of different character (field photos and
greyscale scans), and the cache plan finds what was saved. One multi-node test: a local cluster of a CPU
head and two workers with one logical GPU each (``torch.cuda`` sees none, so the shards run on CPU); the
shards run on both workers, the bank assembled from them is bit-identical to a single-process CPU
extraction, it stays in the object store (the driver gets references), and the next call finds it in
the shared cache folder."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from local_cluster import LocalCluster  # noqa: E402

from tune_rice.data.images import read_labels  # noqa: E402
from tune_rice.features.bank import (  # noqa: E402
    FeatureSpec,
    assemble_pass,
    extract_banks,
    extract_pass_shard,
    pass_key,
    plan_banks,
    shard_align,
)
from tune_rice.features.model import resolve_weights  # noqa: E402

ray = pytest.importorskip("ray")

BATCH = 8  # small batches, so that a few dozen images make several shards per pass
# one pass (pooled features and logits of one network), and a second pass at another size
SPECS = [
    FeatureSpec(backbone="resnet18", image_size=32, views=2, feature_layer=layer) for layer in ("pooled", "logits")
] + [FeatureSpec(backbone="resnet18", image_size=40, views=1)]


def test_shard_ranges_start_on_batch_boundaries_and_cover_every_image():
    from tune_rice.search.shards import plan_shards

    for n, align, k in [(37, 4, 4), (8, 4, 16), (1000, 32, 3), (5, 8, 2)]:
        ranges = plan_shards(n, align, k)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a % align == 0 and a < b for a, b in ranges)
        assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    assert len(plan_shards(1000, 32, 3)) == 3


def _dataset(root: Path, family: str) -> Path:
    from tune_rice.data.demo import generate_demo
    from tune_rice.data.prepare import prepare_dataset

    folder = generate_demo(root / family, per_class=4, size=48, seed=0, family=family, workers=1)
    return prepare_dataset(folder, progress=False, allow_small_classes=True, workers=1).labels_csv


@contextlib.contextmanager
def torch_threads(n: int):
    """CPU threads for torch: oneDNN's reductions depend on them (with 2 threads instead of 1, the scans'
    40 px train features differ in a few float16 digits), and a Ray task of 1 CPU runs with 1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("family", ["field", "scans"])
def test_shards_of_every_pass_assemble_into_the_whole_pass_bit_for_bit(tmp_path, family):
    from tune_rice.search.shards import plan_shards

    batch = 2  # so that every split of these few images makes several shards
    table = read_labels(_dataset(tmp_path, family))
    weights = {"resnet18": resolve_weights("resnet18", "none")}
    plan = plan_banks(table, SPECS, weights=weights, use_cache=False)
    assert [[s.name for s in g] for g in plan.todo.values()] == [[s.name for s in SPECS[:2]], [SPECS[2].name]]
    with torch_threads(1):
        whole = extract_banks(
            table, SPECS, weights=weights, use_cache=False, progress=False, device="cpu", batch_size=batch
        )
        for group in plan.todo.values():
            parts = {}
            for split in ("train", "valid"):
                ranges = plan_shards(len(table.split(split)), shard_align(group[0], split, batch), 3)
                assert len(ranges) >= 2, ranges
                parts[split] = [
                    extract_pass_shard(table, group, plan.resolved, split, a, b, device="cpu", batch_size=batch)
                    for a, b in ranges
                ]
            for bank in assemble_pass(table, group, plan.resolved, plan.keys, parts, 0.0, "cpu"):
                ref = whole[bank.spec.name]
                assert bank.key == ref.key
                for split in ("train", "valid"):
                    got, want = bank.splits[split], ref.splits[split]
                    assert np.array_equal(got.features, want.features), (bank.spec.name, split)
                    assert np.array_equal(got.targets, want.targets) and got.paths == want.paths
                assert np.array_equal(bank.mean, ref.mean) and np.array_equal(bank.std, ref.std)


def test_the_cache_plan_finds_saved_banks_and_plans_only_the_rest(tmp_path):
    table = read_labels(_dataset(tmp_path, "field"))
    weights = {"resnet18": resolve_weights("resnet18", "none")}
    cache = tmp_path / "shared-cache"
    plan = plan_banks(table, SPECS, weights=weights, cache_dir=cache)
    assert not plan.hits and len(plan.todo) == 2
    extract_banks(table, SPECS[:2], weights=weights, cache_dir=cache, progress=False, device="cpu", batch_size=BATCH)
    plan = plan_banks(table, SPECS, weights=weights, cache_dir=cache)
    assert set(plan.hits) == set(SPECS[:2]) and all(p.parent == cache for p in plan.hits.values())
    assert plan.todo == {pass_key(SPECS[2]): [SPECS[2]]}


DRIVER = """
import json, logging, sys
from pathlib import Path
import numpy as np
import ray
from tune_rice.data.images import read_labels
from tune_rice.features.bank import FeatureSpec
from tune_rice.features.model import resolve_weights
from tune_rice.search.shards import BankRef, extract_banks_sharded

labels, cache, out, batch = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
specs = [FeatureSpec(**s) for s in json.loads(sys.argv[5])]
logging.basicConfig(level=logging.INFO)
ray.init(address="auto", logging_level="WARNING")
table = read_labels(labels)
weights = {"resnet18": resolve_weights("resnet18", "none")}
report = {}
for run in ("first", "again"):
    banks = extract_banks_sharded(table, specs, weights=weights, cache_dir=cache, batch_size=batch)
    for spec in specs:
        ref = banks[spec.name]
        assert isinstance(ref, BankRef) and isinstance(ref.ref, ray.ObjectRef)
        report[f"{run}/{spec.name}"] = {"from_cache": ref.from_cache, "bytes": ref.nbytes(),
                                        "shards": ref.info.get("shards", [])}
        bank = ray.get(ref.ref)  # here only to compare: the search's driver never does this
        for split in ("train", "valid"):
            np.save(out / f"{run}-{spec.name}-{split}.npy", bank.splits[split].features)
        np.save(out / f"{run}-{spec.name}-mean.npy", bank.mean)
(out / "report.json").write_text(json.dumps(report))
"""


@pytest.mark.slow
def test_sharded_banks_are_bit_identical_spread_over_nodes_and_cached(tmp_path):
    """Field photos only: the two families are compared shard by shard above, without Ray."""
    import dataclasses
    import json
    import subprocess

    csv = _dataset(tmp_path / "data", "field")
    specs = SPECS[:2]  # one pass; the cluster's start dominates the cost, not the number of passes
    cache = tmp_path / "shared-cache"  # what every node reaches: a shared file system on a real cluster
    out = tmp_path / "out"
    out.mkdir()
    with LocalCluster() as cluster:
        cluster.add_node(head=True, num_cpus=1, num_gpus=0)
        workers = {n["node_id"] for n in cluster.add_nodes(2, num_cpus=1, num_gpus=1)}
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, str(csv), str(cache), str(out), str(BATCH)]
            + [json.dumps([dataclasses.asdict(s) for s in specs])],
            env={**os.environ, **cluster.client_env, "RAY_ADDRESS": cluster.address},
            capture_output=True,
            text=True,
        )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "extraction pass 32px/standard/k2 (2 banks)" in proc.stderr and "img/s" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    table = read_labels(csv)
    with torch_threads(1):  # as in the shard tasks (1 CPU each)
        alone = extract_banks(
            table, specs, weights="none", use_cache=False, progress=False, device="cpu", batch_size=BATCH
        )
    for spec in specs:
        first, again = report[f"first/{spec.name}"], report[f"again/{spec.name}"]
        assert not first["from_cache"] and again["from_cache"], spec.name  # the next call finds it
        shards = first["shards"]
        assert len(shards) >= 3 and {s["node"] for s in shards} == workers, shards
        want = alone[spec.name]
        assert first["bytes"] == want.nbytes()
        for run in ("first", "again"):
            for split in ("train", "valid"):
                got = np.load(out / f"{run}-{spec.name}-{split}.npy")
                assert np.array_equal(got, want.splits[split].features), (run, spec.name, split)
            assert np.array_equal(np.load(out / f"{run}-{spec.name}-mean.npy"), want.mean)
