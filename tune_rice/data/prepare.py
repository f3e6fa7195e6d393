"""Scan a labelled image set and write labels.csv with a leakage-safe, stratified split.

``DATA_DIR/<class>/**/<image>`` -> ``DATA_DIR/labels.csv`` with the columns ``path`` (relative to
DATA_DIR, POSIX separators), ``label``, ``split`` (train/valid/test), ``group``, ``width``, ``height``,
``sha1``, ``dhash``. Read it back with ``data.read_labels(csv, root=DATA_DIR)``. Two other layouts
(:func:`read_source`): a pre-split ``DATA_DIR/{train,val|valid,test}/<class>/...``, whose split is kept
(its copies across splits go to ``leakage.csv``), and a CSV of image paths and labels (``train.csv``),
whose labels go beside it (``train.labels.csv``).

Every candidate file is decoded (a file that will not decode is skipped and reported, never a crash
later in the search). Exact copies (same SHA-1 of the bytes) and near copies (found by perceptual
hashes, then verified on aligned thumbnails: :mod:`tune_rice.data.dedup`) are put in one group, and a group
never straddles two splits: a photo and its re-saved, brightened, cropped or flipped copy in train and
test would make the test score a memory test. Every grouped pair, with its scores, goes to
``duplicates.csv`` beside labels.csv. No image is copied, moved or changed; nothing is written into
the class folders.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import stat
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from .. import UserError, cli
from ..records import ARGS_FILE, LABELS_FILE
from . import dedup
from . import images as data

log = logging.getLogger(__name__)

COLUMNS = ("path", "label", "split", "group", "width", "height", "sha1", "dhash")
# A near-duplicate group larger than this share of its class is reported: more likely a set of
# look-alike photos than copies of one.
LARGE_GROUP_SHARE = 0.05
MIN_GROUPS_PER_CLASS = len(data.SPLITS)  # one group in each of train/valid/test
# JPEGs are decoded at a reduced DCT scale (the whole file is still read and checked, which is what
# catches truncation); the hashes and the thumbnail of the near-copy check need at most 72 px.
_DRAFT_SIZE = 128
_MAX_LISTED = 50
# Metadata folders that archivers and file browsers leave behind; never classes.
_JUNK_NAMES = frozenset({"__MACOSX"})
# The folders of a pre-split tree (any case) and the split each holds.
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "val": "valid",
    "valid": "valid",
    "validation": "valid",
    "test": "test",
    "testing": "test",
}
# Column names a CSV of images and labels commonly uses, in order of preference (compared in lower case,
# spaces and hyphens as underscores).
PATH_COLUMNS = (
    "path",
    "filepath",
    "file_path",
    "image_path",
    "filename",
    "file_name",
    "file",
    "image",
    "image_id",
    "image_name",
    "img",
    "id",
)
LABEL_COLUMNS = ("label", "labels", "class", "class_name", "category", "disease", "target", "species")
LEAKAGE_COLUMNS = ("path_a", "split_a", "label_a", "path_b", "split_b", "label_b", "check", "similarity")


# ------------------------------------------------------------------------------------------ hashing
def dhash(image: Image.Image) -> int:
    """64-bit difference hash of an image: greyscale, 9x8 thumbnail, bit = (pixel > its left neighbour).

    Robust to re-encoding, resizing, brightness changes and small shifts; two hashes within a few bits
    of each other (Hamming distance) are near copies. Bits are row-major, the first comparison is the
    most significant bit.
    """
    grey = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    px = np.asarray(grey, dtype=np.int16)  # (8, 9)
    bits = (px[:, 1:] > px[:, :-1]).ravel()  # (64,)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


# ------------------------------------------------------------------------------------------ scanning
@dataclass
class Candidate:
    """A file that looks like an image: ``rel`` is its POSIX path relative to DATA_DIR."""

    rel: str
    label: str
    path: Path
    split: str | None = None  # the split its folder names (a pre-split tree); None: split here


@dataclass
class Scan:
    """What the folder walk (or the CSV) found, before decoding. ``data_dir`` is the folder the paths
    are relative to; ``layout`` is ``folders`` (one folder per class), ``presplit`` (train/, valid/,
    test/, each with class folders; ``split_folders`` maps each split to its folder) or ``csv``."""

    data_dir: Path
    classes: list[str]  # class folders (sorted), including ones that turn out empty
    candidates: list[Candidate]
    skipped: list[tuple[str, str]]  # (relative path, reason)
    layout: str = "folders"
    split_folders: dict[str, str] = field(default_factory=dict)
    csv: Path | None = None  # the CSV read (layout csv)
    columns: tuple[str, str] = ("", "")  # its path and label columns
    notes: list[str] = field(default_factory=list)  # one line each, for the report


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_NAMES


def _bad_name(name: str) -> bool:
    """A name that labels.csv (UTF-8) cannot hold: bytes that are not UTF-8 decode to surrogates."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_data_dir(data_dir: str | os.PathLike) -> Path:
    data_dir = Path(data_dir).expanduser()
    if not data_dir.exists():
        raise UserError(f"{data_dir}: dataset folder not found")
    if not data_dir.is_dir():
        raise UserError(
            f"{data_dir}: not a folder or a CSV (expected a folder with one subfolder per class, "
            "train/ valid/ test/ folders of them, or a CSV of image paths and labels)"
        )
    return data_dir.resolve()


def scan_dataset(data_dir: str | os.PathLike) -> Scan:
    """Walk ``DATA_DIR/<class>/...`` and sort every entry into a candidate image or a skipped file.

    Hidden entries (``.DS_Store``, ``.git``, ``__MACOSX``) and files without an image extension are
    skipped with a reason; symlinks are followed (a broken one is reported), symlinked folders too,
    once each. Nothing is decoded here; see :func:`inspect_images`.
    """
    root = check_data_dir(data_dir)
    classes: list[str] = []
    candidates: list[Candidate] = []
    skipped: list[tuple[str, str]] = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if _is_hidden(entry.name):
            # A hidden top-level file (.DS_Store, the demo's marker) is not data: ignored quietly, like
            # labels.csv. A hidden folder could be a class the user expects: reported.
            if _is_dir(entry):
                skipped.append((entry.name, "hidden folder"))
        elif _bad_name(entry.name):
            if _is_dir(entry) or Path(entry.name).suffix.lower() in data.IMAGE_EXTENSIONS:
                skipped.append((_printable(entry.name), "name is not valid UTF-8"))
        elif _is_dir(entry):
            classes.append(entry.name)
        elif Path(entry.name).suffix.lower() in data.IMAGE_EXTENSIONS:
            skipped.append((entry.name, "not inside a class folder"))
        # other top-level files (labels.csv, README) are not part of the data set: ignored quietly
    split_folders = _split_folders(root, classes)
    if split_folders:
        return _scan_presplit(root, split_folders, skipped)
    for label in classes:
        seen: set[tuple[int, int]] = set()
        _walk(root / label, label, label, seen, candidates, skipped)
    return Scan(data_dir=root, classes=classes, candidates=candidates, skipped=skipped)


def _split_folders(root: Path, folders: list[str]) -> dict[str, str]:
    """``{split: folder}`` when the top-level folders are split folders (train/, val/ or valid/, test/),
    each holding class folders; ``{}`` for one folder per class."""
    named = {f: SPLIT_FOLDERS[f.lower()] for f in folders if f.lower() in SPLIT_FOLDERS}
    if not named or not any(_has_subfolder(root / f) for f in named):
        return {}  # no split names, or a class that happens to be called "test" (images right inside)
    others = [f for f in folders if f not in named]
    if others:
        raise UserError(
            f"{root}: split folders ({', '.join(named)}) beside other folders ({', '.join(others[:3])}); "
            "expected either one folder per class, or train/, valid/ (or val/), test/ each with class folders"
        )
    by_split: dict[str, str] = {}
    for folder, split in named.items():
        if split in by_split:
            raise UserError(f"{root}: two folders for the {split} split ({by_split[split]}, {folder}); keep one")
        by_split[split] = folder
    return {s: by_split[s] for s in data.SPLITS if s in by_split}


