"""Photo-size JPEGs for the benchmarks: the demo set's images as a phone or camera would store them.

Real rice-disease sets are 1-12 MP photos of 1-5 MB each. A smooth upscale of a 256 px image compresses
far better than a photo (a 12 MP one to well under 1 MB), and a JPEG decoder's time grows with the bytes
it reads, so each image here is the demo image cut to 4:3, upscaled, and given sensor noise (luminance and
weaker chroma noise, as a camera's), saved at quality 90: about 3 MB at 12 MP and 0.6 MB at 2 MP.

The images are generated once into a cache folder (``$TUNE_RICE_CACHE/bench_photos``, default
``~/.cache/tune_rice/bench_photos``) and never committed:

    python benchmarks/photos.py --size 4000x3000 --images 64     # prints the labels.csv path
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Named sizes: the photo sizes of published rice sets run from 1440x1920 to 2848x4288 (and 4032x1908).
SIZES = {"256": None, "2mp": (1632, 1224), "12mp": (4000, 3000)}
NOISE = 5.0  # luminance noise, grey levels (std); chroma noise is half of it


def parse_size(text: str) -> tuple[int, int] | None:
    """``256`` (the demo's own files), ``2mp``, ``12mp`` or ``WxH``."""
    if text.lower() in SIZES:
        return SIZES[text.lower()]
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def cache_root() -> Path:
    """Beside the demo sets: ``$TUNE_RICE_CACHE/bench_photos`` (default ``~/.cache/tune_rice/bench_photos``)."""
    from tune_rice.data.demo import default_demo_dir

    return default_demo_dir().parent / "bench_photos"


def demo_train(per_class: int = 200, seed: int = 0, splits: tuple[str, ...] = ("train",)) -> tuple[Path, pd.DataFrame]:
    """The demo set's folder and its rows of ``splits`` (generated and prepared first when missing)."""
    from tune_rice.data.demo import ensure_demo

    folder = ensure_demo(per_class=per_class, size=256, seed=seed)
    csv = folder / "labels.csv"
    if not csv.is_file():
        from tune_rice.data.prepare import prepare_dataset

        prepare_dataset(folder, seed=seed, progress=False)
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if splits == ("train",):
        return folder, frame[frame["split"] == "train"].reset_index(drop=True)
    # Several splits: in the order given, each split's rows in turn over the classes, so that any prefix of
    # a split is stratified.
    parts = []
    for split in splits:
        rows = frame[frame["split"] == split]
        turn = rows.groupby("label").cumcount()
        parts.append(rows.assign(_turn=turn).sort_values(["_turn", "label"], kind="stable").drop(columns="_turn"))
    return folder, pd.concat(parts).reset_index(drop=True)


def photo_set(
    size: tuple[int, int] | None,
    images: int,
    *,
    distinct: int = 0,
    per_class: int = 200,
    seed: int = 0,
    quality: int = 90,
    jobs: int | None = None,
    splits: tuple[str, ...] = ("train",),
) -> Path:
    """labels.csv of ``images`` photos of the demo set's ``splits`` (their split kept) at ``size`` (W, H; None: the demo's own
    256 px files, listed where they are). Made once; later calls find them. ``distinct`` > 0: only that
    many files, listed in turn (a GPU-sized run needs thousands of images; decoding one costs the same
    whether it was listed before or not, and every file is in the page cache once written). The photos are
    made from the demo set of ``per_class`` images per class, ``jobs`` processes at a time (default: the
    usable CPUs)."""
    folder, rows = demo_train(per_class=per_class, seed=seed, splits=splits)
    distinct = min(distinct or images, images)
    if len(rows) < distinct:
        raise SystemExit(f"the demo set has {len(rows)} {'+'.join(splits)} images, fewer than {distinct}")
    rows = rows.iloc[[i % distinct for i in range(images)]].reset_index(drop=True)
    tag = f"n{images}" + (f"d{distinct}" if distinct < images else "")
    if splits != ("train",):
        tag += "-" + "-".join(splits)
    if size is None:  # the demo's own files: a labels file of these rows beside them (paths are relative)
        csv = folder / f"labels_train_{tag}.csv"
        if not csv.is_file():
            rows.to_csv(folder / f".{csv.name}.tmp", index=False)
            os.replace(folder / f".{csv.name}.tmp", csv)
        return csv
    w, h = size
    out = cache_root() / f"{w}x{h}-q{quality}-p{per_class}-seed{seed}"
    csv = out / f"labels_{tag}.csv"
    if csv.is_file():
        return csv
    todo = [
        (i, rel) for i, rel in enumerate(rows["path"][:distinct]) if not (out / Path(rel).with_suffix(".jpg")).is_file()
    ]
    if todo:
        global _JOB
        rng = np.random.default_rng(seed)
        # One noise field per set, cut at an offset of its own for each image: it costs as much to
        # compress as fresh noise, and drawing 36 M normals per image would make generation slow.
        field = rng.normal(0.0, NOISE, size=(h + PAD, w + PAD, 1)).astype(np.float32)
        field = field + rng.normal(0.0, NOISE / 2, size=(h + PAD, w + PAD, 3)).astype(np.float32)
        _JOB = (folder, out, (w, h), quality, seed, field)  # the forked processes inherit it
        jobs = jobs or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        if jobs > 1 and len(todo) > 1:
            with multiprocessing.get_context("fork").Pool(min(jobs, len(todo))) as pool:
                pool.starmap(_make_photo, todo)
        else:
            for i, rel in todo:
                _make_photo(i, rel)
        _JOB = None
    rows["path"] = [str(Path(p).with_suffix(".jpg")) for p in rows["path"]]
    rows.to_csv(out / f".{csv.name}.tmp", index=False)
    os.replace(out / f".{csv.name}.tmp", csv)
    return csv


PAD = 64
_JOB: tuple | None = None  # (demo folder, out folder, (w, h), quality, seed, noise field) while a set is made


def _make_photo(i: int, rel: str) -> None:
    """Photo ``i`` of the set being made: demo image ``rel`` cut to 4:3, upscaled, with sensor noise."""
    assert _JOB is not None
    folder, out, (w, h), quality, seed, field = _JOB
    target = out / Path(rel).with_suffix(".jpg")
    target.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(folder / rel) as im:
        im = im.convert("RGB")
        sw, sh = im.size
        ch = min(sh, sw * h // w)  # cut to the photo's aspect ratio, centred
        cw = ch * w // h
        left, top = (sw - cw) // 2, (sh - ch) // 2
        big = np.asarray(im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC))
    dy, dx = np.random.default_rng((seed, i)).integers(0, PAD, size=2)
    noisy = np.clip(big + field[dy : dy + h, dx : dx + w], 0, 255).astype(np.uint8)
    tmp = target.with_name(f".{target.name}.tmp")
    Image.fromarray(noisy).save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, target)  # a set cut short leaves no half-written photo


