"""The synthetic rice-leaf generator: layout, determinism, safety of the output folder, the CLI, and that
the classes are actually learnable (a colour-histogram classifier beats chance)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tune_rice import UserError
from tune_rice.data import demo

SIZE = 64


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _marker(root: Path) -> dict:
    return json.loads((root / demo.MARKER).read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A tiny demo set: per_class=8, 64 px, seed 0."""
    return demo.generate_demo(tmp_path_factory.mktemp("demo") / "out", per_class=8, size=SIZE, seed=0)


def test_layout_counts_and_images(small):
    counts = demo.class_counts(8)
    assert sorted(p.name for p in small.iterdir() if p.is_dir()) == sorted(demo.CLASSES)
    for label in demo.CLASSES:
        files = sorted((small / label).iterdir())
        assert len(files) == counts[label]
        assert all(f.suffix == ".jpg" for f in files)
        for f in files:
            with Image.open(f) as im:
                assert im.format == "JPEG"
                assert im.mode == "RGB"
                assert im.size == (SIZE, SIZE)
    # Imbalanced like the real set: Healthy is the largest class, Hispa the smallest.
    assert counts["Healthy"] == max(counts.values()) > counts["BrownSpot"] > counts["LeafBlast"] > counts["Hispa"]
    assert demo.class_counts(200) == {"BrownSpot": 200, "Healthy": 300, "Hispa": 160, "LeafBlast": 180}
    marker = _marker(small)
    assert (marker["per_class"], marker["size"], marker["seed"]) == (8, SIZE, 0)
    assert marker["counts"] == counts
    # Nothing half-written is left next to the output.
    assert [p.name for p in small.parent.iterdir()] == [small.name]


def test_near_duplicates_look_like_their_source(small):
    dups = _marker(small)["near_duplicates"]
    assert len(dups) >= 1
    for d in dups:
        assert d["path"] != d["source"]
        assert d["path"].split("/")[0] == d["source"].split("/")[0]  # same class
        a = np.asarray(Image.open(small / d["path"]), dtype=np.float64)
        b = np.asarray(Image.open(small / d["source"]), dtype=np.float64)
        assert (small / d["path"]).read_bytes() != (small / d["source"]).read_bytes()
        # Closer to its source than to any other image of the class.
        others = [
            p
            for p in (small / d["source"]).parent.glob("*.jpg")
            if p.name not in (Path(d["path"]).name, Path(d["source"]).name)
        ]
        nearest_other = min(np.abs(a - np.asarray(Image.open(p), dtype=np.float64)).mean() for p in others)
        assert np.abs(a - b).mean() < 0.5 * nearest_other


def test_same_seed_is_byte_identical_other_seed_differs(small, tmp_path):
    again = demo.generate_demo(tmp_path / "again", per_class=8, size=SIZE, seed=0)
    assert _snapshot(again) == _snapshot(small)
    other = demo.generate_demo(tmp_path / "other", per_class=8, size=SIZE, seed=1)
    a, b = _snapshot(small), _snapshot(other)
    assert a.keys() == b.keys()  # same layout...
    assert sum(a[k] == b[k] for k in a) == 0  # ...but no file in common


def test_images_do_not_depend_on_the_rest_of_the_set(small):
    # An image depends only on (seed, class, index): not on per_class or on what was drawn before it.
    dups = {d["path"] for d in _marker(small)["near_duplicates"]}
    label, index = "Hispa", next(i for i in range(1, 7) if f"Hispa/hi_{i:04d}.jpg" not in dups)
    arr, quality = demo.render_image(label, index, size=SIZE, seed=0)
    assert demo._jpeg(arr, quality) == (small / f"Hispa/hi_{index:04d}.jpg").read_bytes()
    demo.render_image("Healthy", 1, size=SIZE, seed=0)
    assert np.array_equal(demo.render_image(label, index, size=SIZE, seed=0)[0], arr)


def test_rerun_with_same_params_is_a_no_op(small, caplog):
    before = {p: p.stat().st_mtime_ns for p in small.rglob("*")}
    with caplog.at_level("INFO", logger="tune_rice.data.demo"):
        assert demo.generate_demo(small, per_class=8, size=SIZE, seed=0) == small
    assert "already there" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in small.rglob("*")} == before


