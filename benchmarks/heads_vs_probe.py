"""Why trained heads fall short of the linear probe on the same features: heads trained through the engine
(HeadRun on a feature bank, no Ray) under one change at a time, against the probe, valid and test.

    python benchmarks/heads_vs_probe.py --out benchmarks/results/heads_vs_probe.json

Random-init resnet18 (no ImageNet weights on this machine). Writes JSON with date, versions, machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune_rice.features.bank import FeatureSpec, extract_banks  # noqa: E402
from tune_rice.heads.engine import BankBatches, HeadRun, TrialConfig, evaluate  # noqa: E402
from tune_rice.heads.probe import probe_bank  # noqa: E402

# One change at a time from the centre of the quick space as it was (8 epochs, 3 views, label smoothing).
BASE = dict(
    backbone="resnet18",
    image_size=96,
    head="pooled",
    aug_policy="standard",
    views=3,
    hidden=128,
    dropout=0.25,
    optimizer="adamw",
    lr=1e-3,
    weight_decay=1e-4,
    batch_size=32,
    label_smoothing=0.1,
    grad_clip=0.0,
    schedule="cosine",
    warmup_epochs=1,
    epochs=8,
    seed=0,
)
VARIANTS = {
    "base": {},
    "linear": {"hidden": 0},
    "view0 only": {"_view0": True},
    "no smoothing": {"label_smoothing": 0.0},
    "30 epochs": {"epochs": 30},
    "lr 1e-2": {"lr": 1e-2},
    "lr 1e-4": {"lr": 1e-4},
    "batch 8": {"batch_size": 8},
    "full batch, 100 epochs": {"batch_size": 100000, "epochs": 100, "warmup_epochs": 0, "lr": 1e-2},
    "linear, view0, 30 ep": {"hidden": 0, "_view0": True, "epochs": 30, "label_smoothing": 0.0},
    "linear, view0, 30 ep, no drop": {
        "hidden": 0,
        "_view0": True,
        "epochs": 30,
        "label_smoothing": 0.0,
        "dropout": 0.0,
    },
    "linear, 30 ep, no drop": {"hidden": 0, "epochs": 30, "label_smoothing": 0.0, "dropout": 0.0},
    "mlp, view0, 30 ep": {"_view0": True, "epochs": 30, "label_smoothing": 0.0},
    "wd 0.1": {"weight_decay": 0.1},
    "linear, 30 ep, wd 0.1": {"hidden": 0, "epochs": 30, "weight_decay": 0.1},
    "linear, 30 ep, wd 1.0, no drop": {"hidden": 0, "epochs": 30, "weight_decay": 1.0, "dropout": 0.0},
    "mlp, 30 ep, wd 0.1": {"epochs": 30, "weight_decay": 0.1},
    # L2 of the probe's strength: its chosen C (0.01 on ~900 images) is an L2 coefficient near 0.1
    "linear sgd, 20 ep, wd 0.1": {
        "hidden": 0,
        "epochs": 20,
        "optimizer": "sgd",
        "lr": 1e-2,
        "weight_decay": 0.1,
        "label_smoothing": 0.0,
        "dropout": 0.0,
    },
    "linear sgd, 20 ep, wd 0.03": {
        "hidden": 0,
        "epochs": 20,
        "optimizer": "sgd",
        "lr": 1e-2,
        "weight_decay": 0.03,
        "label_smoothing": 0.0,
        "dropout": 0.0,
    },
    "mlp sgd, 20 ep, wd 0.1": {"epochs": 20, "optimizer": "sgd", "lr": 1e-2, "weight_decay": 0.1},
    "linear adamw lr 1e-2, 20 ep, wd 1.0": {
        "hidden": 0,
        "epochs": 20,
        "lr": 1e-2,
        "weight_decay": 1.0,
        "label_smoothing": 0.0,
        "dropout": 0.0,
    },
    "mlp adamw lr 3e-3, 20 ep, wd 1.0": {"epochs": 20, "lr": 3e-3, "weight_decay": 1.0},
    "linear sgd full batch, 100 ep, wd 0.1": {
        "hidden": 0,
        "epochs": 100,
        "optimizer": "sgd",
        "lr": 0.3,
        "batch_size": 100000,
        "weight_decay": 0.1,
        "warmup_epochs": 0,
        "label_smoothing": 0.0,
        "dropout": 0.0,
    },
}


def view0_bank(bank):
    splits = {k: dataclasses.replace(s, features=s.features[:, :1]) for k, s in bank.splits.items()}
    return dataclasses.replace(bank, splits=splits)


def run_variant(bank, test, change: dict) -> dict:
    change = dict(change)
    b = view0_bank(bank) if change.pop("_view0", False) else bank
    cfg = TrialConfig.from_dict({**BASE, **change})
    run = HeadRun(cfg, bank=b, device="cpu")
    curve = []
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        m = run.step()
        te = evaluate(run.model, BankBatches(test, batch_size=512, train=False), n_classes=len(bank.classes))
        curve.append(
            {
                "epoch": m["epoch"],
                "train_acc": m["train/acc"],
                "valid_acc": m["valid/acc"],
                "valid_loss": m["valid/loss"],
                "test_acc": te["acc"],
            }
        )
    best = max(curve, key=lambda r: r["valid_acc"])
    return {
        "best_epoch": best["epoch"],
        "best_valid": best["valid_acc"],
        "test_at_best": best["test_acc"],
        "last_valid": curve[-1]["valid_acc"],
        "last_test": curve[-1]["test_acc"],
        "last_train": curve[-1]["train_acc"],
        "seconds": time.perf_counter() - t0,
        "curve": curve,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", required=True, help="labels.csv (repeatable)")
    p.add_argument("--out", default="benchmarks/results/heads_vs_probe.json")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "tune_rice_bench_banks"),
        help="feature-bank cache (kept between runs)",
    )
    p.add_argument("--variants", help="semicolon-separated subset of: " + ", ".join(VARIANTS))
    args = p.parse_args(argv)
    # One thread: small heads gain nothing from two, and on a shared busy machine two threads ran 16x slower.
    torch.set_num_threads(1)
    chosen = VARIANTS if not args.variants else {k: VARIANTS[k] for k in args.variants.split(";")}
    BASE["image_size"] = args.image_size
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": torch.get_num_threads(),
        "weights": "random init (resnet18, seed 0)",
        "base": BASE,
        "sets": {},
    }
    for csv in args.data:
        spec = FeatureSpec(backbone="resnet18", image_size=args.image_size, policy="standard", views=3)
        bank = extract_banks(
            csv,
            [spec],
            weights="none",
            splits=("train", "valid", "test"),
            cache_dir=args.cache,
            num_workers=1,
            progress=False,
        )[spec.name]
        test = bank.splits["test"]
        probe = probe_bank(bank)
        te = evaluate(probe.head, BankBatches(test, batch_size=512, train=False), n_classes=len(bank.classes))
        res = {
            "sizes": {k: len(s) for k, s in bank.splits.items()},
            "probe": {"C": probe.C, "valid": probe.valid["acc"], "test": te["acc"]},
            "variants": {},
        }
        print(
            f"{csv}: {res['sizes']} probe C={probe.C:g} valid {probe.valid['acc']:.3f} test {te['acc']:.3f}", flush=True
        )
        for name, change in chosen.items():
            r = run_variant(bank, test, change)
            res["variants"][name] = r
            print(
                f"  {name:32s} best ep {r['best_epoch']:3d} valid {r['best_valid']:.3f} test {r['test_at_best']:.3f}"
                f" | last valid {r['last_valid']:.3f} test {r['last_test']:.3f} train {r['last_train']:.3f}"
                f" ({r['seconds']:.1f}s)",
                flush=True,
            )
        out["sets"][csv] = res
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