@contextlib.contextmanager
def full_size_decode(enabled: bool = True):
    """While inside (and ``enabled``), every file is decoded at full size and the views cut from it: the
    reading path before the sized decode (``images.decode_for`` replaced; loader workers fork inside, so
    they see it too)."""
    from tune_rice.data import images

    real = images.decode_for
    if enabled:
        images.decode_for = lambda pre, policy=None: images.FULL_DECODE
    try:
        yield
    finally:
        images.decode_for = real


def describe(csv: Path) -> dict:
    """Pixels and bytes of a set's images: what a benchmark reports about its input."""
    frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    paths = [csv.parent / p for p in frame["path"]]
    with Image.open(paths[0]) as im:
        w, h = im.size
    sizes = np.array([p.stat().st_size for p in paths], dtype=np.float64)
    return {
        "width": w,
        "height": h,
        "megapixels": round(w * h / 1e6, 2),
        "images": len(paths),
        "mean_mb": round(float(sizes.mean()) / 1e6, 3),
        "min_mb": round(float(sizes.min()) / 1e6, 3),
        "max_mb": round(float(sizes.max()) / 1e6, 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="12mp", help="256, 2mp, 12mp or WxH")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--distinct", type=int, default=0, help="distinct files, listed in turn (0: all)")
    p.add_argument("--per-class", type=int, default=200, help="the demo set the photos are made from")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    csv = photo_set(
        parse_size(args.size), args.images, distinct=args.distinct, per_class=args.per_class, seed=args.seed
    )
    print(csv)
    print(describe(csv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