def _has_subfolder(folder: Path) -> bool:
    try:
        return any(_is_dir(e) and not _is_hidden(e.name) for e in os.scandir(folder))
    except OSError:
        return False


def _scan_presplit(root: Path, split_folders: dict[str, str], skipped: list[tuple[str, str]]) -> Scan:
    """A pre-split tree: ``root/<split folder>/<class>/...``; each candidate keeps its folder's split."""
    candidates: list[Candidate] = []
    classes: set[str] = set()
    for split, folder in split_folders.items():
        for entry in sorted(os.scandir(root / folder), key=lambda e: e.name):
            rel = f"{folder}/{entry.name}"
            if _bad_name(entry.name):
                skipped.append((_printable(rel), "name is not valid UTF-8"))
            elif _is_hidden(entry.name):
                if _is_dir(entry):
                    skipped.append((rel, "hidden folder"))
            elif _is_dir(entry):
                classes.add(entry.name)
                found: list[Candidate] = []
                _walk(Path(entry.path), rel, entry.name, set(), found, skipped)
                candidates.extend(dataclasses.replace(c, split=split) for c in found)
            elif Path(entry.name).suffix.lower() in data.IMAGE_EXTENSIONS:
                skipped.append((rel, "not inside a class folder"))
    return Scan(
        data_dir=root,
        classes=sorted(classes),
        candidates=candidates,
        skipped=skipped,
        layout="presplit",
        split_folders=split_folders,
    )


# ---------------------------------------------------------------------------------------------- CSV
def read_csv_source(
    csv_path: str | os.PathLike,
    *,
    path_col: str | None = None,
    label_col: str | None = None,
    image_dir: str | os.PathLike | None = None,
) -> Scan:
    """A CSV of image paths and labels (a Kaggle-style ``train.csv``) as a :class:`Scan`.

    Columns are found among the usual names (``PATH_COLUMNS``, ``LABEL_COLUMNS``, any case) unless
    named. Paths are relative to ``image_dir`` (default: the CSV's folder), which is also the folder
    the labels.csv paths will be relative to; an id without an image extension is matched to the one
    image file of that name. Rows that name no usable file are skipped with a reason, never fatal.
    """
    csv_path = Path(csv_path).expanduser().resolve()
    try:
        with open(csv_path, encoding="utf-8-sig") as f:
            header = f.readline()
        sep = max((",", ";", "\t"), key=header.count)  # Excel writes ';' in some locales
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig", sep=sep)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{csv_path}: not a readable CSV ({str(e).splitlines()[0]})") from None
    pcol = _find_column(csv_path, frame, path_col, PATH_COLUMNS, "--path-col", "path")
    lcol = _find_column(csv_path, frame, label_col, LABEL_COLUMNS, "--label-col", "label")
    if image_dir is None:
        root = csv_path.parent
    else:
        root = Path(image_dir).expanduser().resolve()
        if not root.is_dir():
            raise UserError(f"{image_dir}: image folder not found")
    candidates, skipped = _csv_rows(list(zip(frame[pcol], frame[lcol])), root)
    if not candidates:
        example = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise UserError(f"{csv_path}: none of its {len(frame)} rows names an image under {root}{example}")
    classes = sorted({c.label for c in candidates})
    scan = Scan(
        data_dir=root,
        classes=classes,
        candidates=candidates,
        skipped=skipped,
        layout="csv",
        csv=csv_path,
        columns=(pcol, lcol),
    )
    disagree = [c for c in candidates if _folder_label(c.rel, classes) not in (None, c.label)]
    if disagree:
        shown = "; ".join(f"{c.rel} is labelled {c.label!r}" for c in disagree[:2])
        scan.notes.append(
            f"{len(disagree)} row(s) of {csv_path.name} give a label other than their class folder's "
            f"(e.g. {shown}); the CSV's label is used"
        )
    return scan


def _find_column(
    csv_path: Path, frame: pd.DataFrame, named: str | None, usual: Sequence[str], option: str, what: str
) -> str:
    if named is not None:
        if named not in frame.columns:
            raise UserError(f"{csv_path}: no column {named!r} ({option}); its columns: {', '.join(frame.columns)}")
        return named
    by_key = {str(c).strip().lower().replace(" ", "_").replace("-", "_"): c for c in frame.columns}
    for key in usual:
        if key in by_key:
            return str(by_key[key])
    for key in usual:  # "Disease Label", "image_file_path"
        suffixed = [c for k, c in by_key.items() if k.endswith("_" + key)]
        if len(suffixed) == 1:
            return str(suffixed[0])
    raise UserError(
        f"{csv_path}: no {what} column among its columns ({', '.join(map(str, frame.columns))}); "
        f"looked for {', '.join(usual)}: name it with {option}"
    )


