"""Reading the prepared dataset: labels.csv, robust image decoding, transform presets, a Dataset.

No Ray here. Everything that turns a file on disk into a normalised tensor lives in this module, so the
feature bank, the inline training path, evaluation and prediction all see the same pixels.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from .. import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "valid", "test")
AUG_POLICIES = ("none", "light", "standard", "strong")
REQUIRED_COLUMNS = ("path", "label", "split", "group")

# A truncated JPEG must be an error we report, never silently half-grey pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageDecodeError(UserError):
    """An image file that cannot be decoded; the message names the file and the reason."""


def load_image(path: str | os.PathLike, *, draft_size: int | None = None) -> Image.Image:
    """Decode ``path`` into an 8-bit RGB PIL image, whatever the file holds.

    EXIF orientation is applied; greyscale, palette, RGBA/LA (composited on white), CMYK and 16-bit or
    float images become RGB. ``draft_size`` lets the JPEG decoder scale down by a power of two while
    decoding (much faster for large photos); the result is still at least ``draft_size`` on each side.
    Raises :class:`ImageDecodeError` naming the path on anything unreadable.
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            if draft_size and opened.format == "JPEG":
                opened.draft("RGB", (draft_size, draft_size))
            opened.load()
            return _to_rgb(ImageOps.exif_transpose(opened))
    except FileNotFoundError:
        raise ImageDecodeError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        reason = "empty file" if size == 0 else "not an image (unknown format)"
        raise ImageDecodeError(f"{path}: {reason}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"{path}: cannot decode ({e})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit / 32-bit greyscale: rescale the actual range into 0..255.
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
        lo, hi = float(arr.min()), float(arr.max())
        if mode.startswith("I;16") and hi > 255:
            arr = arr / 65535.0 * 255.0
        elif mode == "F" and lo >= 0 and hi <= 1:
            arr = arr * 255.0  # float images conventionally hold 0..1 (they decoded all black before)
        elif hi > 255 or lo < 0:
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        if im.mode == "RGB":
            return im
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("RGB;16", "BGR;16") or mode.startswith("RGB"):
        return im.convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


# --------------------------------------------------------------------------------------------- labels
@dataclass(frozen=True)
class LabelTable:
    """labels.csv read and checked: ``frame`` rows, ``root`` the dataset folder, ``classes`` sorted."""

    frame: pd.DataFrame
    root: Path
    classes: tuple[str, ...]
    csv_path: Path

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name].reset_index(drop=True)

    def paths(self, split: str) -> list[Path]:
        return [self.root / p for p in self.split(split)["path"]]

    def targets(self, split: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.asarray([index[c] for c in self.split(split)["label"]], dtype=np.int64)


def read_labels(csv_path: str | os.PathLike, *, root: str | os.PathLike | None = None) -> LabelTable:
    """Read and validate a labels.csv; ``root`` defaults to the folder that holds it.

    Paths must be relative and stay inside ``root`` (no ``..``, no absolute paths): a labels.csv
    from elsewhere must not make the tools read arbitrary files.
    """
    csv_path = Path(csv_path).resolve()
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: labels file not found")
    try:
        frame = pd.read_csv(
            csv_path, dtype={"path": str, "label": str, "split": str, "group": str}, keep_default_na=False
        )
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise UserError(f"{csv_path}: not a readable CSV ({e})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(
            f"{csv_path}: missing column(s) {', '.join(missing)}; expected at least {', '.join(REQUIRED_COLUMNS)}"
        )
    if frame.empty:
        raise UserError(f"{csv_path}: no rows")
    bad_split = sorted(set(frame["split"]) - set(SPLITS))
    if bad_split:
        raise UserError(f"{csv_path}: unknown split value(s) {bad_split}; valid: {', '.join(SPLITS)}")
    for p in frame["path"]:
        pp = PurePosixPath(p)
        if not p or pp.is_absolute() or ".." in pp.parts or Path(p).is_absolute() or "\\" in p:
            raise UserError(
                f"{csv_path}: path {p!r} is not inside the dataset root (absolute paths and '..' are refused)"
            )
    root = Path(root).resolve() if root is not None else csv_path.parent
    classes = tuple(sorted(frame["label"].unique()))
    return LabelTable(frame=frame, root=root, classes=classes, csv_path=csv_path)


def is_labels_file(csv_path: str | os.PathLike) -> bool:
    """Whether ``csv_path`` is a labels file (it has the ``REQUIRED_COLUMNS``), not a CSV of images and
    labels that ``prepare`` has yet to split."""
    try:
        header = pd.read_csv(csv_path, nrows=0, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return False
    return all(c in header.columns for c in REQUIRED_COLUMNS)


def prepared_labels_path(csv_path: Path) -> Path:
    """Where ``prepare`` writes the labels of a CSV of images by default: ``<stem>.labels.csv`` beside it
    (``train.csv`` -> ``train.labels.csv``), so that two CSVs in one folder never share a labels file."""
    return csv_path.with_name(f"{csv_path.stem}.labels.csv")


def read_labels_checked(
    csv_path: str | os.PathLike, root: str | os.PathLike | None = None, *, splits: Sequence[str] = SPLITS
) -> LabelTable:
    """``read_labels`` for the tools that read the images (search, evaluate): every file listed in
    ``splits`` must be there, under ``root`` (``--data-root``) or else the labels file's folder."""
    table = read_labels(csv_path, root=root)
    listed = table.frame.loc[table.frame["split"].isin(splits), "path"]
    # One directory listing per folder, not one stat per image: far fewer round trips on NFS or EFS.
    by_folder: dict[str, list[tuple[str, str]]] = {}
    for rel in listed:  # paths are validated POSIX-relative by read_labels
        folder, _, name = rel.rpartition("/")
        by_folder.setdefault(folder, []).append((rel, name))
    missing: list[str] = []
    for folder, items in by_folder.items():
        try:
            with os.scandir(table.root / folder) as entries:
                present = {e.name for e in entries if e.is_file()}
        except OSError:  # no such folder (or not one): none of its files are there
            present = set()
        missing.extend(rel for rel, name in items if name not in present)
    if missing:
        hint = (
            ""
            if root is not None
            else "; paths in a labels.csv are relative to its folder: if the images "
            "live elsewhere (prepare --out outside DATA_DIR), pass --data-root DATA_DIR"
        )
        raise UserError(
            f"{table.csv_path}: {len(missing)} of {len(listed)} listed images are not under "
            f"{table.root} (first: {missing[0]}){hint}"
        )
    return table


# ----------------------------------------------------------------------------------------- transforms
INTERPOLATIONS = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


def eval_resize(image_size: int) -> int:
    """Short-side resize before the centre crop (the 256/224 ImageNet convention)."""
    return int(round(image_size * 256 / 224))


@dataclass(frozen=True)
class Preprocessing:
    """How a photo becomes the backbone's input: resize the short side to ``resize`` px with
    ``interpolation``, centre-crop ``crop`` px, pixel/255, then ``(x - mean) / std``.

    The zoo (``backbones.preprocessing_for``) takes these from the weights' own transforms; a bare image
    size gives the ResNet/ImageNet convention (:meth:`for_size`), which is also what models saved before
    the zoo used.
    """

    crop: int
    resize: int
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"unknown interpolation {self.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
        if int(self.crop) < 16 or int(self.resize) < int(self.crop):
            raise UserError(
                f"preprocessing needs crop >= 16 and resize >= crop, got crop {self.crop}, resize {self.resize}"
            )
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @classmethod
    def for_size(cls, image_size: int) -> Preprocessing:
        return cls(crop=int(image_size), resize=eval_resize(int(image_size)))

    def to_dict(self) -> dict:
        """Plain data, as saved inside model artifacts and export metadata."""
        return {
            "image_size": int(self.crop),
            "resize": int(self.resize),
            "crop": "center",
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "color": "RGB",
            "scale": "pixel/255 then (x - mean) / std",
        }

    @classmethod
    def from_dict(cls, spec: dict) -> Preprocessing:
        """Read :meth:`to_dict`'s output; artifacts written before the zoo have no ``interpolation``
        (they used bilinear) and may lack ``resize`` (they used :func:`eval_resize`)."""
        try:
            size = int(spec["image_size"])
            if spec.get("crop", "center") != "center":
                raise UserError(f"preprocessing crop {spec.get('crop')!r}: only 'center' is supported")
            return cls(
                crop=size,
                resize=int(spec.get("resize", eval_resize(size))),
                interpolation=str(spec.get("interpolation", "bilinear")),
                mean=tuple(spec.get("mean", IMAGENET_MEAN)),
                std=tuple(spec.get("std", IMAGENET_STD)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"preprocessing {spec!r} is not valid ({type(e).__name__}: {e})") from None


def as_preprocessing(value: int | Preprocessing | dict) -> Preprocessing:
    """A :class:`Preprocessing` from itself, its dict form, or a bare image size (ResNet convention)."""
    if isinstance(value, Preprocessing):
        return value
    if isinstance(value, dict):
        return Preprocessing.from_dict(value)
    return Preprocessing.for_size(int(value))


# RandomResizedCrop's area share (smallest, largest) per training policy, and its aspect ratios
# (torchvision's default): what a training decode must keep enough pixels for (decode_for).
CROP_SCALE = {"light": (0.7, 1.0), "standard": (0.5, 1.0), "strong": (0.3, 1.0)}
CROP_RATIO = (3 / 4, 4 / 3)
# Bumped whenever decoding changes the pixels the views are cut from: it is part of the feature banks'
# cache key (features.bank_key), so banks decoded another way are extracted again, never reused.
# 1: JPEG draft scaling and one resize to the working size (decode_for); before it, every image was
# decoded at full size.
DECODE_VERSION = 1


@dataclass(frozen=True)
class Decode:
    """How an image file becomes the picture its views are cut from.

    ``size`` is the short side the views need (0: full size, every pixel). :meth:`open` decodes a JPEG at
    the coarsest scale its decoder offers (1/2, 1/4 or 1/8: it then skips most of the inverse DCT) that
    still keeps a short side of at least ``size``; other formats (PNG, TIFF, WebP, ...) decode in full.
    :meth:`working` then resizes the short side down to ``size`` (never up), with ``interpolation`` and
    antialiasing, exactly as ``T.Resize(size)`` does; calling the Decode does both. Made by
    :func:`decode_for`, from the preprocessing and the augmentation policy.
    """

    size: int = 0
    interpolation: str = "bilinear"

    def __post_init__(self):
        if int(self.size) < 0 or self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"not a decode: size {self.size}, interpolation {self.interpolation!r}")
        object.__setattr__(self, "size", int(self.size))

    def open(self, path: str | os.PathLike) -> Image.Image:
        """The file decoded (RGB, EXIF orientation applied), JPEGs at the draft scale that keeps ``size``."""
        return load_image(path, draft_size=self.size or None)

    def working(self, image: Image.Image) -> Image.Image:
        """``image`` with its short side brought down to ``size`` (unchanged when it is no larger)."""
        if not self.size or min(image.size) <= self.size:
            return image
        return TF.resize(image, [self.size], interpolation=INTERPOLATIONS[self.interpolation], antialias=True)

    def __call__(self, path: str | os.PathLike) -> Image.Image:
        return self.working(self.open(path))

    def to_dict(self) -> dict:
        """What changes the pixels: part of the feature banks' cache key."""
        return {"version": DECODE_VERSION, "size": self.size, "interpolation": self.interpolation}


FULL_DECODE = Decode(0)  # every pixel, no resize: today's reference for how far the sized decode moves features


def view_short_side(preprocessing: int | Preprocessing | dict, policy: str | None = None) -> int:
    """The short side (px) a source image needs so that no view of ``preprocessing`` under ``policy``
    (None or ``none``: the evaluation view alone) loses pixels it would have had from a larger one.

    Evaluation view: the short side is resized to ``resize`` then centre-cropped, so ``resize`` px.
    Augmented views: RandomResizedCrop keeps an area share s >= s_min (the policy's ``CROP_SCALE``) at an
    aspect ratio r in ``CROP_RATIO``, then resizes it to ``crop``; its shorter side is sqrt(s * A * r) for
    an image of area A >= short side squared, at least short * sqrt(s_min * r_min). It keeps >= ``crop``
    px (the views downscale, never upscale) when short >= crop / sqrt(s_min * r_min). Rotation and colour
    jitter act on the crop afterwards and need nothing more.
    """
    pre = as_preprocessing(preprocessing)
    if policy is None or policy == "none":
        return pre.resize
    if policy not in CROP_SCALE:
        raise UserError(f"unknown augmentation policy {policy!r}; valid: {', '.join(AUG_POLICIES)}")
    smallest = math.sqrt(CROP_SCALE[policy][0] * min(CROP_RATIO[0], 1 / CROP_RATIO[1]))
    return max(pre.resize, math.ceil(pre.crop / smallest - 1e-9))


def decode_for(preprocessing: int | Preprocessing | dict, policy: str | None = None) -> Decode:
    """The one place that decides how images are decoded for ``preprocessing``: the JPEG draft scale and
    the working size are :func:`view_short_side` of the preprocessing and the augmentation ``policy``
    (None: evaluation, prediction), so no view loses source pixels. Every image-reading path takes its
    decode from here (through :func:`build_transform`'s ``decode``)."""
    pre = as_preprocessing(preprocessing)
    return Decode(view_short_side(pre, policy), pre.interpolation)


class ImageTransform(T.Compose):
    """:func:`build_transform`'s result: the views' transforms, with the :class:`Decode` they need
    (``decode``) and the :class:`Preprocessing` they apply (``preprocessing``); ``normalize`` False means
    it ends in a uint8 tensor that :func:`to_model_input` scales and normalises on the model's device."""

    def __init__(self, transforms, *, decode: Decode, preprocessing: Preprocessing, normalize: bool):
        super().__init__(transforms)
        self.decode, self.preprocessing, self.normalize = decode, preprocessing, normalize


def build_transform(
    preprocessing: int | Preprocessing | dict = 224,
    *,
    train: bool = False,
    policy: str = "standard",
    normalize: bool = True,
) -> ImageTransform:
    """The preprocessing for one image: PIL RGB -> float tensor (3, S, S), normalised; with
    ``normalize=False``, a uint8 tensor (3, S, S) for :func:`to_model_input` to scale and normalise on
    the model's device (a quarter of the bytes to pin and copy; the same numbers).

    ``preprocessing``: a :class:`Preprocessing` (resize, crop, interpolation, mean, std), its dict form, or
    a bare image size (ResNet convention: resize 256/224 of it, bilinear, ImageNet mean/std).
    ``train=False`` (or policy ``none``) is deterministic: resize the short side then centre-crop.
    Training policies: ``light`` (crop + horizontal flip), ``standard`` (RandomResizedCrop, flips, small
    rotation, ColorJitter: the seed recipe's augmentation), ``strong`` (wider crops and jitter).
    The result's ``decode`` (:func:`decode_for`) is how files must be decoded for it.
    """
    if policy not in AUG_POLICIES:
        raise UserError(f"unknown augmentation policy {policy!r}; valid: {', '.join(AUG_POLICIES)}")
    pre = as_preprocessing(preprocessing)
    size, interp = pre.crop, INTERPOLATIONS[pre.interpolation]
    tail: list = [T.ToImage()]
    tail += [T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)] if normalize else [T.ToPureTensor()]
    if not train or policy == "none":
        steps = [T.Resize(pre.resize, interpolation=interp, antialias=True), T.CenterCrop(size)]
        return ImageTransform([*steps, *tail], decode=decode_for(pre), preprocessing=pre, normalize=normalize)
    crop = T.RandomResizedCrop(size, scale=CROP_SCALE[policy], ratio=CROP_RATIO, interpolation=interp, antialias=True)
    if policy == "light":
        aug = [crop, T.RandomHorizontalFlip()]
    elif policy == "standard":
        aug = [
            crop,
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.RandomRotation(15),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
        ]
    else:  # strong
        aug = [
            crop,
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.RandomRotation(30),
            T.ColorJitter(brightness=0.35, contrast=0.35, saturation=0.35, hue=0.05),
        ]
    return ImageTransform([*aug, *tail], decode=decode_for(pre, policy), preprocessing=pre, normalize=normalize)


def to_model_input(
    x: torch.Tensor, device: torch.device | str, preprocessing: int | Preprocessing | dict | None = None
) -> torch.Tensor:
    """A loader batch on ``device`` as the model's input. uint8 images (``normalize=False`` transforms,
    (..., 3, S, S)) are copied as they are (non-blocking from the loader's pinned memory on CUDA) and
    scaled and normalised there with the arithmetic of ``ToDtype(scale=True)`` then ``Normalize``, so the
    numbers equal the CPU transform's; float batches were normalised by their transform and only move."""
    x = x.to(device, non_blocking=True)
    if x.dtype != torch.uint8:
        return x
    if preprocessing is None:
        raise ValueError("a uint8 image batch needs its preprocessing (mean, std) to be normalised")
    pre = as_preprocessing(preprocessing)
    mean = torch.as_tensor(pre.mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(pre.std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return (x.to(torch.float32).mul_(1.0 / 255) - mean) / std


def preprocessing_spec(image_size: int | Preprocessing) -> dict:
    """How to turn a photo into the model's input, as plain data (saved inside model artifacts)."""
    return as_preprocessing(image_size).to_dict()


# -------------------------------------------------------------------------------------------- dataset
class ImageDataset(Dataset):
    """Images and integer targets; item ``i`` is ``(tensor (3, S, S), target, i)``.

    ``views`` > 1 returns a stacked tensor (V, 3, S, S) of ``views`` transforms of one decode: view 0
    through ``first_transform`` (un-augmented) when given, the rest through ``transform``.
    ``decode`` (default: ``transform.decode``, from :func:`decode_for`; the full-size decode for a
    transform without one) reads each file: a JPEG at its draft scale, then one resize to the working
    size the augmented views are cut from. View 0 is cut from the decoded image before that resize, so
    it equals the evaluation path's view whenever the draft scale is the same.
    ``seed`` makes random augmentation a function of (seed, index): the same views whatever the number
    of loader workers or the batch size.
    """

    def __init__(
        self,
        paths,
        targets,
        transform,
        *,
        views: int = 1,
        first_transform=None,
        decode: Decode | None = None,
        seed: int | None = None,
    ):
        self.paths = [Path(p) for p in paths]
        self.targets = np.asarray(targets, dtype=np.int64)
        if len(self.paths) != len(self.targets):
            raise ValueError("paths and targets differ in length")
        self.transform = transform
        self.first_transform = first_transform
        self.views = int(views)
        self.decode = decode if decode is not None else getattr(transform, "decode", FULL_DECODE)
        self.seed = seed
        self.epoch = 0  # set by callers that want fresh augmentation per epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = self.decode.open(self.paths[i])
        if self.seed is None:
            return self._transform(image, i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF)
            return self._transform(image, i)

    def _transform(self, image, i: int):
        if self.views == 1:
            return self.transform(self.decode.working(image)), int(self.targets[i]), i
        first = self.first_transform(image) if self.first_transform is not None else None
        work = self.decode.working(image)
        rest = [self.transform(work) for _ in range(self.views - (first is not None))]
        return torch.stack(rest if first is None else [first, *rest]), int(self.targets[i]), i


def dataset_for_split(table: LabelTable, split: str, transform, **kwargs) -> ImageDataset:
    return ImageDataset(table.paths(split), table.targets(split), transform, **kwargs)


def find_images(paths) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image-looking files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS))
        elif p.exists():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    return out
