"""The data audit on planted leaks and planted label errors, per generated family and backbone.

For each family (tune_rice.data.demo --family), the demo set is drawn and prepared with ``--dedup off`` (no
pixel grouping: the audit alone must find the copies), then copies of train images are added to valid
and test, one of each kind in turn: audit.COPY_KINDS (what the threshold is calibrated on), plus
``rotate`` and ``issue`` (8% brighter, moved by 2 px, re-encoded at quality 75: the case grouping
missed), which calibration never saw. The bank's view 0 is extracted and the audit runs as in a search
(calibration on planted copies of train images, valid, then test). Scored: recall of the planted copies
(per kind), the demo's own near-copies that the split put across splits, and false alarms (valid/test
images flagged that copy nothing). Then 5% of the train+valid labels are flipped to another class and
the label audit runs (5-fold out-of-fold probe, C chosen on valid): precision and recall at the flagged
count. Costs: each audit step's seconds.

    python benchmarks/bench_audit.py --backbone resnet18 --weights none --image-size 64 \\
        [--families field plain scans] [--per-class 30] [--size 128] [--copies 21] [--out NAME]

``--weights lite0``: EfficientNet-Lite0's ImageNet weights (``timm:tf_efficientnet_lite0``, the timm_zoo
helper). Writes benchmarks/results/<NAME>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).parent))
from run_info import run_info  # noqa: E402

from tune_rice.data import (
    demo,
    prepare,  # noqa: E402
)
from tune_rice.data.images import load_image, read_labels  # noqa: E402
from tune_rice.features.bank import FeatureSpec, SplitFeatures, extract_banks  # noqa: E402
from tune_rice.features.model import resolve_weights  # noqa: E402
from tune_rice.heads import audit
from tune_rice.heads.probe import probe_bank  # noqa: E402

PLANTED_KINDS = (*audit.COPY_KINDS, "rotate", "issue")


def issue_copy(image: Image.Image) -> bytes:
    """8% brighter, moved by 2 px (edge filled black), re-encoded at quality 75."""
    im = ImageEnhance.Brightness(image.convert("RGB")).enhance(1.08)
    im = im.transform(im.size, Image.Transform.AFFINE, (1, 0, -2, 0, 1, -2), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=75)
    return buf.getvalue()


def plant_copies(root: Path, labels_csv: Path, n: int, rng) -> dict[str, dict]:
    """``n`` copies of distinct train images into valid and test (alternately), added to labels.csv."""
    frame = pd.read_csv(labels_csv)
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    planted, rows = {}, []
    for i, row in enumerate(rng.choice(len(train), size=min(n, len(train)), replace=False)):
        src = train.iloc[row]
        kind = PLANTED_KINDS[i % len(PLANTED_KINDS)]
        image = load_image(root / src["path"])
        data = issue_copy(image) if kind == "issue" else demo.copy_image(image, kind, rng)[0]
        rel = f"{src['label']}/planted_{i:03d}.jpg"
        (root / rel).write_bytes(data)
        rows.append({"path": rel, "label": src["label"], "split": ("valid", "test")[i % 2], "group": f"planted{i}"})
        planted[rel] = {"source": src["path"], "kind": kind}
    pd.concat([frame, pd.DataFrame(rows)], ignore_index=True).to_csv(labels_csv, index=False)
    return planted


def crossing_duplicates(root: Path, frame: pd.DataFrame) -> dict[str, str]:
    """The demo's own near-copies whose pair the split put across train and valid/test: {valid/test path:
    train path}."""
    split = dict(zip(frame["path"], frame["split"]))
    marker = json.loads((root / demo.MARKER).read_text())
    out = {}
    for d in marker["near_duplicates"]:
        a, b = d["path"], d["source"]
        if split.get(a) == "train" and split.get(b) in ("valid", "test"):
            out[b] = a
        elif split.get(b) == "train" and split.get(a) in ("valid", "test"):
            out[a] = b
    return out


def leakage_scores(result: audit.DataAudit, table, planted: dict, crossing: dict) -> dict:
    flagged = set(result.leaks["path"])
    kinds = {}
    for kind in PLANTED_KINDS:
        paths = [p for p, v in planted.items() if v["kind"] == kind]
        kinds[kind] = round(float(np.mean([p in flagged for p in paths])), 3) if paths else None
    queried = list(table.split("valid")["path"]) + list(table.split("test")["path"])
    clean = [p for p in queried if p not in planted and p not in crossing]
    false = [p for p in clean if p in flagged]
    return {
        "planted": len(planted),
        "planted_recall": round(float(np.mean([p in flagged for p in planted])), 3),
        "planted_recall_by_kind": kinds,
        "demo_copies_across_splits": len(crossing),
        "demo_copies_found": sum(p in flagged for p in crossing),
        "clean_images": len(clean),
        "false_alarms": len(false),
        "false_alarm_share": round(len(false) / max(1, len(clean)), 4),
        "false_alarm_examples": false[:3],
    }


def label_scores(bank, table, *, share: float, seed: int) -> dict:
    """Flip ``share`` of train+valid labels to another class; the label audit's precision and recall."""
    rng = np.random.default_rng(seed)
    k = len(bank.classes)
    splits = {}
    flipped_paths = set()
    for name in ("train", "valid"):
        sf = bank.splits[name]
        y = sf.targets.copy()
        flip = rng.random(len(y)) < share
        y[flip] = (y[flip] + rng.integers(1, k, int(flip.sum()))) % k
        flipped_paths |= {p for p, f in zip(sf.paths, flip) if f}
        splits[name] = SplitFeatures(sf.features, y, sf.paths)
    noisy = dataclasses.replace(bank, splits=splits)
    t0 = time.perf_counter()
    C = probe_bank(noisy).C
    groups = dict(zip(table.frame["path"], table.frame["group"]))
    issues, source = audit._label_issues(noisy, groups, None, C, seed)
    seconds = time.perf_counter() - t0
    found = set(issues["path"])
    hit = len(found & flipped_paths)
    return {
        "images": sum(len(s) for s in splits.values()),
        "flipped": len(flipped_paths),
        "flagged": len(found),
        "precision": round(hit / len(found), 3) if found else None,
        "recall": round(hit / len(flipped_paths), 3) if flipped_paths else None,
        "probe_C": C,
        "source": source,
        "seconds": round(seconds, 2),
    }


