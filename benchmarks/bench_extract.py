"""Extraction efficiency: the full feature-bank pipeline vs a bare backbone forward, in one run.

full  = decode JPEG files + transforms + backbone, through ``features.extract_bank`` (no cache);
bare  = the same backbone, batch size and precision on tensors already in memory (the ceiling).
efficiency = full images/s / bare images/s. Also: how extraction time and bank size grow with the
dataset size and with K (views per training image).

    python benchmarks/bench_extract.py                      # resnet34 @ 224, the default space's setting
    python benchmarks/bench_extract.py --backbone resnet18 --image-size 128 --scaling

``--photos 256 2mp 12mp``: the same at photo sizes (benchmarks/photos.py makes the JPEGs once, into a
cache folder), K views per image as a training pass extracts them: per size the phases one image costs
in one process (decode, transforms, copy to the device with normalisation, forward), the whole pipeline's
steady-state images/s (from its second batch on: worker start and the first fill not counted) against the
bare forward, the same pipeline on full-size decodes (today's pixels before the sized decode), the wall time of a fresh
``extract_bank`` over ``--wall-images`` photos both ways, and how far pooled features move (cosine, sized
against full-size decode, on the same photos). ``--gpu-decode`` (CUDA only) also times batched JPEG
decoding on the GPU (``torchvision.io.decode_jpeg(device="cuda")``) against the CPU's draft decode.

    python benchmarks/bench_extract.py --backbone resnet18 --image-size 128 --photos 256 2mp 12mp --views 3
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

from photos import full_size_decode  # noqa: E402

from tune_rice.data import images as data  # noqa: E402
from tune_rice.data.images import FULL_DECODE, ImageDataset, build_transform, load_image, read_labels, to_model_input  # noqa: E402
from tune_rice.devices import loader_workers, resolve_device  # noqa: E402
from tune_rice.features.bank import (  # noqa: E402
    FeatureSpec,
    _autocast,
    extract_bank,
    extract_banks,
    pass_dataset,
    pass_loader,
    pass_networks,
    run_backbones,
)
from tune_rice.features.model import build_backbone, resolve_weights  # noqa: E402


def demo_labels(per_class: int, size: int = 256, seed: int = 0) -> Path:
    from tune_rice.data.demo import ensure_demo

    folder = ensure_demo(per_class=per_class, size=size, seed=seed)
    csv = folder / "labels.csv"
    if not csv.is_file():  # prepared here only when missing (a folder prepared elsewhere may be copied in)
        from tune_rice.data.prepare import prepare_dataset

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


# ------------------------------------------------------------------------------------------ photo sizes
class FirstBatchClock:
    """A loader that notes when the first batch was done with (the next one asked for): steady state is
    the rest of the pass, every later batch's decode and forward, worker start and the first fill not."""

    def __init__(self, loader):
        self.loader, self.first_at, self.first_images = loader, None, 0

    def __iter__(self):
        for batch in self.loader:
            yield batch
            if self.first_at is None:
                self.first_at, self.first_images = time.perf_counter(), len(batch[2])