def test_refuses_a_foreign_non_empty_folder(tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not yours")
    with pytest.raises(UserError, match="photos") as e:
        demo.generate_demo(out, per_class=2, size=SIZE)
    assert "\n" not in str(e.value)
    assert _snapshot(out) == {"holiday.jpg": b"not yours"}
    assert [p.name for p in tmp_path.iterdir()] == ["photos"]


def test_refuses_a_demo_with_other_params_and_a_file(small, tmp_path):
    before = _snapshot(small)
    with pytest.raises(UserError, match="other parameters"):
        demo.generate_demo(small, per_class=8, size=SIZE, seed=1)
    assert _snapshot(small) == before
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        demo.generate_demo(a_file, per_class=2, size=SIZE)


def test_fills_an_existing_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    demo.generate_demo(out, per_class=2, size=SIZE)
    assert (out / demo.MARKER).is_file()


def test_failed_run_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def flaky(job, *args):
        calls.append(job)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return real(job, *args)

    real = demo._render_job
    monkeypatch.setattr(demo, "_render_job", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        demo.generate_demo(tmp_path / "out", per_class=4, size=SIZE, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_bad_parameters_are_user_errors(tmp_path):
    for kwargs, word in [
        ({"per_class": 0}, "per_class"),
        ({"size": 8}, "size"),
        ({"seed": -1}, "seed"),
        ({"per_class": 2.5}, "per_class"),
    ]:
        with pytest.raises(UserError, match=word):
            demo.generate_demo(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_ensure_demo_uses_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNE_RICE_CACHE", str(tmp_path / "cache"))
    assert demo.default_demo_dir() == tmp_path / "cache" / "demo"
    root = demo.ensure_demo(per_class=2, size=48, seed=3)
    assert root == tmp_path / "cache" / "demo" / "rice-p2-s48-seed3"
    assert _marker(root)["seed"] == 3
    before = _snapshot(root)
    assert demo.ensure_demo(per_class=2, size=48, seed=3) == root
    assert _snapshot(root) == before
    assert (
        demo.ensure_demo(per_class=2, size=48, seed=3, root=tmp_path / "elsewhere")
        == tmp_path / "elsewhere" / "rice-p2-s48-seed3"
    )
    monkeypatch.delenv("TUNE_RICE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.default_demo_dir() == tmp_path / "home" / ".cache" / "tune_rice" / "demo"


def test_workers_do_not_change_the_output(tmp_path):
    one = demo.generate_demo(tmp_path / "one", per_class=3, size=48, seed=5, workers=1)
    two = demo.generate_demo(tmp_path / "two", per_class=3, size=48, seed=5, workers=2)
    assert _snapshot(one) == _snapshot(two)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert demo.main([str(out), "--per-class", "2", "--size", "48", "--seed", "7"]) == 0
    assert _marker(out)["seed"] == 7
    assert demo.main([str(out), "--per-class", "2", "--size", "48", "--seed", "7"]) == 0  # no-op
    capsys.readouterr()
    assert demo.main([str(tmp_path / "bad"), "--per-class", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--per-class" in err and err.count("\n") == 1
    assert demo.main([str(tmp_path / "bad"), "--size", "big"]) == 2
    assert demo.main([]) == 2
    assert not (tmp_path / "bad").exists()
    assert demo.main([str(out), "--per-class", "3", "--size", "48"]) == 2  # someone else's params
    assert demo.main(["--help"]) == 0
    assert "Healthy 1.5N" in capsys.readouterr().out


def _colour_histogram(path: Path, bins: int = 8) -> np.ndarray:
    a = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3) // (256 // bins)
    h = np.bincount((a[:, 0] * bins + a[:, 1]) * bins + a[:, 2], minlength=bins**3)
    return np.sqrt(h / h.sum())  # (bins^3,), square root so rare colours (the marks) count


def test_colour_histogram_nearest_centroid_beats_chance(tmp_path):
    root = demo.generate_demo(tmp_path / "learn", per_class=100, size=SIZE, seed=0)
    source = {d["path"]: d["source"] for d in _marker(root)["near_duplicates"]}
    x, y, test = [], [], []
    for c, label in enumerate(demo.CLASSES):
        for p in sorted((root / label).glob("*.jpg")):
            rel = f"{label}/{p.name}"
            x.append(_colour_histogram(p))
            y.append(c)
            test.append(int(source.get(rel, rel)[-8:-4]) % 3 == 0)  # a duplicate goes where its source goes
    x, y, test = np.array(x), np.array(y), np.array(test)
    centroids = np.stack([x[~test & (y == c)].mean(0) for c in range(len(demo.CLASSES))])
    pred = ((x[test][:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    accuracy = (pred == y[test]).mean()
    majority = np.bincount(y[test]).max() / test.sum()
    assert test.sum() > 120
    assert accuracy > 0.5 and accuracy > majority + 0.12, (accuracy, majority)


# ----------------------------------------------------------------------------------- other families
@pytest.fixture(scope="module", params=["plain", "scans"])
def family_set(request, tmp_path_factory) -> tuple[str, Path]:
    """A tiny set of each non-default family: per_class=8, 64 px, seed 0."""
    family = request.param
    root = demo.generate_demo(tmp_path_factory.mktemp(family) / "out", per_class=8, size=SIZE, seed=0, family=family)
    return family, root


def _border(a: np.ndarray) -> np.ndarray:
    """The left and right eighths of a greyscale image, flattened: beside an upright leaf."""
    w = a.shape[1] // 8
    return np.concatenate([a[:, :w].ravel(), a[:, -w:].ravel()])


def test_families_layout_mode_and_character(family_set, small):
    family, root = family_set
    counts = demo.class_counts(8)
    assert _marker(root)["family"] == family
    for label in demo.CLASSES:
        files = sorted((root / label).glob("*.jpg"))
        assert len(files) == counts[label]
        for f in files:
            with Image.open(f) as im:
                assert im.size == (SIZE, SIZE)
                assert im.mode == ("L" if family == "scans" else "RGB")
    # The background is a plain sheet (or paper): the left and right eighths vary far less than a field
    # picture's, and the middle (where the leaf lies) differs from the border.
    spread = {}
    for name, folder in ((family, root), ("field", small)):
        files = sorted(folder.glob("*/*.jpg"))
        arrays = [np.asarray(Image.open(f).convert("L"), dtype=np.float64) for f in files]
        spread[name] = np.median([_border(a).std() for a in arrays])
        if name == family:
            centre_vs_border = [
                abs(a[SIZE // 3 : 2 * SIZE // 3, SIZE // 2 - 4 : SIZE // 2 + 4].mean() - _border(a).mean())
                for a in arrays
            ]
            assert np.median(centre_vs_border) > 10
    assert spread[family] < 0.5 * spread["field"], spread


def test_families_same_seed_is_byte_identical_and_differs_from_field(family_set, small, tmp_path):
    family, root = family_set
    again = demo.generate_demo(tmp_path / "again", per_class=8, size=SIZE, seed=0, family=family)
    assert _snapshot(again) == _snapshot(root)
    a, b = _snapshot(root), _snapshot(small)
    assert sum(a[k] == b[k] for k in a if not k.startswith(".")) == 0
    before = _snapshot(root)
    with pytest.raises(UserError, match="other parameters"):  # another family is another data set
        demo.generate_demo(root, per_class=8, size=SIZE, seed=0)
    assert _snapshot(root) == before


def test_families_near_duplicates_look_like_their_source(family_set):
    family, root = family_set
    dups = _marker(root)["near_duplicates"]
    assert len(dups) >= 1

    def corr(p: Path, q: Path) -> float:  # brightness-blind: distinct pictures here differ less than that
        x, y = (np.asarray(Image.open(f).convert("L"), dtype=np.float64).ravel() for f in (p, q))
        return float(np.corrcoef(x, y)[0, 1])

    for d in dups:
        others = [
            p
            for p in (root / d["source"]).parent.glob("*.jpg")
            if p.name not in (Path(d["path"]).name, Path(d["source"]).name)
        ]
        # Closer to its source than any other image of the class is.
        assert corr(root / d["path"], root / d["source"]) > max(corr(root / d["path"], p) for p in others)


def test_scans_are_drawn_small_and_upscaled():
    # Upscaled 2-3x, an image is locally linear between neighbouring pixels: a step of two pixels
    # changes it about twice as much as a step of one. A picture drawn at full size (sensor noise,
    # sharp edges) is far from that.
    def step_ratio(arr: np.ndarray) -> float:
        a = arr.astype(np.float64)
        return np.abs(a[:, 2:] - a[:, :-2]).mean() / np.abs(np.diff(a, axis=1)).mean()

    scans = [step_ratio(demo.render_image("Hispa", i, size=256, family="scans")[0]) for i in range(1, 4)]
    field = [
        step_ratio(np.asarray(Image.fromarray(demo.render_image("Hispa", i, size=256)[0]).convert("L")))
        for i in range(1, 4)
    ]
    assert min(scans) > 1.7 > max(field), (scans, field)


def test_old_marker_without_family_is_a_field_set(small, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(small, old)
    marker = _marker(old)
    del marker["family"]
    (old / demo.MARKER).write_text(json.dumps(marker))
    assert demo.generate_demo(old, per_class=8, size=SIZE, seed=0) == old  # still "ready"
    with pytest.raises(UserError, match="other parameters"):
        demo.generate_demo(old, per_class=8, size=SIZE, seed=0, family="plain")


def test_a_set_made_by_an_earlier_release_is_still_ready(small, tmp_path):
    """The marker of a set generated before the package's folders moved (its id and fields as written then)
    is the marker generated now: the cached demo set is reused, not refused."""
    import shutil

    old = tmp_path / "earlier"
    shutil.copytree(small, old)
    marker = _marker(old)
    assert {k: marker[k] for k in ("generator", "format", "family")} == {
        "generator": "tune_rice.demo",
        "format": 1,
        "family": "field",
    }
    assert demo.generate_demo(old, per_class=8, size=SIZE, seed=0) == old


def test_family_names_and_cli(tmp_path, capsys, monkeypatch):
    with pytest.raises(UserError, match="unknown image family 'photos'.*field, plain, scans"):
        demo.generate_demo(tmp_path / "x", per_class=2, size=SIZE, family="photos")
    assert not (tmp_path / "x").exists()
    assert demo.dataset_name(per_class=2, size=48, seed=1, family="plain") == "rice-plain-p2-s48-seed1"
    assert demo.dataset_name(per_class=2, size=48, seed=1) == "rice-p2-s48-seed1"
    monkeypatch.setenv("TUNE_RICE_CACHE", str(tmp_path / "cache"))
    root = demo.ensure_demo(per_class=2, size=48, seed=1, family="scans")
    assert root.name == "rice-scans-p2-s48-seed1" and _marker(root)["family"] == "scans"
    out = tmp_path / "cli"
    assert demo.main([str(out), "--family", "plain", "--per-class", "2", "--size", "48"]) == 0
    assert _marker(out)["family"] == "plain"
    capsys.readouterr()
    assert demo.main([str(tmp_path / "bad"), "--family", "photos"]) == 2
    assert "photos" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert demo.main(["--help"]) == 0
    assert "scans" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- kinds of copy
def test_copy_image_makes_each_kind(tmp_path):
    import io

    rng = np.random.default_rng(3)
    for family in ("field", "scans"):
        arr, _ = demo.render_image("BrownSpot", 1, size=96, family=family)
        im = Image.fromarray(arr)
        grey = np.asarray(im.convert("L"), dtype=np.float64)
        for kind in demo.COPY_KINDS:
            data, how = demo.copy_image(im, kind, rng)
            with Image.open(io.BytesIO(data)) as c:
                assert c.format == "JPEG" and c.mode == im.mode, (family, kind)
                c.load()
                out = np.asarray(c.convert("L"), dtype=np.float64)
            w, h = c.size
            if kind in ("jpeg", "brightness", "shift", "flip", "rotate"):
                assert (w, h) == (96, 96), (kind, how)
            if kind == "resize":
                f = float(how[1:])
                assert 0.5 <= f <= 2 and abs(w - 96 * f) <= 1, how
            if kind == "crop":
                assert 96 * 0.8 - 1 <= w <= 96 and 96 * 0.8 - 1 <= h <= 96 and (w, h) != (96, 96), how
            if kind == "flip":  # an exact mirror, up to JPEG noise
                ref = grey[:, ::-1] if how == "flip-h" else grey[::-1]
                assert np.abs(out - ref).mean() < 4, how
            if kind == "rotate":
                k = int(how[3:]) // 90
                assert np.abs(out - np.rot90(grey, k)).mean() < 4, how
            if kind == "shift":  # the uncovered edge is black
                assert (
                    out[:, :1].mean() < 30 or out[:, -1:].mean() < 30 or out[:1].mean() < 30 or out[-1:].mean() < 30
                ), how
    with pytest.raises(UserError, match="unknown kind of copy 'blur'"):
        demo.copy_image(im, "blur", rng)
