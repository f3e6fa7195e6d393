"""Frozen head against last-stage tuning, and what the stage bank saves per trial-epoch.

Per set (three generated families and scikit-learn's digits) and per kind of features
(timm:tf_efficientnet_lite0 with its ImageNet weights, ``tune_rice.features.timm_zoo.write_lite0_weights``, and the
same network at random init), at ``--image-size`` px:

- the pooled bank and the stage bank (the activations entering ``blocks[6]``) of train (2 views), valid
  and test, and their size per image and view;
- five trials with the same optimiser settings (``TRIAL``), each scored on test at its best valid epoch: a
  linear head on the frozen backbone; the same head with the last stage tuned, its decay towards the
  pretrained stage (``stage_decay: pretrained``) or to zero (``zero``), at the trial's weight decay and at
  0.5. Test accuracy with its Wilson interval, and the exact McNemar test of each tuned trial against the
  frozen head on the same test images;
- the seconds of one trial-epoch of last-stage tuning from the stage bank, against the same trial on the
  images (``--bank off``: decode, frozen prefix forward, stage forward and backward), and of the
  frozen head on its bank.

No Ray: the trials are ``engine.HeadRun`` and ``finetune.StageRun``, as the search's trainable runs them.

    python benchmarks/bench_finetune.py                  # all sets, both kinds of features (~8 min on 2 shared CPUs)
    python benchmarks/bench_finetune.py --sets digits --features lite0

Writes benchmarks/results/finetune.json.
"""

from __future__ import annotations

import argparse
import copy
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

from bench_probe import make_digits  # noqa: E402
from run_info import run_info  # noqa: E402

BACKBONE = "timm:tf_efficientnet_lite0"
# name: (demo family or "digits", per_class, seed): 168 and 240 images, a 70/15/15 split
SETS = {"field": ("field", 40, 2), "plain": ("plain", 40, 3), "scans": ("scans", 40, 4), "digits": ("digits", 24, 0)}
TRIAL = dict(hidden=0, dropout=0.0, optimizer="adamw", lr=3e-3, weight_decay=1e-2, batch_size=32, epochs=10)
TRIAL |= dict(views=2, aug_policy="standard", schedule="cosine", warmup_epochs=1, min_steps=60, seed=0)
STAGE = dict(tune_last_stage=True, stage_lr_fraction=0.3, stage_bn="frozen")


def make_set(name: str, work: Path, size: int) -> Path:
    from tune_rice.data.demo import generate_demo
    from tune_rice.data.prepare import prepare_dataset

    family, per_class, seed = SETS[name]
    if family == "digits":
        folder = make_digits(work / "data" / name, per_class=per_class, size=size, seed=seed)
    else:
        folder = generate_demo(
            work / "data" / name, per_class=per_class, size=size, seed=seed, family=family, workers=1
        )
    return prepare_dataset(folder, dedup_mode="exact", progress=False, workers=1).labels_csv


def best_on_valid(run) -> tuple[object, int, list[float]]:
    """Train ``run`` for its epochs; a copy of it at its best valid accuracy, that epoch, the epoch seconds."""
    best, best_acc, best_epoch, seconds = None, -1.0, 0, []
    while run.epoch < run.cfg.epochs:
        t = time.perf_counter()
        out = run.train_epoch()
        seconds.append(time.perf_counter() - t)
        from tune_rice.heads.engine import evaluate

        acc = evaluate(run.model, run.valid_batches, n_classes=run.n_classes)["acc"]
        if acc > best_acc:
            best, best_acc, best_epoch = copy.deepcopy(run.model), acc, out["epoch"]
    return best, best_epoch, seconds


def test_scores(model, split, targets) -> tuple[dict, np.ndarray]:
    from tune_rice.heads.engine import BankBatches, predict_logits
    from tune_rice.heads.probe import wilson_interval

    logits = predict_logits(model, BankBatches(split, batch_size=256, train=False))[0].numpy()
    right = int((logits.argmax(1) == targets).sum())
    return {"accuracy": right / len(targets), "interval": list(wilson_interval(right, len(targets)))}, logits


