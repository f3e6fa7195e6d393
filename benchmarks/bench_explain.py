"""Do the activation maps point at the evidence? A dataset where only a small mark decides the class.

Two classes, ``clean`` and ``lesion``, drawn from the same pictures (the demo's healthy leaves, in a
given family): a ``lesion`` image carries one small purple-red spot with a white halo at a random position,
recorded in ``boxes.csv``; nothing else differs between the classes. A head is trained on a
random-init backbone's feature bank (``engine.HeadRun``, what a search trial runs, with a fixed
config), then on every held-out ``lesion`` image (valid and test splits) the map for ``lesion`` is
measured: the share of its mass inside the spot's box, against the box's share of the image area (a map
that knew nothing would put about that share there). Also: the share of images whose map puts at least
twice the area share in the box, and how often the map's peak falls inside the box.

    python benchmarks/bench_explain.py                      # field + scans, resnet18, stages 0-2
    python benchmarks/bench_explain.py --families field --backbones resnet18 mobilenet_v3_small --per-class 80
    python benchmarks/bench_explain.py --backbones timm:tf_efficientnet_lite0 --weights lite0   # real features

Writes ``benchmarks/results/explain_localisation.json``. ``--weights none`` (the default) is a randomly
initialised backbone; ``--weights lite0`` the EfficientNet-Lite0 ImageNet weights that a package ships
(``timm_zoo.lite0_weights_file``, for ``timm:tf_efficientnet_lite0``), the real pretrained features this
machine can have; any other value is a state-dict file.
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
import pandas as pd
import torch
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tune_rice.data.demo import render_image  # noqa: E402
from tune_rice.data.images import build_transform, eval_resize, load_image, preprocessing_spec  # noqa: E402
from tune_rice.features.bank import extract_bank  # noqa: E402
from tune_rice.features.model import Classifier, build_backbone  # noqa: E402
from tune_rice.heads.engine import HeadRun, TrialConfig  # noqa: E402
from tune_rice.tools.explain import METHODS, Explainer, mass_in_box  # noqa: E402

CLASSES = ("clean", "lesion")
MARK_DIAMETER = 0.2  # of the model's input side: the box is 4% of the image
# A purple-red spot with a white halo: colours none of the pictures has (a brown spot passes for soil and a
# random-init backbone's pooled features cannot tell it apart: held-out accuracy 0.4-0.6 at 40-120 per class).
HALO, CORE = (0.95, 0.95, 0.95), (0.8, 0.05, 0.45)
# A linear head with strong weight decay: random-init features are many and weak (a linear probe reached
# 0.88 valid at 250 per class with strong L2; an MLP head over-fits them).
HEAD_CONFIG = dict(
    views=1, aug_policy="none", hidden=0, dropout=0.0, lr=3e-3, weight_decay=0.05, epochs=40, batch_size=32, seed=0
)


# ------------------------------------------------------------------------------------------ the data
def _lesion(img: np.ndarray, cx: float, cy: float, r: float) -> None:
    """Paint a spot (``CORE`` colour, ``HALO`` ring, soft edge) of radius ``r`` px at (cx, cy) in place."""
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]].astype(np.float32) + 0.5
    d = np.hypot(xx - cx, yy - cy) / r  # 1 at the halo's outer edge
    halo = np.clip((1.0 - d) / 0.15, 0, 1)[..., None]
    core = np.clip((0.62 - d) / 0.12, 0, 1)[..., None]
    img[:] = img * (1 - halo) + halo * np.array(HALO, np.float32)
    img[:] = img * (1 - core) + core * np.array(CORE, np.float32)


def make_marked_dataset(
    root: Path,
    *,
    family: str = "field",
    per_class: int = 60,
    image_size: int = 128,
    seed: int = 0,
    splits=(0.5, 0.25, 0.25),
) -> Path:
    """``root/{clean,lesion}/*.png``, labels.csv and boxes.csv (the spot's box in model-input pixels).

    Images are drawn at the evaluation resize (``eval_resize(image_size)``) so that the model's centre
    crop is a known window; the spot always lies inside it. ``scans`` images (and their spots) are grey.
    """
    side = eval_resize(image_size)
    off = (side - image_size) // 2  # the centre crop's offset
    rng = np.random.default_rng(seed)
    r = MARK_DIAMETER * image_size / 2
    rows, boxes = [], []
    for c, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True, exist_ok=True)
        n_train, n_valid = int(per_class * splits[0]), int(per_class * splits[1])
        for i in range(per_class):
            # Both classes draw from one pool of pictures (even and odd indices): only the spot differs.
            arr, _ = render_image("Healthy", 2 * i + c, size=side, seed=seed, family=family)
            img = arr.astype(np.float32) / 255
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            rel = f"{label}/{label}_{i:03d}.png"
            if label == "lesion":
                cx, cy = rng.uniform(r + 2, image_size - r - 2, size=2)  # in crop pixels
                _lesion(img, cx + off, cy + off, r)
                boxes.append(
                    {
                        "path": rel,
                        "x0": int(np.floor(cx - r)),
                        "y0": int(np.floor(cy - r)),
                        "x1": int(np.ceil(cx + r)),
                        "y1": int(np.ceil(cy + r)),
                        "image_size": image_size,
                    }
                )
            if family == "scans":
                img = np.repeat(img.mean(axis=2, keepdims=True), 3, axis=2)
            Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)).save(root / rel)
            split = "train" if i < n_train else "valid" if i < n_train + n_valid else "test"
            rows.append({"path": rel, "label": label, "split": split, "group": f"g{len(rows):04d}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    pd.DataFrame(boxes).to_csv(root / "boxes.csv", index=False)
    return root / "labels.csv"


# -------------------------------------------------------------------------------------- the measure
def weights_arg(value: str) -> str:
    """``--weights``: none (random init), lite0 (the mapped EfficientNet-Lite0 ImageNet file), or a file."""
    if value == "lite0":
        from tune_rice.features.timm_zoo import lite0_weights_file

        return str(lite0_weights_file())
    return value


def weights_label(value: str) -> str:
    return "random init" if value == "none" else "Lite0 ImageNet" if value == "lite0" else f"file {Path(value).name}"


def train_model(
    labels_csv: Path, *, backbone: str, image_size: int, cache_dir: Path, weights: str = "none"
) -> tuple[Classifier, float]:
    """``backbone`` (random init, or ``weights``: see :func:`weights_arg`) with a head trained on its bank;
    returns (model, valid accuracy)."""
    cfg = TrialConfig(backbone=backbone, image_size=image_size, **HEAD_CONFIG)
    bank = extract_bank(
        labels_csv,
        cfg.feature_spec(),
        weights=weights_arg(weights),
        cache_dir=cache_dir,
        device="cpu",
        num_workers=0,
        progress=False,
    )
    run = HeadRun(cfg, bank=bank, device="cpu")
    for _ in range(cfg.epochs):
        last = run.step()
    net, _ = build_backbone(backbone, weights=weights_arg(weights), seed=cfg.seed, feature_layer="pooled")
    return Classifier(net, run.head.cpu()).eval(), float(last["valid/acc"])


def localisation(
    model: Classifier, root: Path, *, image_size: int, methods=("gradcam",), stages=(0,), splits=("valid", "test")
) -> dict:
    """The map-mass measures on every held-out lesion image, per method and stage (``earlier``); also
    held-out accuracy. Keys ``<method>@<stage>``, each naming its layer and grid."""
    table = pd.read_csv(root / "labels.csv")
    boxes = pd.read_csv(root / "boxes.csv").set_index("path")
    held = table[table["split"].isin(splits)].reset_index(drop=True)
    tf = build_transform(image_size, train=False)
    x = torch.stack([tf(load_image(root / p)) for p in held["path"]])  # (N, 3, S, S)
    truth = held["label"].map(CLASSES.index).to_numpy()
    lesion = CLASSES.index("lesion")
    on = np.flatnonzero(held["label"].to_numpy() == "lesion")  # writable, unlike an Index's to_numpy view
    area = np.array(
        [(b.x1 - b.x0) * (b.y1 - b.y0) / image_size**2 for b in (boxes.loc[p] for p in held.loc[on, "path"])]
    )
    with torch.no_grad():
        accuracy = float(np.mean(model(x).argmax(1).numpy() == truth))
    out = {
        "held_out": len(held),
        "lesion_images": len(on),
        "box_area_share": float(area.mean()),
        "held_out_accuracy": accuracy,
        "maps": {},
    }
    for method in methods:
        for stage in stages:
            t0 = time.perf_counter()
            with Explainer(model, image_size=image_size, method=method, earlier=stage) as ex:
                _, maps = ex(x[on], targets=[lesion] * len(on))
                layer = ex.layers[0]
            seconds = time.perf_counter() - t0
            mass, hit = [], []
            for k, i in enumerate(on):
                b = boxes.loc[held.loc[i, "path"]]
                mass.append(mass_in_box(maps[k], (b.x0, b.y0, b.x1, b.y1)))
                py, px = np.unravel_index(int(np.argmax(maps[k])), maps[k].shape)
                hit.append(b.x0 <= px < b.x1 and b.y0 <= py < b.y1)
            mass = np.nan_to_num(np.asarray(mass), nan=0.0)  # an all-zero map has no mass anywhere: 0 in the box
            out["maps"][f"{method}@{stage}"] = {
                "method": method,
                "earlier": stage,
                "layer": layer.name,
                "grid": list(layer.grid),
                "mass_share_mean": float(mass.mean()),
                "mass_share_median": float(np.median(mass)),
                "ratio_to_area": float(mass.mean() / area.mean()),
                "share_at_least_2x_area": float(np.mean(mass >= 2 * area)),
                "peak_in_box": float(np.mean(hit)),
                "seconds_per_image": seconds / len(on),
            }
    return out


def measure(
    family: str, backbone: str, *, per_class: int, image_size: int, methods, stages, work: Path, weights: str = "none"
) -> dict:
    root = work / f"{family}"
    csv = (
        root / "labels.csv"
        if (root / "labels.csv").is_file()
        else make_marked_dataset(root, family=family, per_class=per_class, image_size=image_size)
    )
    t0 = time.perf_counter()
    model, valid_acc = train_model(
        csv, backbone=backbone, image_size=image_size, cache_dir=work / "cache", weights=weights
    )
    trained = time.perf_counter() - t0
    result = localisation(model, root, image_size=image_size, methods=methods, stages=stages)
    return {
        "family": family,
        "backbone": backbone,
        "weights": weights_label(weights),
        "valid_accuracy": valid_acc,
        "train_seconds": trained,
        **result,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["field", "scans"])
    p.add_argument("--backbones", nargs="+", default=["resnet18"])
    p.add_argument("--methods", nargs="+", default=["gradcam"], choices=METHODS)
    p.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2], help="explain's --earlier values")
    p.add_argument(
        "--weights", default="none", help="none (random init), lite0 (EfficientNet-Lite0 ImageNet), or a file"
    )
    p.add_argument("--per-class", type=int, default=150)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "explain_localisation.json"))
    p.add_argument("--example", help="also write one overlay PNG of a held-out lesion image here")
    args = p.parse_args()
    torch.manual_seed(0)
    runs = []
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "grad_cam": _version("grad-cam"),
        "timm": _version("timm") if any(b.startswith("timm:") for b in args.backbones) else None,
        "per_class": args.per_class,
        "image_size": args.image_size,
        "stages": args.stages,
        "mark_diameter": MARK_DIAMETER,
        "head_config": HEAD_CONFIG,
        "weights": weights_label(args.weights),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for family in args.families:
            for backbone in args.backbones:
                r = measure(
                    family,
                    backbone,
                    per_class=args.per_class,
                    image_size=args.image_size,
                    methods=args.methods,
                    stages=args.stages,
                    work=work,
                    weights=args.weights,
                )
                runs.append(r)
                Path(args.out).write_text(json.dumps(out, indent=1))  # after each run: a long run keeps its part
                print(
                    f"{family:6s} {backbone} ({weights_label(args.weights)}): held-out acc {r['held_out_accuracy']:.3f}; "
                    f"box = {r['box_area_share']:.1%} of the image",
                    flush=True,
                )
                for key, s in r["maps"].items():
                    print(
                        f"    {key:10s} {s['layer']:>8s} {s['grid'][0]}x{s['grid'][1]}: mass in box "
                        f"{s['mass_share_mean']:6.1%} (x{s['ratio_to_area']:.1f} the area), >=2x area on "
                        f"{s['share_at_least_2x_area']:6.1%}, peak in box {s['peak_in_box']:6.1%}",
                        flush=True,
                    )
        print(f"wrote {args.out}")
        if args.example:
            _example(work / args.families[0], Path(args.example), image_size=args.image_size, earlier=max(args.stages))
    return 0


def _example(root: Path, png: Path, *, image_size: int, earlier: int) -> None:
    """An overlay of the first held-out lesion image through the explain CLI's own code."""
    import matplotlib

    matplotlib.use("Agg")
    from tune_rice.features.model import load_model, save_artifact
    from tune_rice.tools.explain import explain_files

    model, _ = train_model(root / "labels.csv", backbone="resnet18", image_size=image_size, cache_dir=root / "cache")
    art = save_artifact(
        root / "model.pt",
        model,
        classes=list(CLASSES),
        preprocessing=preprocessing_spec(image_size),
        weights="random:seed=0",
    )
    table = pd.read_csv(root / "labels.csv")
    first = table[(table["label"] == "lesion") & (table["split"] == "test")]["path"].iloc[0]
    out = root / "explained"
    explain_files(load_model(art), [root / first], out, earlier=earlier, progress=False)
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes((out / Path(first).with_suffix(".png").name).read_bytes())
    print(f"example overlay: {png}")


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


if __name__ == "__main__":
    sys.exit(main())