def _csv_rows(rows: list[tuple[str, str]], root: Path) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Each (path, label) row as a candidate under ``root``, or a skipped (path, reason)."""
    listings: dict[Path, tuple[set[str], dict[str, list[str]]]] = {}
    candidates: list[Candidate] = []
    skipped: list[tuple[str, str]] = []
    first_label: dict[str, str] = {}
    index: dict[str, list[Path]] | None = None
    for k, (raw, label) in enumerate(rows):
        raw, label = raw.strip(), label.strip()
        shown = raw or f"row {k + 2}"
        if not raw:
            skipped.append((shown, "empty path"))
            continue
        if not label:
            skipped.append((shown, "no label"))
            continue
        posix = raw.replace("\\", "/")
        full = Path(os.path.normpath(root / posix))
        inside = full == root or root in full.parents
        names, by_stem = (
            (listings.get(full.parent) or listings.setdefault(full.parent, _listing(full.parent)))
            if inside
            else (set(), {})
        )
        if full.name in names:
            if full.suffix.lower() not in data.IMAGE_EXTENSIONS:
                skipped.append((shown, "not an image extension"))
                continue
            found = [full]
        else:  # an image id without its extension
            found = [full.parent / n for n in by_stem.get(full.name, [])]
        if not found and ("/" not in posix or not (inside and full.parent.is_dir())):
            # a bare name or id of a file in a subfolder (images/, train_images/), or a path written on
            # another machine (/kaggle/input/...): the one image of that name under root
            index = index if index is not None else _image_index(root)
            found = index.get(full.name, []) or index.get(full.name + "\0", [])
        if len(found) != 1:
            listed = ", ".join(sorted(p.relative_to(root).as_posix() for p in found)[:3])
            missing = "file not found" if inside else f"not under the image folder {root}"
            skipped.append((shown, f"ambiguous: {listed}" if found else missing))
            continue
        rel = found[0].relative_to(root).as_posix()
        if rel in first_label:
            again = "" if first_label[rel] == label else f" with another label ({label!r}; kept {first_label[rel]!r})"
            skipped.append((shown, f"listed again{again}"))
            continue
        first_label[rel] = label
        candidates.append(Candidate(rel=rel, label=label, path=found[0]))
    return candidates, skipped


def _image_index(root: Path) -> dict[str, list[Path]]:
    """Every image file under ``root`` by its name and (key ``stem + NUL``) by its stem; hidden folders
    are not entered. Built once, only when a CSV names files by bare name or id outside its folder."""
    index: dict[str, list[Path]] = {}
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop or a folder linked twice
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d) and not _bad_name(d))
        for name in files:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in data.IMAGE_EXTENSIONS and not _bad_name(name):
                path = Path(folder) / name
                index.setdefault(name, []).append(path)
                index.setdefault(stem + "\0", []).append(path)
    return index


def _listing(folder: Path) -> tuple[set[str], dict[str, list[str]]]:
    """The file names in ``folder`` and, by stem, those with an image extension (one listing per folder,
    not one stat per row: far fewer round trips on network file systems)."""
    names: set[str] = set()
    by_stem: dict[str, list[str]] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return names, by_stem
    for e in entries:
        if _bad_name(e.name) or not e.is_file():
            continue
        names.add(e.name)
        stem, suffix = os.path.splitext(e.name)
        if suffix.lower() in data.IMAGE_EXTENSIONS:
            by_stem.setdefault(stem, []).append(e.name)
    return names, by_stem


def _folder_label(rel: str, classes: Sequence[str]) -> str | None:
    """The class its folder names, if its folder is named after a class."""
    parts = rel.split("/")
    return parts[-2] if len(parts) > 1 and parts[-2] in classes else None


def read_source(
    source: str | os.PathLike,
    *,
    path_col: str | None = None,
    label_col: str | None = None,
    image_dir: str | os.PathLike | None = None,
) -> Scan:
    """A class-folder tree, a pre-split tree or a CSV of paths and labels, as a :class:`Scan`."""
    p = Path(source).expanduser()
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv"):
        return read_csv_source(p, path_col=path_col, label_col=label_col, image_dir=image_dir)
    if path_col is not None or label_col is not None or image_dir is not None:
        raise UserError(f"{p}: --path-col, --label-col and --image-dir are for a CSV input, not a folder")
    return scan_dataset(p)


def _printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks
    except OSError:
        return False


def _walk(folder: Path, rel: str, label: str, seen: set, candidates: list, skipped: list) -> None:
    try:
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop or a folder linked twice
            skipped.append((rel, "folder already scanned (symlink loop or duplicate link)"))
            return
        seen.add((st.st_dev, st.st_ino))
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        skipped.append((rel, f"cannot read folder ({e.strerror or e})"))
        return
    for entry in entries:
        child_rel = f"{rel}/{entry.name}"
        if _bad_name(entry.name):
            skipped.append((_printable(child_rel), "name is not valid UTF-8"))
            continue
        if _is_hidden(entry.name):
            skipped.append((child_rel, "hidden " + ("folder" if _is_dir(entry) else "file")))
            continue
        try:
            st = os.stat(entry.path)  # follows symlinks
        except OSError as e:
            if entry.is_symlink():
                target = os.readlink(entry.path)
                skipped.append((child_rel, f"broken symlink (-> {target})"))
            else:
                skipped.append((child_rel, f"cannot stat ({e.strerror or e})"))
            continue
        if stat.S_ISDIR(st.st_mode):
            _walk(Path(entry.path), child_rel, label, seen, candidates, skipped)
        elif not stat.S_ISREG(st.st_mode):
            skipped.append((child_rel, "not a regular file"))
        elif Path(entry.name).suffix.lower() not in data.IMAGE_EXTENSIONS:
            skipped.append((child_rel, "not an image extension"))
        else:
            candidates.append(Candidate(rel=child_rel, label=label, path=Path(entry.path)))


@dataclass
class ImageInfo:
    width: int
    height: int
    sha1: str
    dhash: int
    signature: dedup.Signature | None = None  # for the near-copy search; None when it is off


def inspect_image(path: Path, near: bool = True) -> ImageInfo | str:
    """Decode and hash one file; returns its :class:`ImageInfo`, or the reason it is unusable.

    ``near`` also computes its :class:`dedup.Signature`."""
    try:
        digest = hashlib.sha1()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as e:
        return f"cannot read ({e.strerror or e})"
    try:
        image = data.load_image(path, draft_size=_DRAFT_SIZE)
        width, height = _oriented_size(path, image)
        return ImageInfo(
            width=width,
            height=height,
            sha1=digest.hexdigest(),
            dhash=dhash(image),
            signature=dedup.signature(image) if near else None,
        )
    except data.ImageDecodeError as e:
        msg, prefix = str(e), f"{path}: "
        return msg[len(prefix) :] if msg.startswith(prefix) else msg
    except Exception as e:  # noqa: BLE001 -- a malformed file may trip any decoder bug; report, don't crash
        return f"cannot decode ({type(e).__name__}: {e})"


def _oriented_size(path: Path, decoded: Image.Image) -> tuple[int, int]:
    """Full-resolution (width, height) after EXIF orientation; ``decoded`` may be a reduced draft."""
    with Image.open(path) as im:
        if im.format != "JPEG":
            return decoded.size
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def inspect_images(
    paths: Sequence[Path], *, workers: int | None = None, progress: bool = True, near: bool = True
) -> list[ImageInfo | str]:
    """:func:`inspect_image` over many files in a thread pool (decoders and SHA-1 release the GIL)."""
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(16, cpus + 2)  # a couple extra to hide file-system latency
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    results: list[ImageInfo | str] = []
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        tqdm(
            total=len(paths),
            desc="checking images",
            unit="img",
            file=sys.stderr,
            disable=not progress,
            dynamic_ncols=True,
        ) as bar,
    ):
        try:
            for result in pool.map(inspect_image, paths, [near] * len(paths)):
                results.append(result)
                bar.update()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results


# --------------------------------------------------------------------------------------------- split
def split_groups(
    group_class: np.ndarray,
    group_size: np.ndarray,
    fractions: Sequence[float],
    *,
    seed: int = 0,
    classes: Sequence[str],
    allow_small_classes: bool = False,
) -> tuple[np.ndarray, list[str]]:
    """Assign each group to a split, stratified by class; returns (split index per group (G,), warnings).

    Per class (in ``classes`` order, one seeded generator for all): shuffle its groups, order them by
    size, largest first (the shuffle breaks ties), and give each to the split furthest below its target
    ``fraction * images``; the last groups go to any split still empty, so a class with >= 3 groups has
    train, valid and test members. With singleton groups every split lands within one image of target.
    """
    share = np.asarray(fractions, dtype=np.float64)  # (3,) train, valid, test
    rng = np.random.default_rng(seed)
    split_of = np.full(len(group_class), -1, dtype=np.int64)
    warnings: list[str] = []
    small = []
    for c, name in enumerate(classes):
        idx = np.flatnonzero(group_class == c)
        if len(idx) < MIN_GROUPS_PER_CLASS:
            small.append((name, len(idx), int(group_size[idx].sum())))
    if small and not allow_small_classes:
        listed = ", ".join(f"{name!r} has {g} group(s) ({n} image(s))" for name, g, n in small)
        raise UserError(
            f"class(es) too small to split: {listed}; each class needs at least "
            f"{MIN_GROUPS_PER_CLASS} distinct images (after merging near-duplicates) for "
            "train/valid/test; add images or pass --allow-small-classes"
        )
    for c, name in enumerate(classes):
        idx = np.flatnonzero(group_class == c)
        idx = idx[rng.permutation(len(idx))]
        idx = idx[np.argsort(-group_size[idx], kind="stable")]
        if len(idx) < MIN_GROUPS_PER_CLASS:
            split_of[idx] = np.arange(len(idx))  # train, then valid
            missing = data.SPLITS[len(idx) :]
            warnings.append(f"class {name!r} has only {len(idx)} group(s): none in {'/'.join(missing)}")
            continue
        target = share * group_size[idx].sum()
        count = np.zeros(len(share))
        members = np.zeros(len(share), dtype=np.int64)
        for k, g in enumerate(idx):
            empty = np.flatnonzero(members == 0)
            candidates = empty if len(empty) >= len(idx) - k else np.arange(len(share))
            s = candidates[np.argmax((target - count)[candidates])]  # first of ties: train, valid, test
            split_of[g] = s
            count[s] += group_size[g]
            members[s] += 1
    return split_of, warnings


# --------------------------------------------------------------------------------------------- main
@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` did. ``frame`` is exactly what was written to ``labels_csv``."""

    labels_csv: Path
    data_dir: Path
    frame: pd.DataFrame
    classes: list[str]
    skipped: list[tuple[str, str]]  # (path relative to DATA_DIR, reason)
    empty_classes: list[str]
    n_groups_merged: int  # groups with more than one image
    n_images_in_merged: int  # images those groups hold
    cross_class_groups: list[list[tuple[str, str]]] = field(default_factory=list)  # [(path, label)]
    warnings: list[str] = field(default_factory=list)
    dedup: str = "near"  # the --dedup mode
    flips: bool = True  # flipped and turned copies count
    duplicates_csv: Path | None = None  # every grouped pair with its scores
    largest_groups: list[list[str]] = field(default_factory=list)  # the five largest, paths sorted
    n_candidates: int = 0  # candidate pairs checked (near mode)
    n_pairs: dict[str, int] = field(default_factory=dict)  # accepted pairs by check: exact, near
    n_blocked: int = 0  # verified pairs the chain guard kept apart
    layout: str = ""  # where the images and the split came from, one line
    leakage: pd.DataFrame | None = None  # a kept split's copy pairs across splits (LEAKAGE_COLUMNS)
    leakage_csv: Path | None = None

    @property
    def leaks(self) -> int:
        """Copy pairs across a kept split's splits."""
        return 0 if self.leakage is None else len(self.leakage)


