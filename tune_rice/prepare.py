"""Scan a folder-per-class image set and write labels.csv with a leakage-safe, stratified split.

``DATA_DIR/<class>/**/<image>`` -> ``DATA_DIR/labels.csv`` with the columns ``path`` (relative to
DATA_DIR, POSIX separators), ``label``, ``split`` (train/valid/test), ``group``, ``width``, ``height``,
``sha1``, ``dhash``. Read it back with ``data.read_labels(csv, root=DATA_DIR)``.

Every candidate file is decoded (a file that will not decode is skipped and reported, never a crash
later in the search). Exact copies (same SHA-1 of the bytes) and near copies (found by perceptual
hashes, then verified on aligned thumbnails: :mod:`tune_rice.dedup`) are put in one group, and a group
never straddles two splits: a photo and its re-saved, brightened, cropped or flipped copy in train and
test would make the test score a memory test. Every grouped pair, with its scores, goes to
``duplicates.csv`` beside labels.csv. No image is copied, moved or changed; nothing is written into
the class folders.
"""

from __future__ import annotations

import argparse
import hashlib
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

from . import UserError, cli, data, dedup

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


@dataclass
class Scan:
    """What the folder walk found, before decoding."""

    data_dir: Path
    classes: list[str]  # class folders (sorted), including ones that turn out empty
    candidates: list[Candidate]
    skipped: list[tuple[str, str]]  # (relative path, reason)


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
        raise UserError(f"{data_dir}: not a folder (expected a folder with one subfolder per class)")
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
    for label in classes:
        seen: set[tuple[int, int]] = set()
        _walk(root / label, label, label, seen, candidates, skipped)
    return Scan(data_dir=root, classes=classes, candidates=candidates, skipped=skipped)


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
    out_path = data_dir / "labels.csv" if out is None else Path(out).expanduser()
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
    name = "duplicates.csv" if labels_csv.name == "labels.csv" else f"{labels_csv.stem}.duplicates.csv"
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
) -> PrepareResult:
    """Scan, validate, group duplicates, split and write labels.csv and duplicates.csv (atomically).

    ``out`` defaults to ``DATA_DIR/labels.csv``; elsewhere is allowed, and its ``path`` column stays
    relative to DATA_DIR (read it with ``data.read_labels(out, root=DATA_DIR)``). ``dedup_mode``:
    ``near`` groups exact and verified near copies (``min_similarity``: the detail correlation a pair
    needs; ``flips``: flipped and 90/180/270-degree turned copies count), ``exact`` byte copies only,
    ``off`` nothing. Raises :class:`UserError` for bad input, in which case nothing is written.
    """
    fractions = check_fractions(valid_frac, test_frac)
    check_dedup(dedup_mode, min_similarity)
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    root = check_data_dir(data_dir)
    out_path = resolve_out(root, out)
    scan = scan_dataset(root)
    if not scan.classes:
        hint = (
            " (images are at the top level: put them in one folder per class)"
            if any(reason == "not inside a class folder" for _, reason in scan.skipped)
            else ""
        )
        raise UserError(f"{root}: no class folders; expected {root}/<class>/<images>{hint}")
    _require_two_classes(root, {c.label for c in scan.candidates}, scan.classes)

    infos = inspect_images(
        [c.path for c in scan.candidates], workers=workers, progress=progress, near=dedup_mode == "near"
    )
    skipped = list(scan.skipped)
    rows = []
    for cand, info in zip(scan.candidates, infos):
        if isinstance(info, str):
            skipped.append((cand.rel, info))
        else:
            rows.append((cand.rel, cand.label, info))
    rows.sort(key=lambda r: r[0])
    skipped.sort(key=lambda s: s[0])
    present = {label for _, label, _ in rows}
    empty_classes = [c for c in scan.classes if c not in present]
    for c in empty_classes:
        log.warning("class folder %r has no usable images: skipped", c)
    classes = sorted(present)
    _require_two_classes(root, present, scan.classes)
    if skipped:
        log.warning("skipped %d file(s) (listed in the report)", len(skipped))

    paths = [r[0] for r in rows]
    labels = np.asarray([classes.index(r[1]) for r in rows])  # (N,)
    sha1s = [r[2].sha1 for r in rows]
    signatures = None
    if dedup_mode == "near":  # inspect_images computed one per image in this mode
        signatures = [sig for r in rows if (sig := r[2].signature) is not None]
        assert len(signatures) == len(rows)
    grouping = dedup.group_images(
        sha1s,
        signatures,
        mode=dedup_mode,
        min_similarity=min_similarity,
        flips=flips,
    )
    group = grouping.group  # (N,)
    n_groups = int(group.max()) + 1
    group_size = np.bincount(group, minlength=n_groups)  # (G,)

    # A group goes where its majority class goes (ties: the first class by name).
    votes = np.zeros((n_groups, len(classes)), dtype=np.int64)
    np.add.at(votes, (group, labels), 1)
    group_class = votes.argmax(axis=1)  # (G,)
    warnings: list[str] = []
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
    warnings.extend(_large_group_warnings(group, group_size, labels, classes, paths))

    split_of, split_warnings = split_groups(
        group_class, group_size, fractions, seed=seed, classes=classes, allow_small_classes=allow_small_classes
    )
    for w in split_warnings:
        log.warning(w)
    warnings.extend(split_warnings)

    width = max(5, len(str(n_groups - 1)))
    frame = pd.DataFrame(
        {
            "path": paths,
            "label": [r[1] for r in rows],
            "split": [data.SPLITS[s] for s in split_of[group]],
            "group": [f"g{g:0{width}d}" for g in group],
            "width": np.asarray([r[2].width for r in rows], dtype=np.int64),
            "height": np.asarray([r[2].height for r in rows], dtype=np.int64),
            "sha1": sha1s,
            "dhash": [f"{r[2].dhash:016x}" for r in rows],
        },
        columns=list(COLUMNS),
    )
    dup_path = duplicates_path(out_path)
    _write_atomic(_duplicates_frame(grouping, group, paths, [r[1] for r in rows], width), dup_path)
    _write_atomic(frame, out_path)
    log.info("wrote %s (%d images, %d classes)", out_path, len(frame), len(classes))
    merged = group_size[group_size > 1]
    biggest = np.argsort(-group_size, kind="stable")[:5]
    largest = [sorted(paths[k] for k in np.flatnonzero(group == g)) for g in biggest if group_size[g] > 1]
    checks = [p[2] for p in grouping.pairs]
    return PrepareResult(
        labels_csv=out_path,
        data_dir=root,
        frame=frame,
        classes=classes,
        skipped=skipped,
        empty_classes=empty_classes,
        n_groups_merged=len(merged),
        n_images_in_merged=int(merged.sum()),
        cross_class_groups=cross,
        warnings=warnings,
        dedup=dedup_mode,
        flips=flips,
        duplicates_csv=dup_path,
        largest_groups=largest,
        n_candidates=grouping.n_candidates,
        n_pairs={c: checks.count(c) for c in ("exact", "near")},
        n_blocked=grouping.n_blocked,
    )


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
    rows = sorted(grouping.pairs, key=lambda p: (group[p[0]], p[0], p[1]))
    return pd.DataFrame(
        {
            "group": [f"g{group[a]:0{width}d}" for a, *_ in rows],
            "path_a": [paths[a] for a, *_ in rows],
            "label_a": [labels[a] for a, *_ in rows],
            "path_b": [paths[b] for _, b, *_ in rows],
            "label_b": [labels[b] for _, b, *_ in rows],
            "check": [p[2] for p in rows],
            "similarity": [f"{p[3]:.3f}" for p in rows],
            "outline": [f"{p[4]:.3f}" for p in rows],
            "orientation": [p[5] for p in rows],
            "joined": [str(p[6]).lower() for p in rows],
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
    lines = [f"{len(frame)} images in {len(result.classes)} classes from {result.data_dir}", ""]
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
        f"{how}; each group kept in one split)"
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
        prog=os.environ.get("TUNE_RICE_PROG", "python -m tune_rice.prepare"),
        description="Scan DATA_DIR/<class>/... (one folder per class), check that every image decodes, "
        "group exact and near-duplicate images, and write labels.csv with a group-aware, "
        "class-stratified train/valid/test split. Images are never copied or modified.",
    )
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder with one subfolder per class")
    p.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help="where to write labels.csv (default: DATA_DIR/labels.csv); paths in it stay "
        "relative to DATA_DIR (elsewhere: search and evaluate then need --data-root DATA_DIR)",
    )
    p.add_argument(
        "--valid-frac", type=float, default=0.15, help="fraction of each class's images for valid, > 0 (default 0.15)"
    )
    p.add_argument(
        "--test-frac",
        type=float,
        default=0.15,
        help="fraction of each class's images for test, > 0 (default 0.15); the rest is train",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the split (default 0); the same seed gives a byte-identical labels.csv",
    )
    p.add_argument(
        "--dedup",
        default="near",
        metavar="MODE",
        help="which copies share a split: near (default) = exact byte copies and near copies "
        "(re-encoded, resized, brightened, cropped, shifted, flipped, turned), found by "
        "perceptual hashes and each verified on aligned thumbnails; exact = byte copies "
        "only; off = no grouping (copies can leak from train into test)",
    )
    p.add_argument(
        "--dup-min-similarity",
        type=float,
        default=dedup.DEFAULT_MIN_SIMILARITY,
        metavar="S",
        help="near mode: how alike two images' fine detail must be, after the best alignment, "
        "to count as copies: the correlation (0-1] of their locally normalised 72 px "
        f"greyscale thumbnails (default {dedup.DEFAULT_MIN_SIMILARITY}); higher joins fewer "
        "pairs, lower catches more heavily edited copies",
    )
    p.add_argument(
        "--dup-no-flips",
        action="store_true",
        help="near mode: a flipped or 90/180/270-degree turned copy is not a copy (by default "
        "it is: many public sets ship such augmented copies beside the originals)",
    )
    p.add_argument("--dup-threshold", type=float, default=None, help=argparse.SUPPRESS)  # the old knob
    p.add_argument(
        "--allow-small-classes",
        action="store_true",
        help="accept classes with fewer than 3 distinct images (they get no valid/test member)",
    )
    p.add_argument(
        "--materialize",
        metavar="OUT_DIR",
        default=None,
        help="also lay out OUT_DIR/{train,valid,test}/<class>/ as hard links (copies across "
        "devices); OUT_DIR must be empty or new, and outside DATA_DIR",
    )
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: CPUs + 2, at most 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    if args.materialize is not None:  # refuse before any work, so nothing is written on error
        check_materialize_target(args.materialize, check_data_dir(args.data_dir))
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
        workers=args.workers,
        progress=not args.no_progress,
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
