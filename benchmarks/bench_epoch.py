"""One head, trained twice on the demo set: on the feature bank and with the backbone inline.

Same configuration, seed and epochs; reports seconds per epoch (train + valid evaluation) and the valid
accuracy of each path. No Ray: this is the engine alone (``engine.HeadRun``).

    python benchmarks/bench_epoch.py                                  # resnet18 @ 128, 8 epochs
    python benchmarks/bench_epoch.py --backbone resnet34 --image-size 224 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_extract import demo_labels  # noqa: E402
from run_info import run_info  # noqa: E402

from tune_rice.data.images import read_labels  # noqa: E402
from tune_rice.features.bank import extract_bank  # noqa: E402
from tune_rice.heads.engine import HeadRun, TrialConfig  # noqa: E402


def train(run: HeadRun, epochs: int) -> tuple[list[float], list[dict]]:
    seconds, history = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        history.append(run.step())
        seconds.append(time.perf_counter() - t0)
    return seconds, history


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--views", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--out")
    args = p.parse_args()
    csv = demo_labels(args.per_class)
    cfg = TrialConfig(
        backbone=args.backbone,
        image_size=args.image_size,
        views=args.views,
        epochs=args.epochs,
        hidden=0,
        dropout=0.2,
        lr=3e-3,
        weight_decay=1e-5,
        batch_size=32,
        warmup_epochs=1,
    )
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        bank = extract_bank(csv, cfg.feature_spec(), weights="none", cache_dir=cache, progress=False)
        extract_s = time.perf_counter() - t0
    bank_s, bank_hist = train(HeadRun(cfg, bank=bank, device="cpu"), args.epochs)
    t0 = time.perf_counter()
    inline_run = HeadRun(cfg, table=read_labels(csv), weights="none", device="cpu")
    setup_s = time.perf_counter() - t0
    inline_s, inline_hist = train(inline_run, args.epochs)
    per_bank, per_inline = sum(bank_s) / len(bank_s), sum(inline_s) / len(inline_s)
    out = {
        **run_info(),
        "config": cfg.to_dict(),
        "extract_s": extract_s,
        "inline_setup_s": setup_s,
        "bank_epoch_s": per_bank,
        "inline_epoch_s": per_inline,
        "ratio": per_inline / per_bank,
        "bank_valid_acc": [h["valid/acc"] for h in bank_hist],
        "inline_valid_acc": [h["valid/acc"] for h in inline_hist],
    }
    print(f"{args.backbone} @ {args.image_size}px, K={args.views}, {args.epochs} epochs, linear head, same seed")
    print(
        f"  bank   : {per_bank * 1000:8.1f} ms/epoch   (extraction once: {extract_s:.1f} s)   "
        f"valid acc by epoch {' '.join(f'{a:.3f}' for a in out['bank_valid_acc'])}"
    )
    print(
        f"  inline : {per_inline * 1000:8.1f} ms/epoch   (statistics pass: {setup_s:.1f} s)   "
        f"valid acc by epoch {' '.join(f'{a:.3f}' for a in out['inline_valid_acc'])}"
    )
    print(
        f"  per-epoch speed-up: {out['ratio']:.0f}x; best valid acc bank {max(out['bank_valid_acc']):.3f}, "
        f"inline {max(out['inline_valid_acc']):.3f}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