def one(name: str, features: str, work: Path, size: int, weights, *, time_images: bool) -> dict:
    from tune_rice.data.images import read_labels
    from tune_rice.features.bank import extract_banks
    from tune_rice.features.model import resolve_weights
    from tune_rice.features.stage import stage_shape
    from tune_rice.heads import stats
    from tune_rice.heads.engine import HeadRun, TrialConfig
    from tune_rice.heads.finetune import StageRun

    csv = make_set(name, work, size)
    table = read_labels(csv)
    resolved = resolve_weights(BACKBONE, str(weights) if weights else "none")
    frozen_cfg = TrialConfig(backbone=BACKBONE, image_size=size, **TRIAL)
    stage_cfg = TrialConfig(backbone=BACKBONE, image_size=size, **TRIAL, **STAGE)
    variants = {  # the stage's weight decay: towards the pretrained stage or to zero, at two strengths
        f"stage_{decay}_decay{'_wd0.5' if wd else ''}": TrialConfig(
            backbone=BACKBONE,
            image_size=size,
            **{**TRIAL, **({"weight_decay": wd} if wd else {})},
            **STAGE,
            stage_decay="zero" if decay == "zero" else "pretrained",
        )
        for wd in (None, 0.5)
        for decay in ("pretrained", "zero")
    }
    t = time.perf_counter()
    banks = extract_banks(
        table,
        [frozen_cfg.feature_spec(), stage_cfg.feature_spec()],
        weights=resolved,
        splits=("train", "valid", "test"),
        cache_dir=work / "cache",
        device="cpu",
        num_workers=1,
        progress=False,
    )
    extract_s = time.perf_counter() - t
    pooled, stage = banks[frozen_cfg.feature_spec().name], banks[stage_cfg.feature_spec().name]
    y = table.targets("test")
    row: dict = {
        "set": name,
        "features": features,
        "images": {s: len(table.split(s)) for s in ("train", "valid", "test")},
        "classes": len(table.classes),
        "extract_both_banks_s": extract_s,
        "stage_shape": list(stage_shape(BACKBONE, size)),
        "bank_bytes_per_image_view": {
            "pooled": int(pooled.splits["valid"].features[0].nbytes),
            "stage": int(stage.splits["valid"].features[0].nbytes),
        },
    }
    logits = {}
    runs = {"frozen": lambda: HeadRun(frozen_cfg, bank=pooled, device="cpu")}
    runs |= {label: (lambda cfg=cfg: StageRun(cfg, bank=stage, device="cpu")) for label, cfg in variants.items()}
    for label, start in runs.items():
        model, epoch, seconds = best_on_valid(start())
        bank = pooled if label == "frozen" else stage
        scores, logits[label] = test_scores(model, bank.splits["test"], y)
        row[label] = {**scores, "best_epoch": epoch, "epoch_s_median": float(np.median(seconds))}
    for label in variants:
        row[label]["mcnemar_vs_frozen"] = stats.mcnemar(logits[label], logits["frozen"], y)
    row["stage_epoch_from_bank_s"] = row["stage_pretrained_decay"]["epoch_s_median"]
    if time_images:  # one trial-epoch of the same stage trial on the images (the --bank off path)
        inline = StageRun(stage_cfg, table=table, weights=resolved, device="cpu", num_workers=1)
        t = time.perf_counter()
        inline.train_epoch()
        row["stage_epoch_from_images_s"] = time.perf_counter() - t
        row["speedup_bank_vs_images"] = row["stage_epoch_from_images_s"] / row["stage_epoch_from_bank_s"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--features", nargs="+", default=["lite0", "random"], choices=["lite0", "random"])
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument(
        "--time-sets", nargs="*", default=["digits"], help="sets whose trial-epoch is also timed on the images"
    )
    args = p.parse_args()
    # one thread: on a shared machine two threads per process lost ~10x to contention (measured 11:46 UTC,
    # load ~20 on 2 cores); the image path's decoding gets its own loader process
    torch.set_num_threads(1)
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        from tune_rice.features.timm_zoo import write_lite0_weights

        lite0 = write_lite0_weights(Path(tmp) / "lite0.pth")
        for features in args.features:
            for name in args.sets:
                work = Path(tmp)  # the same images for both; the banks' keys differ by weights
                label = "Lite0 ImageNet" if features == "lite0" else "random init"
                weights = lite0 if features == "lite0" else None
                r = one(name, label, work, args.image_size, weights, time_images=name in args.time_sets)
                rows.append(r)
                accuracy = {k: v["accuracy"] for k, v in r.items() if isinstance(v, dict) and "accuracy" in v}
                print(json.dumps({"set": name, "features": label, **accuracy, "s": time.perf_counter() - t0}))
    out = {
        **run_info(),
        "seconds": time.perf_counter() - t0,
        "backbone": BACKBONE,
        "image_size": args.image_size,
        "trial": TRIAL,
        "stage": STAGE,
        "rows": rows,
    }
    path = ROOT / "benchmarks" / "results" / "finetune.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
