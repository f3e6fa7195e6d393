"""The backbone zoo on this machine: one member of every torchvision family, random init, same images.

For each family's smallest member at its weights' own preprocessing (crop, resize, interpolation):
  bare  = the backbone alone on the images already decoded and transformed, in memory (the ceiling);
  full  = the extraction pipeline on the same images: decode + the weights' transforms in the
          DataLoader + the backbone (``features.run_backbones``, what ``extract_banks`` runs per pass;
          building the network is timed apart, as ``build_s``);
  efficiency = full / bare; bank bytes per image and view (float16 features, float32 for a backbone
  whose features float16 cannot hold: random-init Inception V3, GoogLeNet, EfficientNet).

    python benchmarks/bench_zoo.py --out benchmarks/results/zoo_extract.json
    python benchmarks/bench_zoo.py --families ResNet ViT --per-class 4
    python benchmarks/bench_zoo.py --backbones zoo --device cuda     # zoo.yaml's six backbones instead
    python benchmarks/bench_zoo.py --device cpu --out benchmarks/results/zoo_extract_cpu.json  # BENCHMARKS 4c
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_extract import bare_rate, demo_labels, extraction_context  # noqa: E402

from tune_rice.data.images import build_transform, dataset_for_split, load_image, read_labels  # noqa: E402
from tune_rice.features import backbones  # noqa: E402
from tune_rice.features.bank import FeatureSpec, default_num_workers, resolve_device, run_backbones  # noqa: E402
from tune_rice.features.model import build_backbone  # noqa: E402


def smallest_members() -> dict[str, str]:
    """Each family's member with the fewest GFLOPs (torchvision's metadata, default weights)."""
    out: dict[str, tuple[float, str]] = {}
    for arch in backbones.architectures():
        ops = torchvision.models.get_model_weights(arch).DEFAULT.meta["_ops"]
        family = backbones.family_of(arch)
        if family not in out or ops < out[family][0]:
            out[family] = (ops, arch)
    return {f: a for f, (_, a) in sorted(out.items())}


def measure(value: str, table, *, batch_size: int, device, workers: int, repeats: int = 1) -> dict:
    spec = FeatureSpec(backbone=value, views=1, policy="none")
    pre = spec.preprocessing
    t0 = time.perf_counter()
    backbone, _ = build_backbone(value, weights="none", seed=0)
    backbone = backbone.to(device).to(memory_format=torch.channels_last)
    build_s = time.perf_counter() - t0
    tf = build_transform(pre, train=False)
    x_all = torch.stack([tf(load_image(p)) for p in table.paths("train")])  # (N, 3, S, S)
    bare_rate(backbone, x_all, batch_size, device)  # warm-up at every batch shape (cuDNN picks its kernels)
    bare = bare_rate(backbone, x_all, batch_size, device, repeats=repeats)
    ds = dataset_for_split(table, "train", tf)
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    t0 = time.perf_counter()
    feats = run_backbones({value: (backbone, ("pooled",))}, loader, n=len(ds), views=1, device=device, progress=False)[
        value, "pooled"
    ]  # (N, 1, D) float16; loader workers start included
    full = len(ds) / (time.perf_counter() - t0)
    w = backbones.parse_backbone(value).weights
    return {
        "backbone": value,
        "family": backbones.family_of(value.split(":")[0]),
        "crop": pre.crop,
        "resize": pre.resize,
        "interpolation": pre.interpolation,
        "gflops": w.meta["_ops"],
        "params_m": w.meta["num_params"] / 1e6,
        "feature_dim": int(feats.shape[-1]),
        "build_s": build_s,
        "bare_images_per_s": bare,
        "full_images_per_s": full,
        "efficiency": full / bare,
        "bank_bytes_per_image_view": int(feats[0].nbytes),
        "bank_dtype": str(feats.dtype),  # float32 where float16 cannot hold the features (features.fits_float16)
        "feature_max_abs": float(abs(feats.astype("float32")).max()),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", help="only these families (default: all)")
    p.add_argument(
        "--backbones",
        nargs="+",
        help="time these backbone values instead of each family's smallest "
        "member; 'zoo' = the backbones of search_spaces/zoo.yaml",
    )
    p.add_argument(
        "--per-class", type=int, default=6, help="demo set size (images per class); the train split's images are timed"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="timed passes of the bare forward (after a warm-up pass)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the library's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()

    device = resolve_device(args.device)
    table = read_labels(demo_labels(args.per_class))
    workers = default_num_workers() if args.workers is None else args.workers
    members = smallest_members()
    if args.families:
        members = {f: a for f, a in members.items() if f in args.families}
    if args.backbones:
        values = args.backbones
        if values == ["zoo"]:
            from tune_rice.experiment.space import load_search_space  # noqa: PLC0415 (the only use of the space module)

            values = list(dict.fromkeys(s.backbone for s in load_search_space("zoo").feature_specs()))
        members = {v: v for v in values}
    rows = []
    print(f"{len(table.split('train'))} train images, batch {args.batch_size}, {device}, random init")
    print(f"{'backbone':<20} {'px':>4} {'GFLOPs':>7} {'bare img/s':>10} {'full img/s':>10} {'eff':>5} {'B/img':>6}")
    t0 = time.perf_counter()
    for arch in members.values():
        r = measure(arch, table, batch_size=args.batch_size, device=device, workers=workers, repeats=args.repeats)
        rows.append(r)
        print(
            f"{arch:<20} {r['crop']:>4} {r['gflops']:>7.2f} {r['bare_images_per_s']:>10.1f} "
            f"{r['full_images_per_s']:>10.1f} {r['efficiency']:>5.2f} {r['bank_bytes_per_image_view']:>6}"
        )
    out = {
        **extraction_context(device),
        "loadavg_at_start": os.getloadavg()[0],
        "images": len(table.split("train")),
        "batch_size": args.batch_size,
        "workers": workers,
        "bare_repeats": args.repeats,
        "weights": "none (random init)",
        "seconds": time.perf_counter() - t0,
        "loadavg_at_end": os.getloadavg()[0],
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
