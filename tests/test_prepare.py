"""prepare.py: scanning, validation, near-duplicate grouping, the stratified group split and the CLI."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import error_line
from PIL import Image, ImageEnhance

from tune_rice import UserError
from tune_rice.data import images as data
from tune_rice.data import prepare
from tune_rice.data.prepare import format_report, prepare_dataset

SIZE = 64


# ------------------------------------------------------------------------------------------- helpers
def texture(seed: int, size: int = SIZE, margin: int = 8) -> Image.Image:
    """A textured RGB image of (size + 2 * margin) px: smooth random structure at ~size/8 scale.

    Flat colours would all share one difference hash; this has a distinct one per seed (pairs differ
    in ~32 of 64 bits) while shifted or re-encoded copies stay within a few bits.
    """
    rng = np.random.default_rng(seed)
    low = rng.integers(30, 220, (8, 8, 3), dtype=np.uint8)
    full = size + 2 * margin
    big = Image.fromarray(low).resize((full, full), Image.Resampling.BICUBIC)
    noise = rng.integers(-12, 13, (full, full, 3))
    return Image.fromarray((np.asarray(big, dtype=np.int16) + noise).clip(0, 255).astype(np.uint8))


def image(seed: int, size: int = SIZE) -> Image.Image:
    return texture(seed, size).crop((8, 8, 8 + size, 8 + size))


def make_dataset(root: Path, counts: dict[str, int], *, seed0: int = 0) -> list[str]:
    """``root/<class>/img_NNN.jpg`` with distinct textures; returns the relative paths."""
    rels, seed = [], seed0
    for label, n in counts.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            rel = f"{label}/img_{k:03d}.jpg"
            image(seed).save(root / rel, quality=90)
            rels.append(rel)
            seed += 1
    return rels


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = prepare.main([*map(str, argv), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    make_dataset(root, {"blast": 10, "brown_spot": 8, "healthy": 7})
    return root


# --------------------------------------------------------------------------------------- bad files
def test_bad_files_are_reported_and_skipped(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, {"blast": 5, "healthy": 5})
    (root / "blast" / "zero.jpg").write_bytes(b"")
    good = (root / "blast" / "img_000.jpg").read_bytes()
    (root / "blast" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "healthy" / "notes.jpg").write_text("not a photo")
    (root / "healthy" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "healthy" / "readme.txt").write_text("hello")
    (root / "healthy" / "gone.jpg").symlink_to(root / "healthy" / "missing.jpg")
    (root / "healthy" / ".thumbs").mkdir()
    image(900).save(root / "healthy" / ".thumbs" / "t.jpg")  # inside a hidden folder: not used
    (root / "healthy" / "field2").mkdir()
    image(901).save(root / "healthy" / "field2" / "nested.png")  # nested subfolders are fine
    (root / "blast" / "linked.jpg").symlink_to(root.parent / "outside.jpg")  # a good symlink
    image(902).save(root.parent / "outside.jpg")
    (root / "blast" / "upper.JPG").write_bytes(image(903).tobytes())  # right name, raw bytes inside
    with open(os.fsencode(root / "blast") + b"/latin1_\xe9.jpg", "wb") as f:  # not UTF-8: CSV can't hold it
        image(904).save(f, format="JPEG")

    result = prepare_dataset(root, progress=False)

    used = set(result.frame["path"])
    assert len(result.frame) == 12
    assert {"healthy/field2/nested.png", "blast/linked.jpg"} <= used
    skipped = dict(result.skipped)
    assert skipped["blast/zero.jpg"] == "empty file"
    assert "truncated" in skipped["blast/truncated.jpg"]
    assert skipped["healthy/notes.jpg"] == "not an image (unknown format)"
    assert skipped["blast/upper.JPG"] == "not an image (unknown format)"
    assert skipped["healthy/.DS_Store"] == "hidden file"
    assert skipped["healthy/.thumbs"] == "hidden folder"
    assert skipped["healthy/readme.txt"] == "not an image extension"
    assert skipped["healthy/gone.jpg"].startswith("broken symlink")
    assert skipped["blast/latin1_\\xe9.jpg"] == "name is not valid UTF-8"
    assert len(skipped) == 9
    report = format_report(result)
    for rel in skipped:
        assert rel in report
    # labels.csv is readable by the rest of the system, and each listed file decodes
    table = data.read_labels(result.labels_csv)
    assert table.classes == ("blast", "healthy")
    for split in data.SPLITS:
        for path in table.paths(split):
            data.load_image(path)


def test_columns_and_values(dataset):
    result = prepare_dataset(dataset, progress=False)
    frame = read_csv(result.labels_csv)
    assert list(frame.columns) == ["path", "label", "split", "group", "width", "height", "sha1", "dhash"]
    assert list(frame["path"]) == sorted(frame["path"])
    assert set(frame["split"]) == set(data.SPLITS)
    assert (frame["width"] == str(SIZE)).all() and (frame["height"] == str(SIZE)).all()
    assert frame["group"].str.fullmatch(r"g\d{5}").all()
    assert frame["dhash"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert frame["sha1"].str.fullmatch(r"[0-9a-f]{40}").all()
    first = frame.iloc[0]
    assert first["dhash"] == f"{prepare.dhash(data.load_image(dataset / first['path'], draft_size=128)):016x}"
    assert result.labels_csv == dataset.resolve() / "labels.csv"
    assert result.n_groups_merged == 0 and result.skipped == [] and result.empty_classes == []


def test_size_is_full_resolution_after_exif_rotation(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, {"a": 3, "b": 3})
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    texture(77, 400).crop((0, 0, 400, 300)).save(root / "a" / "wide.jpg", exif=exif)
    frame = prepare_dataset(root, progress=False).frame.set_index("path")
    assert (frame.loc["a/wide.jpg", "width"], frame.loc["a/wide.jpg", "height"]) == (300, 400)


def test_empty_class_folder_is_warned_and_skipped(dataset, caplog):
    (dataset / "empty").mkdir()
    (dataset / "only_bad").mkdir()
    (dataset / "only_bad" / "x.jpg").write_bytes(b"")
    result = prepare_dataset(dataset, progress=False)
    assert result.empty_classes == ["empty", "only_bad"]
    assert result.classes == ["blast", "brown_spot", "healthy"]
    assert "no usable images" in caplog.text
    assert "empty, only_bad" in format_report(result)


def test_report_lists_at_most_50_skipped(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, {"a": 3, "b": 3})
    for k in range(55):
        (root / "a" / f"note_{k:02d}.txt").write_text("x")
    report = format_report(prepare_dataset(root, progress=False))
    assert "skipped 55 file(s)" in report
    assert "a/note_49.txt" in report and "a/note_50.txt" not in report
    assert "and 5 more" in report


# ----------------------------------------------------------------------------------- near-duplicates
def _encode(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_near_duplicates_share_a_group_and_a_split(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, {"blast": 12, "healthy": 12}, seed0=100)
    planted = {}
    for k, label in enumerate(["blast", "blast", "healthy", "healthy"]):
        big = texture(500 + k, 256)
        base = big.crop((8, 8, 264, 264))
        folder = root / label / f"set{k}"
        folder.mkdir()
        (folder / "orig.jpg").write_bytes(_encode(base, quality=90))
        (folder / "copy.jpg").write_bytes((folder / "orig.jpg").read_bytes())  # exact copy
        (folder / "q40.jpg").write_bytes(_encode(base, quality=40))  # re-encoded
        (folder / "bright.jpg").write_bytes(_encode(ImageEnhance.Brightness(base).enhance(1.1), quality=90))
        (folder / "shift.jpg").write_bytes(_encode(big.crop((10, 8, 266, 264)), quality=90))  # 2 px
        base.save(folder / "lossless.png")
        planted[k] = [
            f"{label}/set{k}/{n}"
            for n in ("orig.jpg", "copy.jpg", "q40.jpg", "bright.jpg", "shift.jpg", "lossless.png")
        ]

    result = prepare_dataset(root, progress=False, seed=3)
    frame = result.frame.set_index("path")
    for members in planted.values():
        assert frame.loc[members, "group"].nunique() == 1, frame.loc[members]
    # no group straddles two splits
    assert (result.frame.groupby("group")["split"].nunique() == 1).all()
    # the genuinely different images were not merged: 24 singletons + 4 planted groups
    assert result.frame["group"].nunique() == 24 + 4
    assert result.n_groups_merged == 4 and result.n_images_in_merged == 24
    assert result.cross_class_groups == []
    assert "duplicate groups merged: 4 (covering 24 images" in format_report(result)
    pairs = read_csv(result.duplicates_csv)
    assert result.duplicates_csv == result.labels_csv.with_name("duplicates.csv")
    assert list(pairs.columns) == list(prepare.DUPLICATE_COLUMNS)
    groups = result.frame.set_index("path")["group"]
    for row in pairs.itertuples(index=False):
        assert groups[row.path_a] == groups[row.path_b] == row.group or row.joined == "false"
    exact = pairs[pairs["check"] == "exact"]
    assert sorted(zip(exact["path_a"], exact["path_b"])) == [(planted[k][1], planted[k][0]) for k in range(4)]
    near = pairs[pairs["check"] == "near"]
    # a near pair passed the detail check (0.7), or kept its outline (0.8) with strong keypoint agreement
    assert ((near["similarity"].astype(float) >= 0.7) | (near["outline"].astype(float) >= 0.8)).all()


def test_duplicate_across_classes_is_kept_together_and_reported(dataset, caplog):
    src = dataset / "blast" / "img_000.jpg"
    (dataset / "healthy" / "same_as_blast.jpg").write_bytes(src.read_bytes())
    (dataset / "blast" / "again.jpg").write_bytes(src.read_bytes())
    result = prepare_dataset(dataset, progress=False)
    frame = result.frame.set_index("path")
    members = ["blast/img_000.jpg", "blast/again.jpg", "healthy/same_as_blast.jpg"]
    assert frame.loc[members, "group"].nunique() == 1
    assert frame.loc[members, "split"].nunique() == 1
    assert frame.loc["healthy/same_as_blast.jpg", "label"] == "healthy"  # labels are never rewritten
    assert len(result.cross_class_groups) == 1
    assert sorted(p for p, _ in result.cross_class_groups[0]) == sorted(members)
    assert "different classes" in caplog.text
    report = format_report(result)
    assert "spanning classes: 1 group(s), 3 images" in report
    pairs = read_csv(result.duplicates_csv)
    assert {"healthy/same_as_blast.jpg"} <= set(pairs["path_b"]) and (pairs["check"] == "exact").all()


def test_dedup_modes(dataset):
    base = texture(600, 256).crop((8, 8, 264, 264))
    base.save(dataset / "blast" / "big.jpg", quality=90)
    (dataset / "blast" / "copy.jpg").write_bytes((dataset / "blast" / "big.jpg").read_bytes())
    base.save(dataset / "blast" / "reencoded.jpg", quality=50)
    members = ["blast/big.jpg", "blast/copy.jpg", "blast/reencoded.jpg"]
    groups = {}
    for mode in ("near", "exact", "off"):
        result = prepare_dataset(dataset, progress=False, dedup_mode=mode, force=True)
        groups[mode] = result.frame.set_index("path").loc[members, "group"].tolist()
        report = format_report(result)
        if mode == "off":
            assert "--dedup off" in report
    assert len(set(groups["near"])) == 1
    assert groups["exact"][0] == groups["exact"][1] != groups["exact"][2]
    assert len(set(groups["off"])) == 3


def test_summary_is_short_with_many_groups(tmp_path):
    root = tmp_path / "data"
    make_dataset(root, {"a": 30, "b": 30})
    for label in ("a", "b"):
        for k in range(30):  # every image has a byte copy: 60 groups
            src = root / label / f"img_{k:03d}.jpg"
            (root / label / f"dup_{k:03d}.jpg").write_bytes(src.read_bytes())
    result = prepare_dataset(root, progress=False, dedup_mode="exact")
    report = format_report(result)
    start = report.index("duplicate groups merged")
    summary = report[start : report.index("skipped files")].splitlines()
    assert len(summary) <= 6 and max(map(len, summary)) < 400, summary
    assert "60 (covering 120 images" in summary[0]
    assert len(read_csv(result.duplicates_csv)) == 60


# ------------------------------------------------------------------------------------------- splits
def test_stratified_within_one_image_of_target(tmp_path):
    root = tmp_path / "data"
    counts = {"a": 20, "b": 17, "c": 11, "d": 7}
    make_dataset(root, counts)
    fracs = {"train": 0.6, "valid": 0.25, "test": 0.15}
    result = prepare_dataset(root, progress=False, valid_frac=0.25, test_frac=0.15)
    table = pd.crosstab(result.frame["label"], result.frame["split"])
    for label, n in counts.items():
        for split, frac in fracs.items():
            assert abs(table.loc[label, split] - round(frac * n)) <= 1, (label, split, table)


@pytest.mark.parametrize("valid_frac,test_frac", [(0.15, 0.15), (0.1, 0.2), (0.3, 0.3), (0.05, 0.05)])
def test_split_groups_singletons_property(valid_frac, test_frac):
    fractions = (1 - valid_frac - test_frac, valid_frac, test_frac)
    for n in range(3, 80):
        split, warnings = prepare.split_groups(
            np.zeros(n, dtype=int), np.ones(n, dtype=int), fractions, seed=n, classes=["x"]
        )
        counts = np.bincount(split, minlength=3)
        assert (counts >= 1).all(), (n, counts)  # every split gets a member
        expected = np.round(np.asarray(fractions) * n)
        if expected.min() >= 1:  # otherwise "at least one each" overrides the fractions
            assert (np.abs(counts - expected) <= 1).all(), (n, counts, expected)
        assert warnings == []


def test_split_groups_big_groups():
    sizes = np.array([30, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    split, _ = prepare.split_groups(np.zeros(len(sizes), dtype=int), sizes, (0.7, 0.15, 0.15), seed=0, classes=["x"])
    assert split[0] == 0  # the big group goes to train
    counts = np.bincount(split, weights=sizes, minlength=3)
    assert counts[1] >= 1 and counts[2] >= 1
    # only 3 groups, one of them huge: each split still gets one
    split, _ = prepare.split_groups(
        np.zeros(3, dtype=int), np.array([50, 2, 1]), (0.7, 0.15, 0.15), seed=1, classes=["x"]
    )
    assert sorted(split.tolist()) == [0, 1, 2] and split[0] == 0


def test_same_seed_same_bytes_other_seed_other_split(dataset, tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    prepare_dataset(dataset, out=a, seed=7, progress=False, workers=1)
    prepare_dataset(dataset, out=b, seed=7, progress=False, workers=3)
    prepare_dataset(dataset, out=c, seed=8, progress=False)
    assert a.read_bytes() == b.read_bytes()
    assert list(read_csv(a)["split"]) != list(read_csv(c)["split"])
    assert list(read_csv(a)["path"]) == list(read_csv(c)["path"])


def test_out_elsewhere_keeps_paths_relative_to_data_dir(dataset, tmp_path):
    out = tmp_path / "meta" / "new" / "my_labels.csv"
    result = prepare_dataset(dataset, out=out, progress=False)
    assert result.labels_csv == out.resolve() and out.is_file()
    assert not (dataset / "labels.csv").exists()
    table = data.read_labels(out, root=dataset)
    assert all(p.is_file() for p in table.paths("train"))
    assert not list(out.parent.glob(".*.tmp"))  # the temporary file was renamed, not left behind
    # the report says how the tools that read images find them
    assert format_report(result).endswith(f"search with --data {out.resolve()} --data-root {dataset.resolve()}")
    assert "--data-root" not in format_report(prepare_dataset(dataset, progress=False))


def test_allow_small_classes(dataset, caplog):
    (dataset / "rare").mkdir()
    image(999).save(dataset / "rare" / "one.jpg")
    image(998).save(dataset / "rare" / "two.jpg")
    with pytest.raises(UserError, match=r"'rare' has 2 group\(s\).*--allow-small-classes"):
        prepare_dataset(dataset, progress=False)
    result = prepare_dataset(dataset, progress=False, allow_small_classes=True)
    rare = result.frame[result.frame["label"] == "rare"]
    assert sorted(rare["split"]) == ["train", "valid"]
    assert "only 2 group(s): none in test" in caplog.text
    assert "none in test" in format_report(result)


# ------------------------------------------------------------------------------------ materialize
def test_materialize_layout_with_hard_links(dataset, tmp_path, capsys):
    nested = dataset / "healthy" / "field2"
    nested.mkdir()
    image(555).save(nested / "img_000.jpg")  # same file name as healthy/img_000.jpg
    out = tmp_path / "split_view"
    rc, stdout, _ = run_cli(capsys, dataset, "--materialize", out)
    assert rc == 0
    frame = read_csv(dataset / "labels.csv")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert len(files) == len(frame)
    for rel, label, split in frame[["path", "label", "split"]].itertuples(index=False):
        flat = "__".join(rel.split("/")[1:])
        dst = out / split / label / flat
        assert dst.is_file(), dst
        assert os.path.samefile(dst, dataset / rel)  # a hard link, not a copy
    assert any(f.endswith("healthy/field2__img_000.jpg") for f in files)
    assert {p.name for p in out.iterdir()} <= set(data.SPLITS)
    assert "hard links" in stdout
    # a second run refuses the now non-empty folder, and writes nothing
    (dataset / "labels.csv").unlink()
    rc, _, err = run_cli(capsys, dataset, "--materialize", out)
    assert rc == 2 and "not empty" in err
    assert not (dataset / "labels.csv").exists()


# ------------------------------------------------------------------------------------------- the CLI
def test_cli_prints_the_report(dataset, capsys):
    (dataset / "blast" / "broken.jpg").write_bytes(b"")
    rc, out, _ = run_cli(capsys, dataset, "--seed", "1")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == f"25 images in 3 classes from {dataset.resolve()}"
    header = next(line for line in lines if line.startswith("class"))
    assert header.split() == ["class", "train", "valid", "test", "total"]
    frame = read_csv(dataset / "labels.csv")
    for label in ("blast", "brown_spot", "healthy", "total"):
        row = next(line for line in lines if line.startswith(label + " ")).split()[1:]
        rows = frame if label == "total" else frame[frame["label"] == label]
        assert row == [str((rows["split"] == s).sum()) for s in data.SPLITS] + [str(len(rows))]
    assert "blast/broken.jpg: empty file" in out
    assert f"labels written to {dataset.resolve() / 'labels.csv'}" in out


def _error_cases(tmp_path: Path, dataset: Path):
    """(description, argv) for each input the CLI must refuse."""
    one_class = tmp_path / "one_class"
    make_dataset(one_class, {"only": 4}, seed0=300)
    (one_class / "empty").mkdir()
    no_classes = tmp_path / "flat"
    no_classes.mkdir()
    image(1).save(no_classes / "loose.jpg")
    small = tmp_path / "small"
    make_dataset(small, {"a": 5, "b": 2}, seed0=400)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    mixed = tmp_path / "mixed"
    make_dataset(mixed, {"blast": 3}, seed0=500)
    make_dataset(mixed / "train", {"blast": 3}, seed0=510)
    no_label = tmp_path / "list.csv"
    no_label.write_text("file,kind\nblast/img_000.jpg,x\n")
    d = str(dataset)
    return [
        ("missing DATA_DIR", [tmp_path / "nope"], "dataset folder not found"),
        ("DATA_DIR is a file", [a_file], "not a folder"),
        ("no class folders", [no_classes], "no class folders"),
        ("one class", [one_class], "only one class"),
        ("negative fraction", [d, "--valid-frac", "-0.1"], "--valid-frac must be > 0"),
        ("zero test fraction", [d, "--test-frac", "0"], "--test-frac must be > 0"),
        ("no training data", [d, "--valid-frac", "0.5", "--test-frac", "0.5"], "must be < 1"),
        ("small class", [small], "'b' has 2 group(s)"),
        ("out in class folder", [d, "--out", dataset / "blast" / "labels.csv"], "inside the class folder"),
        ("materialize inside data", [d, "--materialize", dataset / "view"], "inside the dataset folder"),
        ("old threshold", [d, "--dup-threshold", "6"], "replaced by --dup-min-similarity"),
        ("bad dedup mode", [d, "--dedup", "fuzzy"], "--dedup must be one of near, exact, off, got 'fuzzy'"),
        ("bad similarity", [d, "--dup-min-similarity", "1.5"], "--dup-min-similarity must be > 0 and <= 1"),
        ("negative seed", [d, "--seed", "-1"], "--seed must be >= 0"),
        ("out is a folder", [d, "--out", tmp_path], "is a folder"),
        ("split and class folders", [mixed], "split folders (train) beside other folders (blast)"),
        ("no label column", [no_label], "no label column among its columns (file, kind)"),
    ]


def test_cli_refuses_bad_input_with_one_line_and_writes_nothing(tmp_path, dataset, capsys):
    (dataset / "labels.csv").write_text("precious\n")
    for name, argv, message in _error_cases(tmp_path, dataset):
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 2, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert message in lines[0], (name, lines[0])
        assert out == "", name
        assert (dataset / "labels.csv").read_text() == "precious\n", name  # not overwritten
        assert not (dataset / "view").exists()
    for folder in tmp_path.iterdir():
        if folder.is_dir() and folder != dataset:
            assert not (folder / "labels.csv").exists(), folder


def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tune_rice.data.prepare", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: dataset folder not found"]


# ------------------------------------------------------------------------------- other layouts: CSV
def test_a_kaggle_style_csv_of_ids_without_extensions(tmp_path, capsys):
    """``train.csv`` with ``Image_ID,Disease Label``, the images in ``images/`` under their ids plus an
    extension: columns found, ids resolved, odd rows skipped with a reason, nothing else written."""
    root = tmp_path / "kaggle"
    (root / "images").mkdir(parents=True)
    rows = []
    for k, label in enumerate(["Bacterial blight"] * 4 + ["Hispa ü"] * 4 + ["brown_spot"] * 4):
        ext = ".JPG" if k % 3 == 0 else ".jpg"
        image(700 + k).save(root / "images" / f"id_{k}{ext}", format="JPEG")
        rows.append((f"id_{k}", label))
    image(800).save(root / "images" / "twin.jpg")
    image(801).save(root / "images" / "twin.png")
    (root / "images" / "notes.txt").write_text("not data")
    image(802).save(root / "images" / "far.jpg")
    rows += [("twin", "brown_spot"), ("gone", "brown_spot"), ("id_0", "brown_spot"), ("", "brown_spot")]
    rows += [("/kaggle/input/rice/train_images/far.jpg", "brown_spot"), ("images/twin.gif", "brown_spot")]
    pd.DataFrame(rows, columns=["Image_ID", "Disease Label"]).to_csv(root / "train.csv", index=False)

    rc, out, _ = run_cli(capsys, root / "train.csv")

    assert rc == 0
    labels = root / "train.labels.csv"
    table = data.read_labels(labels)  # as search reads it: paths relative to the CSV's folder
    assert table.classes == ("Bacterial blight", "Hispa ü", "brown_spot")
    want = [f"images/id_{k}{'.JPG' if k % 3 == 0 else '.jpg'}" for k in range(12)] + ["images/far.jpg"]
    assert sorted(table.frame["path"]) == sorted(want)  # far.jpg: a path written on another machine
    assert table.frame.set_index("path").loc["images/id_0.JPG", "label"] == "Bacterial blight"  # first row kept
    for split in data.SPLITS:
        assert all(p.is_file() for p in table.paths(split)) and len(table.split(split)) >= 3
    assert "from train.csv (columns 'Image_ID', 'Disease Label'); split made here" in out
    assert "twin: ambiguous: images/twin.jpg, images/twin.png" in out
    assert "gone: file not found" in out
    assert "images/twin.gif: file not found" in out  # its folder exists: no guessing by name
    assert "id_0: listed again with another label ('brown_spot'; kept 'Bacterial blight')" in out
    assert "row 17: empty path" in out
    assert "notes.txt" not in out  # a file the CSV does not name is not looked at


def test_a_csv_with_named_columns_an_image_folder_elsewhere_and_a_disagreeing_label(tmp_path, capsys):
    images = tmp_path / "photos"
    rels = make_dataset(images, {"blast": 4, "healthy 2": 4})
    meta = tmp_path / "meta"
    meta.mkdir()
    frame = pd.DataFrame({"file": rels, "label": ["wrong"] * 8, "Truth": [r.split("/")[0] for r in rels]})
    frame.loc[0, "Truth"] = "healthy 2"  # a blast/ photo labelled healthy 2
    frame.to_csv(meta / "list.csv", sep=";", index=False)

    rc, out, _ = run_cli(
        capsys, meta / "list.csv", "--label-col", "Truth", "--image-dir", images, "--allow-small-classes"
    )

    assert rc == 0, out
    table = data.read_labels(meta / "list.labels.csv", root=images)
    assert table.frame.set_index("path").loc[rels[0], "label"] == "healthy 2"
    assert all(p.is_file() for s in data.SPLITS for p in table.paths(s))
    assert (
        f"1 row(s) of list.csv give a label other than their class folder's (e.g. {rels[0]} is labelled 'healthy 2')"
        in out
    )
    assert f"--data {meta / 'list.labels.csv'} --data-root {images.resolve()}" in out
    rc, _, err = run_cli(capsys, meta / "list.csv", "--label-col", "verdict", "--image-dir", images)
    assert rc == 2 and "no column 'verdict' (--label-col); its columns: file, label, Truth" in error_line(err)


# ------------------------------------------------------------------------------- other layouts: pre-split
def make_presplit(root: Path, folders: dict[str, dict[str, int]], seed0: int = 1000) -> None:
    seed = seed0
    for folder, counts in folders.items():
        make_dataset(root / folder, counts, seed0=seed)
        seed += 100


def test_a_presplit_tree_keeps_its_split_and_lists_cross_split_copies(tmp_path, capsys):
    root = tmp_path / "presplit"
    make_presplit(root, {"train": {"a": 6, "b": 6, "c": 4}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2, "c": 2}})
    (root / "test" / "a" / "copy.jpg").write_bytes((root / "train" / "a" / "img_000.jpg").read_bytes())
    data.load_image(root / "train" / "b" / "img_001.jpg").save(root / "val" / "b" / "again.png")  # re-encoded
    (root / "train" / "loose.jpg").write_bytes((root / "train" / "a" / "img_002.jpg").read_bytes())

    rc, out, _ = run_cli(capsys, root)

    assert rc == 0
    frame = read_csv(root / "labels.csv")
    folder_split = {"train": "train", "val": "valid", "test": "test"}
    assert (frame["split"] == frame["path"].str.split("/").str[0].map(folder_split)).all()  # kept as given
    assert set(frame["label"]) == {"a", "b", "c"}
    leaks = read_csv(root / "leakage.csv")
    assert list(leaks.columns) == list(prepare.LEAKAGE_COLUMNS)
    pairs = {frozenset((r.path_a, r.path_b)) for r in leaks.itertuples()}
    assert pairs == {
        frozenset(("test/a/copy.jpg", "train/a/img_000.jpg")),
        frozenset(("val/b/again.png", "train/b/img_001.jpg")),
    }
    assert "split kept from the folders train/, val/, test/" in out
    assert "the folders' split kept, copies across it below" in out and "each group kept in one split" not in out
    assert "leakage: 2 copy pair(s) across splits (4 images)" in out and str(root / "leakage.csv") in out
    assert "class 'c' has no images in valid" in out
    assert "train/loose.jpg: not inside a class folder" in out

    # --resplit: a fresh grouped split (replacing the kept one needs --force)
    rc, _, err = run_cli(capsys, root, "--resplit")
    assert rc == 2 and "would change" in error_line(err) and "--force" in error_line(err)
    rc, out, _ = run_cli(capsys, root, "--resplit", "--force")
    assert rc == 0 and "pre-split folders train/, val/, test/ ignored (--resplit)" in out
    frame = read_csv(root / "labels.csv").set_index("path")
    assert frame.loc["test/a/copy.jpg", "split"] == frame.loc["train/a/img_000.jpg", "split"]
    assert frame.loc["val/b/again.png", "split"] == frame.loc["train/b/img_001.jpg", "split"]
    assert (frame.groupby("group")["split"].nunique() == 1).all()
    assert "leakage" not in out


def test_a_presplit_tree_without_copies_or_a_valid_folder(tmp_path, capsys):
    root = tmp_path / "presplit"
    make_presplit(root, {"Train": {"a": 8, "b": 8}, "Test": {"a": 2, "b": 2}})
    rc, out, _ = run_cli(capsys, root)
    assert rc == 0
    frame = read_csv(root / "labels.csv")
    assert (frame.loc[frame["path"].str.startswith("Test/"), "split"] == "test").all()
    from_train = frame[frame["path"].str.startswith("Train/")]
    assert sorted(from_train["split"].value_counts().items()) == [("train", 14), ("valid", 2)]
    assert "no valid folder: 2 of the 16 train images taken as valid" in out
    assert "leakage: no copies across splits" in out
    assert read_csv(root / "leakage.csv").empty


# ------------------------------------------------------------------------------- changing a split
def test_a_split_that_would_change_is_refused_without_force(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, dataset)[0] == 0
    labels = dataset / "labels.csv"
    before = labels.read_bytes()
    for name, data_arg in (("exp1", dataset), ("exp2", labels), ("other", tmp_path / "elsewhere")):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "search_args.json").write_text(f'{{"data": "{data_arg.resolve()}"}}')
    assert run_cli(capsys, dataset)[0] == 0 and labels.read_bytes() == before  # same split: rewritten as it was
    rc, out, err = run_cli(capsys, dataset, "--seed", "1")
    line = error_line(err)
    assert rc == 2 and out == "" and labels.read_bytes() == before
    assert "moved to another split" in line and "experiments trained on it: runs/exp1, runs/exp2;" in line
    image(4242).save(dataset / "healthy" / "new.jpg")
    rc, _, err = run_cli(capsys, dataset)
    assert rc == 2 and "1 image(s) added, 0 removed" in error_line(err) and labels.read_bytes() == before
    assert run_cli(capsys, dataset, "--seed", "1", "--force")[0] == 0
    assert list(read_csv(labels)["split"]) != list(pd.read_csv(io.BytesIO(before), dtype=str)["split"])