def check_fractions(valid_frac: float, test_frac: float) -> tuple[float, float, float]:
    for name, value in (("valid", valid_frac), ("test", test_frac)):
        if not 0 < value < 1:  # also rejects NaN
            raise UserError(
                f"--{name}-frac must be > 0 and < 1, got {value} "
                "(the search needs a valid split and the final score a test split)"
            )
    train = 1.0 - valid_frac - test_frac
    if train <= 0:
        raise UserError(
            f"--valid-frac {valid_frac} + --test-frac {test_frac} must be < 1 (nothing would be left for training)"
        )
    return train, float(valid_frac), float(test_frac)


def resolve_out(data_dir: Path, out: str | os.PathLike | None) -> Path:
    """Where labels.csv goes; refuses a path inside a class folder (or a future one)."""
    out_path = data_dir / LABELS_FILE if out is None else Path(out).expanduser()
    out_path = out_path.parent.resolve() / out_path.name
    if out_path.is_dir():
        raise UserError(f"{out_path}: is a folder; --out needs a file name (e.g. {out_path / 'labels.csv'})")
    try:
        rel = out_path.relative_to(data_dir)
    except ValueError:
        return out_path
    if len(rel.parts) > 1 and not _is_hidden(rel.parts[0]):
        raise UserError(
            f"{out_path}: inside the class folder {rel.parts[0]!r} of {data_dir}; labels.csv "
            "must not be written into class folders (put it at the top of DATA_DIR or elsewhere)"
        )
    if out_path.suffix.lower() in data.IMAGE_EXTENSIONS:
        raise UserError(f"{out_path}: has an image extension; name the labels file *.csv")
    return out_path


def check_dedup(mode: str, min_similarity: float) -> None:
    if mode not in dedup.MODES:
        raise UserError(f"--dedup must be one of {', '.join(dedup.MODES)}, got {mode!r}")
    if not 0 < min_similarity <= 1:  # also rejects NaN
        raise UserError(f"--dup-min-similarity must be > 0 and <= 1, got {min_similarity}")


def duplicates_path(labels_csv: Path) -> Path:
    """Where the grouped pairs go: ``duplicates.csv`` beside ``labels.csv`` (``<stem>.duplicates.csv``
    beside a labels file of another name)."""
    name = "duplicates.csv" if labels_csv.name == LABELS_FILE else f"{labels_csv.stem}.duplicates.csv"
    return labels_csv.with_name(name)


def prepare_dataset(
    data_dir: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    valid_frac: float = 0.15,
    test_frac: float = 0.15,
    seed: int = 0,
    dedup_mode: str = "near",
    min_similarity: float = dedup.DEFAULT_MIN_SIMILARITY,
    flips: bool = True,
    allow_small_classes: bool = False,
    workers: int | None = None,
    progress: bool = True,
    path_col: str | None = None,
    label_col: str | None = None,
    image_dir: str | os.PathLike | None = None,
    resplit: bool = False,
    force: bool = False,
    runs_dir: str | os.PathLike = "runs",
) -> PrepareResult:
    """Scan, validate, group duplicates, split and write labels.csv and duplicates.csv (atomically).

    ``data_dir``: a class-folder tree, a pre-split tree (its split is kept; ``resplit`` makes a fresh
    one) or a CSV of paths and labels (see :func:`read_source`). ``out`` defaults to
    ``DATA_DIR/labels.csv`` (beside the CSV: :func:`default_out`); elsewhere is allowed, and its
    ``path`` column stays relative to DATA_DIR (the CSV's ``image_dir``; read it with
    ``data.read_labels(out, root=DATA_DIR)``). ``dedup_mode``: ``near`` groups exact and verified near
    copies (``min_similarity``: the detail correlation a pair needs; ``flips``: flipped and
    90/180/270-degree turned copies count), ``exact`` byte copies only, ``off`` nothing. An existing
    labels file whose split, classes or files would change is replaced only with ``force``
    (experiments under ``runs_dir`` that used it are named). Raises :class:`UserError` for bad input,
    in which case nothing is written.
    """
    fractions = check_fractions(valid_frac, test_frac)
    check_dedup(dedup_mode, min_similarity)
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    scan = read_source(data_dir, path_col=path_col, label_col=label_col, image_dir=image_dir)
    root = scan.data_dir
    out_path = _checked_scan(scan, data_dir, out, resplit)
    rows, skipped, classes, empty_classes = _usable_rows(scan, workers, progress, near=dedup_mode == "near")
    paths = [r[0] for r in rows]
    labels = np.asarray([classes.index(r[1]) for r in rows])  # (N,)
    grouping = _group_rows(rows, dedup_mode, min_similarity, flips)
    group = grouping.group  # (N,)
    n_groups = int(group.max()) + 1
    group_size = np.bincount(group, minlength=n_groups)  # (G,)
    group_class, votes = _group_classes(group, labels, len(classes))
    warnings: list[str] = list(scan.notes)
    cross = _cross_class_groups(group, votes, labels, classes, paths, warnings)
    warnings.extend(_large_group_warnings(group, group_size, labels, classes, paths))
    given = (  # the folders' split, kept unless --resplit
        np.asarray([data.SPLITS.index(r[3]) for r in rows]) if scan.layout == "presplit" and not resplit else None
    )
    split_row = _split_rows(given, group, labels, group_class, fractions, seed, classes, allow_small_classes, warnings)
    width = max(5, len(str(n_groups - 1)))
    frame = _labels_frame(rows, split_row, group, width)
    check_replace(out_path, frame, force=force, runs_dir=runs_dir)
    leaks = _leakage_frame(grouping, split_row, paths, [r[1] for r in rows])
    kept = scan.layout == "presplit" and not resplit and dedup_mode != "off"
    leakage_csv, dup_path = _write_labels(out_path, frame, leaks if kept else None, grouping, width)
    log.info("wrote %s (%d images, %d classes)", out_path, len(frame), len(classes))
    return PrepareResult(
        labels_csv=out_path,
        data_dir=root,
        frame=frame,
        classes=classes,
        skipped=skipped,
        empty_classes=empty_classes,
        cross_class_groups=cross,
        warnings=warnings,
        dedup=dedup_mode,
        flips=flips,
        duplicates_csv=dup_path,
        **_grouping_counts(grouping, paths),
        layout=_layout_line(scan, resplit, seed, fractions),
        leakage=leaks if leakage_csv is not None else None,
        leakage_csv=leakage_csv,
    )