def run_family(family: str, args, weights, work: Path) -> dict:
    root = work / family
    demo.generate_demo(root, per_class=args.per_class, size=args.size, seed=args.seed, family=family, workers=1)
    result = prepare.prepare_dataset(root, dedup_mode="off", progress=False)
    rng = np.random.default_rng(args.seed)
    planted = plant_copies(root, result.labels_csv, args.copies, rng)
    table = read_labels(result.labels_csv)
    crossing = crossing_duplicates(root, table.frame)
    spec = FeatureSpec(backbone=args.backbone, image_size=args.image_size, views=1)
    t0 = time.perf_counter()
    bank = extract_banks(
        table, [spec], weights={args.backbone: weights}, splits=("train", "valid"), cache_dir=work / "cache"
    )[spec.name]
    extract_s = time.perf_counter() - t0
    found = audit.audit_before_trials(table, bank, weights, sources=args.sources, seed=args.seed)
    audit.audit_test(found, table, predictions=None)
    return {
        "family": family,
        "images": len(table.frame),
        "splits": table.frame["split"].value_counts().to_dict(),
        "image_size": spec.image_size,
        "calibration": found.calibration.to_dict(),
        "leakage": leakage_scores(found, table, planted, crossing),
        "labels": label_scores(bank, table, share=args.flip_share, seed=args.seed),
        "seconds": {"extract_train_valid": round(extract_s, 2), **{k: round(v, 2) for k, v in found.seconds.items()}},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--weights", default="none", help="none, lite0, imagenet or a file")
    p.add_argument("--image-size", type=int, default=0)
    p.add_argument("--families", nargs="+", default=["field", "plain", "scans"])
    p.add_argument("--per-class", type=int, default=30)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--copies", type=int, default=21)
    p.add_argument("--sources", type=int, default=audit.CALIBRATION_SOURCES)
    p.add_argument("--flip-share", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--out", default="audit")
    args = p.parse_args()
    request = args.weights
    if request == "lite0":
        from tune_rice.features.timm_zoo import lite0_weights_file

        request = str(lite0_weights_file())
    weights = resolve_weights(args.backbone, request)
    out = {**run_info(), "args": vars(args), "weights": weights.identity, "families": []}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            t0 = time.perf_counter()
            r = run_family(family, args, weights, Path(tmp))
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            out["families"].append(r)
            print(json.dumps({k: r[k] for k in ("family", "leakage", "labels", "seconds")}, indent=1), flush=True)
    path = Path(__file__).parent / "results" / f"{args.out}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