def timed_pass(ds, spec, *, device, batch_size: int, workers: int) -> dict:
    """One extraction pass over ``ds`` (as extract_pass_shard runs it): whole-pass and steady-state img/s."""
    resolved = {spec: resolve_weights(spec.backbone, "none", seed=spec.seed)}
    nets = pass_networks([spec], resolved, device)
    loader = FirstBatchClock(pass_loader(ds, device, batch_size=max(1, batch_size // ds.views), num_workers=workers))
    t0 = time.perf_counter()
    run_backbones(
        nets, loader, n=len(ds), views=ds.views, device=device, progress=False, preprocessing=spec.preprocessing
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    steady = (len(ds) - loader.first_images) / max(end - loader.first_at, 1e-9)
    return {"seconds": end - t0, "pass_images_per_s": len(ds) / (end - t0), "steady_images_per_s": steady}


def full_size_dataset(table, spec) -> ImageDataset:
    """The training pass as it was before the sized decode: every JPEG decoded at full size, the views cut
    from it and normalised on the CPU."""
    pre = spec.preprocessing
    return ImageDataset(
        table.paths("train"),
        table.targets("train"),
        build_transform(pre, train=True, policy=spec.policy),
        views=spec.views,
        first_transform=build_transform(pre, train=False),
        decode=FULL_DECODE,
        seed=spec.seed,
    )


def mean_ms(fn, items, warmup: int = 2) -> tuple[float, float]:
    """Wall and CPU milliseconds (this process, all its threads) per call of ``fn`` over ``items``: the
    CPU figure is what the work costs whatever else loads the machine."""
    for item in items[:warmup]:
        fn(item)
    t0, c0 = time.perf_counter(), time.process_time()
    for item in items:
        fn(item)
    return 1000 * (time.perf_counter() - t0) / len(items), 1000 * (time.process_time() - c0) / len(items)


def phases(table, spec, *, device, bare: tuple[float, float], batch_size: int, n: int) -> dict:
    """What one image costs, phase by phase, in one process: wall ms per image (K views) and CPU ms
    (``*_cpu_ms``). ``bare``: the bare forward's views/s and CPU seconds per view."""
    ds = pass_dataset(table, [spec], "train")
    old = full_size_dataset(table, spec)
    paths = table.paths("train")[:n]
    n = len(paths)
    images = [ds.decode.open(p) for p in paths]
    full = [FULL_DECODE.open(p) for p in paths]
    items = list(range(len(paths)))
    per_batch = max(1, batch_size // spec.views)
    x = torch.stack([ds._transform(images[i % n], i % n)[0] for i in range(per_batch)])  # (B, K, 3, S, S)
    if device.type == "cuda":
        x = x.pin_memory()

    def copy(_):
        to_model_input(x, device, spec.preprocessing).flatten(0, 1).contiguous(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.cuda.synchronize()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker: idle intra-op threads would count as CPU time
    timed = {
        "decode": mean_ms(lambda i: ds.decode.open(paths[i]), items),
        "transforms": mean_ms(lambda i: ds._transform(images[i], i), items),
        "copy": tuple(v / per_batch for v in mean_ms(copy, items[: max(3, len(items) // 4)])),
        "forward": (1000 * spec.views / bare[0], 1000 * spec.views * bare[1]),
        "full_size_decode": mean_ms(lambda i: FULL_DECODE.open(paths[i]), items),
        "full_size_transforms": mean_ms(lambda i: old._transform(full[i], i), items),
    }
    torch.set_num_threads(threads)
    out = {f"{k}_ms": v[0] for k, v in timed.items()}
    out.update({f"{k}_cpu_ms": v[1] for k, v in timed.items()})
    out["cpu_ms"] = sum(out[f"{k}_cpu_ms"] for k in ("decode", "transforms", "copy", "forward"))
    out["full_size_cpu_ms"] = sum(
        out[f"{k}_cpu_ms"] for k in ("full_size_decode", "full_size_transforms", "copy", "forward")
    )
    return out


def lite0_network(path: str) -> tuple[torch.nn.Module, data.Preprocessing]:
    """timm's tf_efficientnet_lite0 with the EfficientNet-Lite0 ImageNet state dict at ``path`` (as
    ``python -m tune_rice backbones --write-lite0 FILE`` writes it), pooled output, and its preprocessing
    (224 px, resize 256, bicubic, mean and std 0.5): real ImageNet features for the feature shift."""
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("classifier.")})
    return net.eval(), data.Preprocessing(224, 256, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@torch.inference_mode()
def feature_shift(table, spec, n: int, *, network=None) -> dict:
    """Pooled features (random init) of the same photos, sized decode against full size. ``eval_view``:
    the evaluation view. ``augmented_crop``: one RandomResizedCrop box per photo (drawn at the policy's
    scales and ratios, in fractions of the image), cut from the working image and from the full-size
    one and resized to the crop size: the source pixels an augmented view gets (its flips, rotation and
    jitter then act on the crop, the same either way). Cosine as is, and centred (the mean full-size
    feature taken out: random-init pooled features share a large positive mean)."""
    from torchvision.transforms.v2 import functional as TF

    backbone, pre = network if network is not None else (build_backbone(spec.backbone, weights="none")[0], None)
    pre = pre or spec.preprocessing
    eval_tf = build_transform(pre, normalize=False)
    decode = data.decode_for(pre, spec.policy)
    interp = data.INTERPOLATIONS[pre.interpolation]
    paths = table.paths("train")[:n]
    gen = torch.Generator().manual_seed(spec.seed)
    pairs: dict[str, tuple[list, list]] = {"eval_view": ([], []), "augmented_crop": ([], [])}
    for p in paths:
        full, draft = FULL_DECODE.open(p), decode.open(p)
        pairs["eval_view"][0].append(eval_tf(data.decode_for(pre).working(draft)))
        pairs["eval_view"][1].append(eval_tf(full))
        lo, hi = data.CROP_SCALE[spec.policy]
        area = lo + (hi - lo) * float(torch.rand((), generator=gen))
        ratio = data.CROP_RATIO[0] + (data.CROP_RATIO[1] - data.CROP_RATIO[0]) * float(torch.rand((), generator=gen))
        fw, fh = min(1.0, (area * ratio) ** 0.5), min(1.0, (area / ratio) ** 0.5)  # of the width, the height
        fx, fy = (float(torch.rand((), generator=gen)) for _ in range(2))
        for k, image in enumerate((decode.working(draft), full)):
            w, h = image.size
            cw, ch = max(1, round(fw * w)), max(1, round(fh * h))
            left, top = round(fx * (w - cw)), round(fy * (h - ch))
            crop = TF.resized_crop(image, top, left, ch, cw, [pre.crop, pre.crop], interpolation=interp, antialias=True)
            pairs["augmented_crop"][k].append(TF.pil_to_tensor(crop))
    out: dict = {"images": len(paths)}
    for name, (sized, full) in pairs.items():
        a = backbone(to_model_input(torch.stack(sized), "cpu", pre)).double()
        b = backbone(to_model_input(torch.stack(full), "cpu", pre)).double()
        mean = b.mean(0)
        cos = torch.nn.functional.cosine_similarity(a, b)
        centred = torch.nn.functional.cosine_similarity(a - mean, b - mean)
        out[name] = {
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
            "centred_cosine_min": float(centred.min()),
            "centred_cosine_mean": float(centred.mean()),
            "own_image_nearest": float((torch.cdist(a, b).argmin(1) == torch.arange(len(paths))).double().mean()),
        }
    return out


def gpu_decode(table, spec, *, device, batch: int = 32, n: int = 128) -> dict:
    """Batched JPEG decoding on the GPU (nvjpeg through torchvision) and one resize there to the working
    size, against the CPU's draft decode: images/s on the card, and ms per image per CPU core."""
    import torchvision.io as io
    from torchvision.transforms.v2 import functional as TF

    if device.type != "cuda":
        return {"measured": False, "why": "no CUDA device here"}
    paths = (table.paths("train") * (n // max(1, len(table.paths("train"))) + 1))[:n]
    raw = [io.read_file(str(p)) for p in paths]
    size = pass_dataset(table, [spec], "train").decode.size

    def run():
        for i in range(0, len(raw), batch):
            for img in io.decode_jpeg(raw[i : i + batch], device=device, mode=io.ImageReadMode.RGB):
                TF.resize(img, [size], antialias=True)
        torch.cuda.synchronize()

    run()  # warm-up: nvjpeg's handles and buffers
    t0 = time.perf_counter()
    run()
    gpu = len(raw) / (time.perf_counter() - t0)
    return {"measured": True, "gpu_images_per_s": gpu, "batch": batch, "images": len(raw), "working_size": size}


def photo_sizes(args, device) -> dict:
    from photos import describe, parse_size, photo_set

    rows = []
    workers = loader_workers(device) if args.workers is None else args.workers
    for name in args.photos:
        csv = photo_set(parse_size(name), args.images, distinct=args.distinct, per_class=args.per_class)
        table = read_labels(csv)
        spec = FeatureSpec(backbone=args.backbone, image_size=args.image_size, views=args.views, policy="standard")
        # the ceiling: the backbone alone on this size's views, preloaded (the first batch's worth, repeated)
        ds = pass_dataset(table, [spec], "train")
        x = torch.cat([ds[i][0] for i in range(min(len(ds), max(1, args.batch_size // spec.views)))])
        x = to_model_input(x, "cpu", spec.preprocessing)
        x_all = x.repeat(max(1, 4 * args.batch_size // len(x)), 1, 1, 1)
        backbone, _ = build_backbone(args.backbone, weights="none", seed=0)
        backbone = backbone.to(device).to(memory_format=torch.channels_last)
        row = {"size": name, **describe(csv), "views": spec.views, "workers": workers}
        if args.only_shift:
            row["feature_shift"] = feature_shift(table, spec, args.feature_shift)
            if args.shift_lite0:
                row["feature_shift_lite0"] = feature_shift(
                    table, spec, args.feature_shift, network=lite0_network(args.shift_lite0)
                )
            rows.append(row)
            print(f"  {name}: {json.dumps({k: v for k, v in row.items() if k.startswith('feature_shift')})}")
            continue
        c0 = time.process_time()
        bare = bare_rate(backbone, x_all, args.batch_size, device, repeats=3)  # views/s
        bare_cpu = (time.process_time() - c0) / (3 * len(x_all) + args.batch_size)  # CPU s per view (warm-up too)
        row["decode_short_side"] = ds.decode.size
        row["bare_images_per_s"] = bare / spec.views
        row["phases"] = phases(table, spec, device=device, bare=(bare, bare_cpu), batch_size=args.batch_size, n=16)
        row["pipeline"] = timed_pass(ds, spec, device=device, batch_size=args.batch_size, workers=workers)
        row["full_size_pipeline"] = timed_pass(
            full_size_dataset(table, spec), spec, device=device, batch_size=args.batch_size, workers=workers
        )
        row["efficiency"] = row["pipeline"]["steady_images_per_s"] / row["bare_images_per_s"]
        if args.feature_shift:
            row["feature_shift"] = feature_shift(table, spec, args.feature_shift)
            if args.shift_lite0:
                row["feature_shift_lite0"] = feature_shift(
                    table, spec, args.feature_shift, network=lite0_network(args.shift_lite0)
                )
        if args.gpu_decode:
            row["gpu_decode"] = gpu_decode(table, spec, device=device)
        rows.append(row)
        ph = row["phases"]
        print(
            f"  {name:>5} ({row['megapixels']} MP, {row['mean_mb']:.2f} MB), CPU ms per image: decode "
            f"{ph['decode_cpu_ms']:.1f} (full size {ph['full_size_decode_cpu_ms']:.1f}), transforms "
            f"{ph['transforms_cpu_ms']:.1f} (full size {ph['full_size_transforms_cpu_ms']:.1f}), copy "
            f"{ph['copy_cpu_ms']:.2f}, forward {ph['forward_cpu_ms']:.1f} | "
            f"pipeline {row['pipeline']['steady_images_per_s']:.1f} img/s (full-size decode "
            f"{row['full_size_pipeline']['steady_images_per_s']:.1f}), bare {row['bare_images_per_s']:.1f}, "
            f"efficiency {row['efficiency']:.2f}"
        )
    if args.wall_images and not args.only_shift:
        # Round robin over the sizes, the least of the repeats kept: on a shared machine the load moves
        # between measurements minutes apart, and the sizes are compared with each other.
        for row in rows:
            row["wall_images"], row["wall_runs"], row["wall_full_size_runs"] = args.wall_images, [], []
        spec = FeatureSpec(backbone=args.backbone, image_size=args.image_size, views=args.views, policy="standard")
        for _ in range(args.wall_repeats):
            for row in rows:
                csv = photo_set(
                    parse_size(row["size"]), args.wall_images, distinct=args.distinct, per_class=args.per_class
                )
                for full_size, key in ((False, "wall_runs"), (True, "wall_full_size_runs")):
                    row[key].append(wall_extract(csv, spec, device, args.batch_size, workers, full_size=full_size))
        for row in rows:
            row["wall_s"], row["wall_full_size_s"] = min(row["wall_runs"]), min(row["wall_full_size_runs"])
            print(f"  {row['size']:>5}: extract_bank {row['wall_s']:.1f} s (full size {row['wall_full_size_s']:.1f} s)")
    base = next((r for r in rows if r["size"] == "256" and "phases" in r), None)
    for r in rows:
        if base is not None and "phases" in r:
            # CPU per image against the same images at 256 px: the cost on a machine whose cores this
            # work alone keeps busy; and forward CPU / total CPU, the share of the bare forward's rate
            # that the pipeline can reach when decoding and the forward share the cores
            r["cpu_vs_256"] = r["phases"]["cpu_ms"] / base["phases"]["cpu_ms"]
            r["full_size_cpu_vs_256"] = r["phases"]["full_size_cpu_ms"] / base["phases"]["full_size_cpu_ms"]
            r["cpu_bound_efficiency"] = r["phases"]["forward_cpu_ms"] / r["phases"]["cpu_ms"]
        if base is not None and "wall_s" in r:
            r["wall_vs_256"] = r["wall_s"] / base["wall_s"]
            r["wall_full_size_vs_256"] = r["wall_full_size_s"] / base["wall_s"]
    return {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "views": args.views,
        "batch_size": args.batch_size,
        "images": args.images,
        "distinct_images": args.distinct,
        "rows": rows,
    }


def wall_extract(csv, spec, device, batch_size: int, workers: int, *, full_size: bool) -> float:
    """Seconds of a fresh extract_bank (train split, a new cache folder) as a search would run it;
    ``full_size``: with every file decoded at full size (photos.full_size_decode)."""
    with full_size_decode(full_size), tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        extract_bank(
            csv,
            spec,
            weights="none",
            splits=("train",),
            cache_dir=cache,
            device=device,
            batch_size=batch_size,
            num_workers=workers,
            progress=False,
        )
        return time.perf_counter() - t0


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
    p.add_argument("--photos", nargs="+", help="photo sizes to time (256, 2mp, 12mp or WxH): see above")
    p.add_argument("--views", type=int, default=3, help="--photos: views per image (the quick space's 3)")
    p.add_argument("--images", type=int, default=128, help="--photos: images per size for the steady state")
    p.add_argument("--distinct", type=int, default=0, help="--photos: distinct files, listed in turn (0: all)")
    p.add_argument("--wall-images", type=int, default=64, help="--photos: images of the extract_bank wall time")
    p.add_argument("--wall-repeats", type=int, default=2, help="--photos: wall times per size (the least is kept)")
    p.add_argument("--feature-shift", type=int, default=32, help="--photos: images for the feature cosine (0: off)")
    p.add_argument("--gpu-decode", action="store_true", help="--photos: also time nvjpeg decoding (CUDA)")
    p.add_argument("--shift-lite0", metavar="FILE", help="--photos: the feature shift with Lite0 ImageNet weights too")
    p.add_argument("--only-shift", action="store_true", help="--photos: the feature shift alone (no timings)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()

    device = resolve_device(args.device)
    if args.photos:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        print(f"{args.backbone} @ {args.image_size}px, {args.views} views, batch {args.batch_size}, {device}")
        from run_info import run_info

        out = {**extraction_context(device), "run": run_info(), **photo_sizes(args, device)}
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(out, indent=1))
        return 0
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