def _split_rows(
    given: np.ndarray | None,
    group: np.ndarray,
    labels: np.ndarray,
    group_class: np.ndarray,
    fractions,
    seed: int,
    classes: list[str],
    allow_small_classes: bool,
    warnings: list[str],
) -> np.ndarray:
    """Each image's split (N,): the ``given`` one kept (checked), or a fresh group-stratified one; its
    warnings logged and added to ``warnings``."""
    if given is not None:
        split_row, split_warnings = keep_split(given, group, labels, fractions, seed=seed, classes=classes)
        split_warnings = split_warnings + _missing_classes(split_row, labels, classes)
    else:
        group_size = np.bincount(group, minlength=int(group.max()) + 1)  # (G,)
        split_of, split_warnings = split_groups(
            group_class, group_size, fractions, seed=seed, classes=classes, allow_small_classes=allow_small_classes
        )
        split_row = split_of[group]
    for w in split_warnings:
        log.warning(w)
    warnings.extend(split_warnings)
    return split_row


def _write_labels(
    out_path: Path, frame: pd.DataFrame, leaks: pd.DataFrame | None, grouping: dedup.Grouping, width: int
) -> tuple[Path | None, Path]:
    """labels.csv, its duplicates.csv and (for a kept split: ``leaks``) its leakage.csv, each atomically,
    labels last; (the leakage file or None, the duplicates file)."""
    leakage_csv = None
    if leaks is not None:
        leakage_csv = leakage_path(out_path)
        _write_atomic(leaks, leakage_csv)
    dup_path = duplicates_path(out_path)
    paths, labels = list(frame["path"]), list(frame["label"])
    _write_atomic(_duplicates_frame(grouping, grouping.group, paths, labels, width), dup_path)
    _write_atomic(frame, out_path)
    return leakage_csv, dup_path


def _group_rows(rows: list[tuple], dedup_mode: str, min_similarity: float, flips: bool) -> dedup.Grouping:
    """The images' copy groups (by SHA-1 and, in ``near`` mode, by the signatures inspect_images made)."""
    signatures = None
    if dedup_mode == "near":  # inspect_images computed one per image in this mode
        signatures = [sig for r in rows if (sig := r[2].signature) is not None]
        assert len(signatures) == len(rows)
    return dedup.group_images(
        [r[2].sha1 for r in rows], signatures, mode=dedup_mode, min_similarity=min_similarity, flips=flips
    )


def _labels_frame(rows: list[tuple], split_row: np.ndarray, group: np.ndarray, width: int) -> pd.DataFrame:
    """labels.csv's rows: each image's path, label, split, group and what was read of its file."""
    return pd.DataFrame(
        {
            "path": [r[0] for r in rows],
            "label": [r[1] for r in rows],
            "split": [data.SPLITS[s] for s in split_row],
            "group": [f"g{g:0{width}d}" for g in group],
            "width": np.asarray([r[2].width for r in rows], dtype=np.int64),
            "height": np.asarray([r[2].height for r in rows], dtype=np.int64),
            "sha1": [r[2].sha1 for r in rows],
            "dhash": [f"{r[2].dhash:016x}" for r in rows],
        },
        columns=list(COLUMNS),
    )


def _grouping_counts(grouping: dedup.Grouping, paths: list[str]) -> dict:
    """The report's figures on the copy groups: groups of several images, the five largest, pairs by check."""
    group = grouping.group
    group_size = np.bincount(group, minlength=int(group.max()) + 1)  # (G,)
    merged = group_size[group_size > 1]
    biggest = np.argsort(-group_size, kind="stable")[:5]
    checks = [p.check for p in grouping.pairs]
    return {
        "n_groups_merged": len(merged),
        "n_images_in_merged": int(merged.sum()),
        "largest_groups": [sorted(paths[k] for k in np.flatnonzero(group == g)) for g in biggest if group_size[g] > 1],
        "n_candidates": grouping.n_candidates,
        "n_pairs": {c: checks.count(c) for c in ("exact", "near")},
        "n_blocked": grouping.n_blocked,
    }


def _checked_scan(scan: Scan, data_dir, out, resplit: bool) -> Path:
    """Where the labels go, once the scan is known to be one prepare can split (else a UserError)."""
    root = scan.data_dir
    if resplit and scan.layout != "presplit":
        raise UserError(
            f"{data_dir}: --resplit is for a pre-split train/ valid/ test/ tree; this split is made here anyway"
        )
    out_path = resolve_out(root, default_out(scan) if out is None else out)
    if scan.csv is not None and out_path == scan.csv:
        raise UserError(f"{out_path}: is the input CSV; write the labels elsewhere with --out")
    if not scan.classes:
        hint = (
            " (images are at the top level: put them in one folder per class)"
            if any(reason == "not inside a class folder" for _, reason in scan.skipped)
            else ""
        )
        raise UserError(f"{root}: no class folders; expected {root}/<class>/<images>{hint}")
    _require_two_classes(root, {c.label for c in scan.candidates}, scan.classes)
    return out_path


def _usable_rows(
    scan: Scan, workers: int | None, progress: bool, *, near: bool
) -> tuple[list[tuple], list[tuple[str, str]], list[str], list[str]]:
    """Every candidate image inspected (``near``: with its near-copy signature): (rows (path, label, image
    info, given split) of the images that decode, by path; the skipped files with why; the classes left;
    the class folders left empty)."""
    infos = inspect_images([c.path for c in scan.candidates], workers=workers, progress=progress, near=near)
    skipped = list(scan.skipped)
    rows = []
    for cand, info in zip(scan.candidates, infos):
        if isinstance(info, str):
            skipped.append((cand.rel, info))
        else:
            rows.append((cand.rel, cand.label, info, cand.split))
    rows.sort(key=lambda r: r[0])
    skipped.sort(key=lambda s: s[0])
    present = {label for _, label, _, _ in rows}
    empty_classes = [c for c in scan.classes if c not in present]
    for c in empty_classes:
        log.warning("class folder %r has no usable images: skipped", c)
    _require_two_classes(scan.data_dir, present, scan.classes)
    if skipped:
        log.warning("skipped %d file(s) (listed in the report)", len(skipped))
    return rows, skipped, sorted(present), empty_classes


def _cross_class_groups(group, votes, labels, classes, paths, warnings: list[str]) -> list[list[tuple[str, str]]]:
    """The duplicate groups that hold images of several classes, as (path, class) lists; warned about."""
    cross = []
    for g in np.flatnonzero((votes > 0).sum(axis=1) > 1):
        cross.append([(paths[k], classes[labels[k]]) for k in np.flatnonzero(group == g)])
    if cross:
        msg = (
            f"{len(cross)} duplicate group(s) hold images of different classes (a labelling "
            "problem?); each is kept together in its majority class's split"
        )
        warnings.append(msg)
        log.warning("%s, e.g. %s", msg, _examples(cross[0]))
    return cross


