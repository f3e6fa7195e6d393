"""Sharded extraction on a local multi-node cluster: a CPU head and two workers with one logical GPU
each (``torch.cuda`` sees none, so the shards run on CPU). Every pass is split into shards that run on
both workers, the banks assembled from them are bit-identical to one single-process extraction on CPU,
they stay in the object store (the driver gets references), and the cache they are written to is found
by the next call. Two image families of different character: field photos and greyscale scans."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from local_cluster import LocalCluster  # noqa: E402

from tune_rice.data import read_labels  # noqa: E402
from tune_rice.features import FeatureSpec, extract_bank  # noqa: E402

ray = pytest.importorskip("ray")

BATCH = 8  # small batches, so that a few dozen images make several shards per pass
SPECS = [
    FeatureSpec(backbone="resnet18", image_size=32, views=2, feature_layer=layer) for layer in ("pooled", "logits")
] + [FeatureSpec(backbone="resnet18", image_size=40, views=1)]


def test_shard_ranges_start_on_batch_boundaries_and_cover_every_image():
    from tune_rice.shards import plan_shards

    for n, align, k in [(37, 4, 4), (8, 4, 16), (1000, 32, 3), (5, 8, 2)]:
        ranges = plan_shards(n, align, k)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a % align == 0 and a < b for a, b in ranges)
        assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    assert len(plan_shards(1000, 32, 3)) == 3


def _dataset(root: Path, family: str) -> Path:
    from tune_rice.demo import generate_demo
    from tune_rice.prepare import prepare_dataset

    folder = generate_demo(root / family, per_class=4, size=48, seed=0, family=family, workers=1)
    return prepare_dataset(folder, progress=False, allow_small_classes=True, workers=1).labels_csv


DRIVER = """
import json, logging, sys
from pathlib import Path
import numpy as np
import ray
from tune_rice.data import read_labels
from tune_rice.features import FeatureSpec
from tune_rice.model import resolve_weights
from tune_rice.shards import BankRef, extract_banks_sharded

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
@pytest.mark.timeout(600)
def test_sharded_banks_are_bit_identical_spread_over_nodes_and_cached(tmp_path):
    import dataclasses
    import json
    import subprocess

    labels = {family: _dataset(tmp_path / "data", family) for family in ("field", "scans")}
    cache = tmp_path / "shared-cache"  # what every node reaches: a shared file system on a real cluster
    specs = json.dumps([dataclasses.asdict(s) for s in SPECS])
    with LocalCluster() as cluster:
        cluster.add_node(head=True, num_cpus=1, num_gpus=0)
        workers = {cluster.add_node(num_cpus=1, num_gpus=1)["node_id"] for _ in range(2)}
        for family, csv in labels.items():
            out = tmp_path / f"out-{family}"
            out.mkdir()
            proc = subprocess.run(
                [sys.executable, "-c", DRIVER, str(csv), str(cache), str(out), str(BATCH), specs],
                env={**os.environ, **cluster.client_env, "RAY_ADDRESS": cluster.address},
                capture_output=True,
                text=True,
                timeout=400,
            )
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
            assert "extraction pass 32px/standard/k2 (2 banks)" in proc.stderr and "img/s" in proc.stderr
            report = json.loads((out / "report.json").read_text())
            table = read_labels(csv)
            for spec in SPECS:
                first, again = report[f"first/{spec.name}"], report[f"again/{spec.name}"]
                assert not first["from_cache"] and again["from_cache"], spec.name  # the next call finds it
                shards = first["shards"]
                assert len(shards) >= 3 and {s["node"] for s in shards} == workers, (family, shards)
                alone = extract_bank(
                    table, spec, weights="none", use_cache=False, progress=False, device="cpu", batch_size=BATCH
                )
                assert first["bytes"] == alone.nbytes()
                for run in ("first", "again"):
                    for split in ("train", "valid"):
                        got = np.load(out / f"{run}-{spec.name}-{split}.npy")
                        assert np.array_equal(got, alone.splits[split].features), (family, run, spec.name, split)
                    assert np.array_equal(np.load(out / f"{run}-{spec.name}-mean.npy"), alone.mean)
