"""Extraction efficiency: the full feature-bank pipeline vs a bare backbone forward, in one run.

full  = decode JPEG files + transforms + backbone, through ``features.extract_bank`` (no cache);
bare  = the same backbone, batch size and precision on tensors already in memory (the ceiling).
efficiency = full images/s / bare images/s. Also: how extraction time and bank size grow with the
dataset size and with K (views per training image).

    python benchmarks/bench_extract.py                      # resnet34 @ 224, the default space's setting
    python benchmarks/bench_extract.py --backbone resnet18 --image-size 128 --scaling
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tune_rice.data import build_transform, load_image, read_labels  # noqa: E402
from tune_rice.devices import resolve_device  # noqa: E402
from tune_rice.features import FeatureSpec, _autocast, extract_bank, extract_banks  # noqa: E402
from tune_rice.model import build_backbone  # noqa: E402


def demo_labels(per_class: int, size: int = 256, seed: int = 0) -> Path:
    from tune_rice.demo import ensure_demo

    folder = ensure_demo(per_class=per_class, size=size, seed=seed)
    csv = folder / "labels.csv"
    if not csv.is_file():  # prepared here only when missing (a folder prepared elsewhere may be copied in)
        from tune_rice.prepare import prepare_dataset

        prepare_dataset(folder, seed=seed, progress=False)
    return csv


@torch.inference_mode()
def bare_rate(backbone, x_all: torch.Tensor, batch_size: int, device, repeats: int = 1) -> float:
    """Images/s of the backbone alone on preloaded tensors (same batch, memory format, precision)."""
    x_all = x_all.to(device).contiguous(memory_format=torch.channels_last)
    with _autocast(device):
        backbone(x_all[:batch_size])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    for _ in range(repeats):
        for i in range(0, len(x_all), batch_size):
            with _autocast(device):
                backbone(x_all[i : i + batch_size])
            n += len(x_all[i : i + batch_size])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def extraction_context(device: torch.device) -> dict:
    """When and on what an extraction benchmark ran: the fields its JSON starts with."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def full_rate(csv, spec, *, batch_size, device, workers, splits=("train",)) -> tuple[float, object]:
    with tempfile.TemporaryDirectory() as cache:
        # warm-up: the first DataLoader start and the first forward pay one-off costs
        t0 = time.perf_counter()
        bank = extract_bank(
            csv,
            spec,
            weights="none",
            splits=("train",) if "train" in splits else splits,
            cache_dir=cache,
            device=device,
            batch_size=batch_size,
            num_workers=workers,
            progress=False,
            use_cache=False,
        )
        seconds = time.perf_counter() - t0
    n_views = sum(len(s) * s.features.shape[1] for s in bank.splits.values())
    return n_views / seconds, bank


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet34")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--per-class", type=int, default=200, help="demo set size (images per class)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the library's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--scaling", action="store_true", help="also time 2-3 dataset sizes and K = 1, 2, 4")
    p.add_argument(
        "--together",
        action="store_true",
        help="also time 4 banks (resnet18, resnet34 x pooled, logits; K=2) extracted together "
        "vs one at a time, as wide.yaml needs them",
    )
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()

    device = resolve_device(args.device)
    csv = demo_labels(args.per_class)
    table = read_labels(csv)
    spec = FeatureSpec(backbone=args.backbone, image_size=args.image_size, views=1, policy="standard")
    backbone, _ = build_backbone(args.backbone, weights="none", seed=0)
    backbone = backbone.to(device).to(memory_format=torch.channels_last)

    # Same images, preloaded as tensors for the ceiling.
    tf = build_transform(args.image_size, train=False)
    paths = table.paths("train")
    x_all = torch.stack([tf(load_image(p)) for p in paths])
    bare = bare_rate(backbone, x_all, args.batch_size, device)
    full, bank = full_rate(csv, spec, batch_size=args.batch_size, device=device, workers=args.workers)
    out = {
        **extraction_context(device),
        "backbone": args.backbone,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "images": len(paths),
        "bare_images_per_s": bare,
        "full_images_per_s": full,
        "efficiency": full / bare,
    }
    print(f"{args.backbone} @ {args.image_size}px, batch {args.batch_size}, {device}, {len(paths)} train images")
    print(f"  bare backbone on preloaded tensors : {bare:8.1f} img/s")
    print(f"  full extraction (decode+tf+model)  : {full:8.1f} img/s")
    print(f"  efficiency                         : {full / bare:8.2f}")

    if args.scaling:
        rows = []
        for per_class in (50, 100, args.per_class):
            c = demo_labels(per_class)
            for k in (1, 2, 4):
                s = FeatureSpec(backbone=args.backbone, image_size=args.image_size, views=k, policy="standard")
                t0 = time.perf_counter()
                with tempfile.TemporaryDirectory() as cache:
                    b = extract_bank(
                        c,
                        s,
                        weights="none",
                        cache_dir=cache,
                        device=device,
                        batch_size=args.batch_size,
                        num_workers=args.workers,
                        progress=False,
                    )
                rows.append(
                    {
                        "per_class": per_class,
                        "train_images": len(b.splits["train"]),
                        "valid_images": len(b.splits["valid"]),
                        "views": k,
                        "seconds": time.perf_counter() - t0,
                        "bank_mb": b.nbytes() / 1e6,
                    }
                )
        out["scaling"] = rows
        print("\n  per_class  train  valid  K  seconds  bank MB")
        for r in rows:
            print(
                f"  {r['per_class']:9d} {r['train_images']:6d} {r['valid_images']:6d} {r['views']:2d} "
                f"{r['seconds']:8.1f} {r['bank_mb']:8.2f}"
            )
    if args.together:
        specs = [
            FeatureSpec(backbone=b, image_size=args.image_size, views=2, feature_layer=layer, policy="standard")
            for b in ("resnet18", "resnet34")
            for layer in ("pooled", "logits")
        ]
        quick = dict(
            weights="none",
            device=device,
            batch_size=args.batch_size,
            num_workers=args.workers,
            progress=False,
            use_cache=False,
        )
        t0 = time.perf_counter()
        alone = {s.name: extract_bank(csv, s, **quick) for s in specs}
        t_alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        together = extract_banks(csv, specs, **quick)
        t_together = time.perf_counter() - t0
        same = all(
            np.array_equal(alone[n].splits[k].features, together[n].splits[k].features)
            for n in alone
            for k in alone[n].splits
        )
        out["together"] = {
            "banks": [s.name for s in specs],
            "seconds_one_at_a_time": t_alone,
            "seconds_together": t_together,
            "speedup": t_alone / t_together,
            "identical": same,
        }
        print(f"\n  4 banks one at a time : {t_alone:6.1f} s")
        print(f"  4 banks together      : {t_together:6.1f} s  ({t_alone / t_together:.2f}x, identical: {same})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