def _group_classes(group: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Each group's class, where its majority goes (ties: the first class by name), and the votes (G, C)."""
    votes = np.zeros((int(group.max()) + 1, n_classes), dtype=np.int64)
    np.add.at(votes, (group, labels), 1)
    return votes.argmax(axis=1), votes


def keep_split(
    given: np.ndarray,
    group: np.ndarray,
    labels: np.ndarray,
    fractions: Sequence[float],
    *,
    seed: int,
    classes: Sequence[str],
) -> tuple[np.ndarray, list[str]]:
    """A pre-split tree's split (index per image (N,)), with a missing valid or test split taken from
    train (by group and class, ``fractions`` of train's images); returns it and one line per missing split."""
    present = set(given.tolist())
    if 0 not in present:
        raise UserError(
            "the split folders hold no train images; a pre-split tree needs a train/ folder of class "
            "folders (or pass --resplit to split all of it afresh)"
        )
    missing = [s for s in (1, 2) if s not in present]
    if not missing:
        return given, []
    train = np.flatnonzero(given == 0)
    local, local_group = np.unique(group[train], return_inverse=True)  # train's groups, renumbered
    group_class, _ = _group_classes(local_group, labels[train], len(classes))
    share = [fractions[s] for s in missing]
    picked, _ = split_groups(
        group_class,
        np.bincount(local_group, minlength=len(local)),
        [1.0 - sum(share), *share],
        seed=seed,
        classes=classes,
        allow_small_classes=True,
    )
    split_row = given.copy()
    split_row[train] = np.asarray([0, *missing])[picked[local_group]]
    notes = [
        f"no {data.SPLITS[s]} folder: {np.sum(split_row == s)} of the {len(train)} train images taken as "
        f"{data.SPLITS[s]} ({fractions[s]:.0%}, by near-copy group and class)"
        for s in missing
    ]
    return split_row, notes


def _missing_classes(split_row: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> list[str]:
    """One line per class that some split lacks."""
    counts = np.zeros((len(classes), len(data.SPLITS)), dtype=np.int64)
    np.add.at(counts, (labels, split_row), 1)
    out = []
    for c, name in enumerate(classes):
        lacking = [data.SPLITS[s] for s in np.flatnonzero(counts[c] == 0)]
        if lacking:
            why = " (the model cannot learn it)" if "train" in lacking else ""
            out.append(f"class {name!r} has no images in {'/'.join(lacking)}{why}")
    return out


def _leakage_frame(
    grouping: dedup.Grouping, split_row: np.ndarray, paths: list[str], labels: list[str]
) -> pd.DataFrame:
    """One row per copy pair whose two images sit in different splits."""
    rows = sorted((p for p in grouping.pairs if split_row[p.i] != split_row[p.j]), key=lambda p: (p.i, p.j))
    return pd.DataFrame(
        {
            "path_a": [paths[p.i] for p in rows],
            "split_a": [data.SPLITS[split_row[p.i]] for p in rows],
            "label_a": [labels[p.i] for p in rows],
            "path_b": [paths[p.j] for p in rows],
            "split_b": [data.SPLITS[split_row[p.j]] for p in rows],
            "label_b": [labels[p.j] for p in rows],
            "check": [p.check for p in rows],
            "similarity": [f"{p.similarity:.3f}" for p in rows],
        },
        columns=list(LEAKAGE_COLUMNS),
    )


def _layout_line(scan: Scan, resplit: bool, seed: int, fractions: Sequence[float]) -> str:
    made = f"split made here (seed {seed}, valid {fractions[1]:g}, test {fractions[2]:g}; copies kept together)"
    if scan.layout == "csv":
        assert scan.csv is not None
        return f"from {scan.csv.name} (columns {scan.columns[0]!r}, {scan.columns[1]!r}); {made}"
    if scan.layout == "presplit":
        folders = ", ".join(f + "/" for f in scan.split_folders.values())
        if resplit:
            return f"pre-split folders {folders} ignored (--resplit); {made}"
        return f"split kept from the folders {folders}"
    return made


def default_out(scan: Scan) -> Path:
    """labels.csv at the top of DATA_DIR; for a CSV, ``<stem>.labels.csv`` beside it."""
    if scan.csv is None:
        return scan.data_dir / LABELS_FILE
    return data.prepared_labels_path(scan.csv)


def leakage_path(labels_csv: Path) -> Path:
    """Where a kept split's cross-split copies go: ``leakage.csv`` beside ``labels.csv``."""
    name = "leakage.csv" if labels_csv.name == LABELS_FILE else f"{labels_csv.stem}.leakage.csv"
    return labels_csv.with_name(name)


# ------------------------------------------------------------------------------------ replacing a split
def check_replace(out_path: Path, frame: pd.DataFrame, *, force: bool, runs_dir: str | os.PathLike) -> None:
    """Refuse to replace ``out_path`` when its split, classes or files would change (unless ``force``),
    naming the experiments under ``runs_dir`` that were trained on it."""
    if force or not out_path.exists():
        return
    try:
        old = pd.read_csv(out_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError):
        old = pd.DataFrame()
    if {"path", "label", "split"} <= set(old.columns):
        change = describe_change(old, frame)
        if not change:
            return
    else:
        change = "it is not a labels file written by prepare"
    users = experiments_using(out_path, runs_dir)
    used = ""
    if users:
        used = f"; experiments trained on it: {', '.join(users[:3])}" + (
            f" and {len(users) - 3} more" if len(users) > 3 else ""
        )
    raise UserError(
        f"{out_path}: exists and would change ({change}){used}; pass --force to replace it, or --out another file"
    )


def describe_change(old: pd.DataFrame, new: pd.DataFrame) -> str:
    """What replacing labels ``old`` by ``new`` changes, in a few words ('' when split, classes and files
    are the same)."""
    before = dict(zip(old["path"], zip(old["label"], old["split"])))
    after = dict(zip(new["path"], zip(new["label"], new["split"])))
    parts = []
    added, gone = len(after.keys() - before.keys()), len(before.keys() - after.keys())
    if added or gone:
        parts.append(f"{added} image(s) added, {gone} removed")
    common = before.keys() & after.keys()
    relabelled = sum(before[p][0] != after[p][0] for p in common)
    moved = sum(before[p][1] != after[p][1] for p in common)
    if relabelled:
        parts.append(f"{relabelled} relabelled")
    if moved:
        parts.append(f"{moved} of {len(common)} moved to another split")
    old_classes, new_classes = set(old["label"]), set(new["label"])
    if old_classes != new_classes:
        parts.append(
            "classes "
            + ", ".join(
                [f"+{c}" for c in sorted(new_classes - old_classes)]
                + [f"-{c}" for c in sorted(old_classes - new_classes)]
            )
        )
    return "; ".join(parts)


def experiments_using(labels_csv: Path, runs_dir: str | os.PathLike) -> list[str]:
    """The experiments under ``runs_dir`` whose saved arguments (search_args.json) read ``labels_csv``:
    by the labels file they recorded, else by their --data (a folder, the file, or a CSV it was prepared from)."""
    found = []
    for args_file in sorted(Path(runs_dir).expanduser().glob(f"*/{ARGS_FILE}")):
        try:
            saved = json.loads(args_file.read_text())
        except (OSError, ValueError):
            continue
        used = saved.get("labels") or saved.get("data")
        if not used:
            continue
        p = Path(used)
        if labels_csv in (p, p / LABELS_FILE) or (
            p.suffix.lower() == ".csv" and labels_csv == data.prepared_labels_path(p)
        ):
            found.append(str(args_file.parent))
    return found


DUPLICATE_COLUMNS = (
    "group",
    "path_a",
    "label_a",
    "path_b",
    "label_b",
    "check",
    "similarity",
    "outline",
    "orientation",
    "joined",
)


def _duplicates_frame(
    grouping: dedup.Grouping, group: np.ndarray, paths: list[str], labels: list[str], width: int
) -> pd.DataFrame:
    """One row per accepted pair: its group, the two images, the check that accepted it and its scores
    (``joined`` is false where the chain guard kept the two groups apart)."""
    rows = sorted(grouping.pairs, key=lambda p: (group[p.i], p.i, p.j))
    return pd.DataFrame(
        {
            "group": [f"g{group[p.i]:0{width}d}" for p in rows],
            "path_a": [paths[p.i] for p in rows],
            "label_a": [labels[p.i] for p in rows],
            "path_b": [paths[p.j] for p in rows],
            "label_b": [labels[p.j] for p in rows],
            "check": [p.check for p in rows],
            "similarity": [f"{p.similarity:.3f}" for p in rows],
            "outline": [f"{p.outline:.3f}" for p in rows],
            "orientation": [p.orientation for p in rows],
            "joined": [str(p.joined).lower() for p in rows],
        },
        columns=list(DUPLICATE_COLUMNS),
    )


def _examples(members: Sequence[tuple[str, str]], k: int = 2) -> str:
    """``a [label] ~ b [label]`` for the first k members, and how many more."""
    shown = " ~ ".join(f"{p} [{label}]" for p, label in members[:k])
    return shown + (f" (+{len(members) - k} more)" if len(members) > k else "")


def _large_group_warnings(
    group: np.ndarray, group_size: np.ndarray, labels: np.ndarray, classes: list[str], paths: list[str]
) -> list[str]:
    """A warning for each group (of 3 or more) larger than LARGE_GROUP_SHARE of its majority class."""
    class_size = np.bincount(labels, minlength=len(classes))
    out = []
    for g in np.flatnonzero(group_size >= 3):
        members = np.flatnonzero(group == g)
        c = int(np.bincount(labels[members]).argmax())
        if group_size[g] > LARGE_GROUP_SHARE * class_size[c]:
            msg = (
                f"a duplicate group of {group_size[g]} images is {group_size[g] / class_size[c]:.0%} of class "
                f"{classes[c]!r} (e.g. {paths[members[0]]}, {paths[members[1]]}): a burst of shots of one "
                "subject, or look-alike photos the check could not tell apart? Review it in "
                "duplicates.csv; a higher --dup-min-similarity joins fewer"
            )
            log.warning(msg)
            out.append(msg)
    return out


def _require_two_classes(root: Path, present: set[str], folders: list[str]) -> None:
    if len(present) >= 2:
        return
    if not present:
        raise UserError(f"{root}: no usable images in any of the {len(folders)} class folder(s) ({', '.join(folders)})")
    only = next(iter(present))
    raise UserError(
        f"{root}: only one class with images ({only!r}); a classifier needs at least 2 class folders with images"
    )


def _write_atomic(frame: pd.DataFrame, out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as f:  # "x": honours umask, never clobbers
            frame.to_csv(f, index=False, lineterminator="\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{out_path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------- report
def format_report(result: PrepareResult) -> str:
    """A plain-text summary: class x split counts, merged groups, skipped files and where the CSV is."""
    frame = result.frame
    lines = [f"{len(frame)} images in {len(result.classes)} classes from {result.data_dir}"]
    if result.layout:
        lines.append(result.layout)
    lines.append("")
    table = pd.crosstab(frame["label"], frame["split"]).reindex(
        index=result.classes, columns=list(data.SPLITS), fill_value=0
    )
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    name_w = max(5, *(len(c) for c in table.index))
    num_w = max(6, len(str(len(frame))) + 1)
    lines.append(f"{'class':<{name_w}}" + "".join(f"{c:>{num_w}}" for c in table.columns))
    for name, row in table.iterrows():
        lines.append(f"{name:<{name_w}}" + "".join(f"{int(v):>{num_w}}" for v in row))
    lines.append("")
    lines.extend(_duplicate_summary(result))
    lines.extend(_leakage_summary(result))
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} file(s):")
        lines.extend(f"  {p}: {reason}" for p, reason in result.skipped[:_MAX_LISTED])
        if len(result.skipped) > _MAX_LISTED:
            lines.append(f"  ... and {len(result.skipped) - _MAX_LISTED} more")
    else:
        lines.append("skipped files: none")
    if result.empty_classes:
        lines.append(f"class folders skipped (no usable images): {', '.join(result.empty_classes)}")
    if result.warnings:
        lines.append("warnings:")
        lines.extend(f"  {w}" for w in result.warnings)
    lines.append(f"labels written to {result.labels_csv}")
    if result.labels_csv.parent != result.data_dir:  # its paths are relative to DATA_DIR, not to its folder
        lines.append(
            f"its paths are relative to {result.data_dir}: search with "
            f"--data {result.labels_csv} --data-root {result.data_dir}"
        )
    return "\n".join(lines)


def _duplicate_summary(result: PrepareResult) -> list[str]:
    """A few lines: how the groups were made, how many, the largest with examples, the cross-class ones."""
    if result.dedup == "off":
        return ["duplicate groups: none (--dedup off: copies may sit in train and test alike)"]
    how = (
        "exact byte copies only"
        if result.dedup == "exact"
        else "exact and near copies" + (", flips and turns included" if result.flips else ", no flips or turns")
    )
    lines = [
        f"duplicate groups merged: {result.n_groups_merged} (covering {result.n_images_in_merged} images; "
        f"{how}; "
        + (
            "the folders' split kept, copies across it below)"
            if result.leakage is not None
            else "each group kept in one split)"
        )
    ]
    if result.dedup == "near":
        lines.append(
            f"  pairs: {result.n_pairs.get('exact', 0)} exact, {result.n_pairs.get('near', 0)} near "
            f"(verified of {result.n_candidates} candidates), {result.n_blocked} kept apart by the "
            "chain guard"
        )
    if result.largest_groups:
        lines.append(
            "  largest: "
            + "; ".join(
                f"{len(g)} images ({', '.join(g[:2])}{', ...' if len(g) > 2 else ''})" for g in result.largest_groups
            )
        )
    cross = result.cross_class_groups
    if cross:
        lines.append(
            f"  spanning classes: {len(cross)} group(s), {sum(map(len, cross))} images, e.g. "
            f"{_examples(cross[0])}; check these labels"
        )
    if result.duplicates_csv is not None:
        lines.append(f"  every grouped pair with its scores: {result.duplicates_csv}")
    return lines


def _leakage_summary(result: PrepareResult) -> list[str]:
    """A kept split's copies across splits: how many, two examples, where the list is."""
    leaks, where = result.leakage, result.leakage_csv
    if leaks is None or where is None:
        return []
    if leaks.empty:
        return [f"leakage: no copies across splits (checked: {result.dedup} copies)"]
    images = len(set(leaks["path_a"]) | set(leaks["path_b"]))
    shown = "; ".join(
        f"{r.path_a} [{r.split_a}] ~ {r.path_b} [{r.split_b}]" for r in leaks.head(2).itertuples(index=False)
    )
    return [
        f"leakage: {len(leaks)} copy pair(s) across splits ({images} images), e.g. {shown}",
        f"  the kept split scores these copies as unseen; every pair in {where}; --resplit makes a fresh "
        "split that keeps copies together",
    ]


# ------------------------------------------------------------------------------------------ materialize
def check_materialize_target(out_dir: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Refuse an output folder that exists and is not empty, or that lies inside DATA_DIR."""
    out_dir = Path(out_dir).expanduser()
    resolved = out_dir.parent.resolve() / out_dir.name
    root = Path(data_dir).expanduser().resolve()
    if resolved == root or root in resolved.parents:
        raise UserError(
            f"{out_dir}: --materialize folder is inside the dataset folder {root}; choose a folder outside it"
        )
    if resolved.exists():
        if not resolved.is_dir():
            raise UserError(f"{out_dir}: --materialize target exists and is not a folder")
        if any(resolved.iterdir()):
            raise UserError(f"{out_dir}: --materialize folder exists and is not empty")
    return resolved


def materialize(result: PrepareResult, out_dir: str | os.PathLike) -> dict[str, int]:
    """Lay the split out as ``OUT_DIR/<split>/<class>/<file>``: hard links, copies across devices.

    Nested paths are flattened by joining their parts with ``__`` (``blast/field2/a.jpg`` ->
    ``<split>/blast/field2__a.jpg``); a name that still collides gets ``~2``, ``~3`` before its suffix.
    Returns ``{"linked": n, "copied": m}``.
    """
    out_dir = check_materialize_target(out_dir, result.data_dir)
    counts = {"linked": 0, "copied": 0}
    used: set[Path] = set()
    for rel, label, split in result.frame[["path", "label", "split"]].itertuples(index=False):
        parts = rel.split("/")
        flat = "__".join(parts[1:])
        dst = out_dir / split / label / flat
        k = 1
        while dst in used:
            k += 1
            stem, suffix = os.path.splitext(flat)
            dst = out_dir / split / label / f"{stem}~{k}{suffix}"
        used.add(dst)
        src = result.data_dir / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
                counts["linked"] += 1
            except OSError:  # EXDEV across devices, or a file system without hard links
                shutil.copy2(src, dst)
                counts["copied"] += 1
        except OSError as e:
            raise UserError(f"{dst}: cannot link or copy {src} ({e.strerror or e})") from None
    log.info(
        "materialised %d files in %s (%d hard links, %d copies)",
        len(result.frame),
        out_dir,
        counts["linked"],
        counts["copied"],
    )
    return counts


# ------------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=os.environ.get("TUNE_RICE_PROG", "python -m tune_rice prepare"),
        description="Read a dataset (DATA_DIR/<class>/..., a pre-split DATA_DIR/{train,valid,test}/<class>/..., "
        "or a CSV of image paths and labels), check that every image decodes, group exact and "
        "near-duplicate images, and write labels.csv with a group-aware, class-stratified "
        "train/valid/test split (a pre-split tree keeps its own, with its cross-split copies listed in "
        "leakage.csv). Images are never copied or modified.",
    )
    _input_args(p.add_argument_group("what to read"))
    _output_args(p.add_argument_group("what to write"))
    _split_args(p.add_argument_group("the split"))
    _copy_args(p.add_argument_group("near copies (grouped into one split)"))
    cli.add_num_workers_arg(p, help="decoding threads (default: CPUs + 2, at most 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _input_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "data_dir",
        metavar="DATA",
        help="folder with one subfolder per class; or with train/, valid/ (or val/), test/ folders of "
        "them; or a CSV with a path and a label column",
    )
    g.add_argument(
        "--path-col",
        metavar="NAME",
        help=f"CSV input: the column of image paths or ids (default: the first of {', '.join(PATH_COLUMNS)})",
    )
    g.add_argument(
        "--label-col",
        metavar="NAME",
        help=f"CSV input: the column of labels (default: the first of {', '.join(LABEL_COLUMNS)})",
    )
    g.add_argument(
        "--image-dir",
        metavar="DIR",
        help="CSV input: the folder its paths are relative to (default: the CSV's folder)",
    )


def _output_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help="where to write labels.csv (default: DATA_DIR/labels.csv, or NAME.labels.csv beside NAME.csv); paths in it "
        "stay relative to DATA_DIR (elsewhere: search and evaluate then need --data-root DATA_DIR)",
    )
    g.add_argument(
        "--force",
        action="store_true",
        help="replace an existing labels file even when its split, classes or files would change",
    )
    g.add_argument(
        "--materialize",
        metavar="OUT_DIR",
        default=None,
        help="also lay out OUT_DIR/{train,valid,test}/<class>/ as hard links (copies across "
        "devices); OUT_DIR must be empty or new, and outside DATA_DIR",
    )


def _split_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--resplit",
        action="store_true",
        help="pre-split tree: ignore its train/valid/test folders and make a fresh grouped split",
    )
    g.add_argument(
        "--valid-frac", type=float, default=0.15, help="fraction of each class's images for valid, > 0 (default 0.15)"
    )
    g.add_argument(
        "--test-frac",
        type=float,
        default=0.15,
        help="fraction of each class's images for test, > 0 (default 0.15); the rest is train",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split (default 0); the same seed gives a byte-identical labels.csv",
    )
    g.add_argument(
        "--allow-small-classes",
        action="store_true",
        help="accept classes with fewer than 3 distinct images (they get no valid/test member)",
    )


def _copy_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--dedup",
        default="near",
        metavar="MODE",
        help="which copies share a split: near (default) = exact byte copies and near copies "
        "(re-encoded, resized, brightened, cropped, shifted, flipped, turned), found by "
        "perceptual hashes and each verified on aligned thumbnails; exact = byte copies "
        "only; off = no grouping (copies can leak from train into test)",
    )
    g.add_argument(
        "--dup-min-similarity",
        type=float,
        default=dedup.DEFAULT_MIN_SIMILARITY,
        metavar="S",
        help="near mode: how alike two images' fine detail must be, after the best alignment, "
        "to count as copies: the correlation (0-1] of their locally normalised 72 px "
        f"greyscale thumbnails (default {dedup.DEFAULT_MIN_SIMILARITY}); higher joins fewer "
        "pairs, lower catches more heavily edited copies",
    )
    g.add_argument(
        "--dup-no-flips",
        action="store_true",
        help="near mode: a flipped or 90/180/270-degree turned copy is not a copy (by default "
        "it is: many public sets ship such augmented copies beside the originals)",
    )
    g.add_argument("--dup-threshold", type=float, default=None, help=argparse.SUPPRESS)  # the old knob


def _main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    if args.materialize is not None:  # refuse before any work, so nothing is written on error
        source = Path(args.data_dir).expanduser()
        target = (Path(args.image_dir) if args.image_dir else source.parent) if source.is_file() else source
        check_materialize_target(args.materialize, check_data_dir(target))
    if args.dup_threshold is not None:
        raise UserError(
            "--dup-threshold (bits of a difference hash) was replaced by --dup-min-similarity "
            "(near copies are now verified on aligned thumbnails; see --help)"
        )
    result = prepare_dataset(
        args.data_dir,
        out=args.out,
        valid_frac=args.valid_frac,
        test_frac=args.test_frac,
        seed=args.seed,
        dedup_mode=args.dedup,
        min_similarity=args.dup_min_similarity,
        flips=not args.dup_no_flips,
        allow_small_classes=args.allow_small_classes,
        workers=args.num_workers,
        progress=not args.no_progress,
        path_col=args.path_col,
        label_col=args.label_col,
        image_dir=args.image_dir,
        resplit=args.resplit,
        force=args.force,
    )
    print(format_report(result))
    if args.materialize is not None:
        counts = materialize(result, args.materialize)
        print(
            f"split laid out in {Path(args.materialize).resolve()} "
            f"({counts['linked']} hard links, {counts['copied']} copies)"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
