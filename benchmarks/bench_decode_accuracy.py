"""Does the sized decode change what a search learns? Valid accuracy from banks of the same photos decoded
at the size the views need (every tool's path) and at full size (the path before it).

The photos are the demo set's valid images and ``--train-images`` of its train images (in turn over the
classes) as phone photos (``benchmarks/photos.py``: cut to 4:3, upscaled, sensor noise, JPEG quality 90). For each backbone, two banks of the same photos (train with
``--views`` augmented views, valid one un-augmented view): one with ``data.decode_for`` as every tool uses
it, one with every file decoded at full size and the views cut from it. On each bank two linear probes
(C chosen on valid, as the search's baseline): one on train's un-augmented view, one on all its views (the
augmented crops are where the two decodes differ most). Reported: valid accuracy with its Wilson
interval, how many valid images the two decodes' probes label differently, and the exact McNemar test.

    python benchmarks/bench_decode_accuracy.py                      # 12 MP, Lite0 ImageNet and random init
    python benchmarks/bench_decode_accuracy.py --sizes 2mp --backbones resnet18

Writes benchmarks/results/decode_accuracy.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from photos import demo_train, describe, full_size_decode, parse_size, photo_set  # noqa: E402
from run_info import run_info  # noqa: E402

from tune_rice.data.images import read_labels  # noqa: E402
from tune_rice.features.bank import FeatureSpec, extract_bank  # noqa: E402
from tune_rice.heads.probe import fit_probe, wilson_interval  # noqa: E402
from tune_rice.heads.stats import mcnemar  # noqa: E402

LITE0 = "timm:tf_efficientnet_lite0"
BACKBONES = {"lite0": (LITE0, 224, "Lite0 ImageNet"), "resnet18": ("resnet18", 128, "random init")}


def bank_for(csv: Path, spec: FeatureSpec, weights: str, *, full_size: bool, workers: int):
    """A fresh bank (a cache folder of its own); ``full_size``: every file decoded at full size."""
    with full_size_decode(full_size), tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        bank = extract_bank(
            csv,
            spec,
            weights=weights,
            splits=("train", "valid"),
            cache_dir=cache,
            num_workers=workers,
            device=torch.device("cpu"),
            progress=False,
        )
        return bank, time.perf_counter() - t0


def probes(bank) -> dict:
    """Valid logits of the two probes of ``bank``: train's view 0, and all train views."""
    train, valid = bank.splits["train"], bank.splits["valid"]
    n, views, dim = train.features.shape
    out = {}
    for name, x, y in (
        ("view0", train.features[:, 0], train.targets),
        ("all_views", train.features.reshape(n * views, dim), np.repeat(train.targets, views)),
    ):
        result = fit_probe(
            x, y, valid.features[:, 0], valid.targets, n_classes=len(bank.classes), mean=bank.mean, std=bank.std
        )
        with torch.no_grad():
            logits = result.head(torch.as_tensor(valid.features[:, 0], dtype=torch.float32)).numpy()
        out[name] = (logits, result.C)
    return out


def accuracy(logits: np.ndarray, y: np.ndarray) -> dict:
    right = int((logits.argmax(1) == y).sum())
    lo, hi = wilson_interval(right, len(y))
    return {"acc": right / len(y), "right": right, "count": len(y), "interval": [lo, hi]}


def one(csv: Path, key: str, weights: str, views: int, workers: int) -> dict:
    backbone, size, features = BACKBONES[key]
    spec = FeatureSpec(backbone=backbone, image_size=size, policy="standard", views=views, seed=0)
    sized, sized_s = bank_for(csv, spec, weights, full_size=False, workers=workers)
    full, full_s = bank_for(csv, spec, weights, full_size=True, workers=workers)
    y = full.splits["valid"].targets
    a, b = probes(sized), probes(full)
    rows = {}
    for name in a:
        la, lb = a[name][0], b[name][0]
        rows[name] = {
            "sized": {**accuracy(la, y), "C": a[name][1]},
            "full_size": {**accuracy(lb, y), "C": b[name][1]},
            "labelled_differently": int((la.argmax(1) != lb.argmax(1)).sum()),
            "mcnemar_sized_vs_full": mcnemar(la, lb, y),
        }
    fs, ff = (
        sized.splits["valid"].features[:, 0].astype(np.float32),
        full.splits["valid"].features[:, 0].astype(np.float32),
    )
    cos = (fs * ff).sum(1) / (np.linalg.norm(fs, axis=1) * np.linalg.norm(ff, axis=1))
    return {
        "backbone": backbone,
        "image_size": size,
        "features": features,
        "views": views,
        "train_images": int(len(full.splits["train"].targets)),
        "valid_images": int(len(y)),
        "extract_seconds": {"sized": sized_s, "full_size": full_s},
        "valid_view_cosine": {"mean": float(cos.mean()), "min": float(cos.min())},
        "probes": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["12mp"], help="256, 2mp, 12mp or WxH")
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--train-images", type=int, default=200, help="train photos (valid: all of the demo's)")
    p.add_argument("--workers", type=int, default=1, help="loader processes")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_accuracy.json")
    args = p.parse_args()
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        lite0 = None
        for size in args.sizes:
            splits = ("valid", "train")  # every valid photo, then the first train photos in turn over the classes
            n_valid = int((demo_train(splits=splits)[1]["split"] == "valid").sum())
            csv = photo_set(parse_size(size), n_valid + args.train_images, splits=splits)
            if len(read_labels(csv).split("valid")) == 0:
                raise SystemExit(f"{csv}: no valid images")
            for key in args.backbones:
                weights = "none"
                if key == "lite0":
                    from tune_rice.features.timm_zoo import write_lite0_weights

                    lite0 = lite0 or write_lite0_weights(Path(tmp) / "lite0.pth")
                    weights = str(lite0)
                r = {"photos": size, **describe(csv), **one(csv, key, weights, args.views, args.workers)}
                rows.append(r)
                for name, q in r["probes"].items():
                    print(
                        f"{size} {r['backbone']} ({r['features']}) {name}: valid acc sized {q['sized']['acc']:.3f}"
                        f" vs full {q['full_size']['acc']:.3f}, {q['labelled_differently']} of {r['valid_images']}"
                        f" labelled differently, McNemar p {q['mcnemar_sized_vs_full']['p_value']:.2f}",
                        flush=True,
                    )
    out = {**run_info(), "seconds": time.perf_counter() - t0, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(args.out)


if __name__ == "__main__":
    main()
