"""The synthetic rice-leaf generator: layout, determinism, safety of the output folder, the CLI, and that
the classes are actually learnable (a colour-histogram classifier beats chance)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tune_rice import UserError, demo

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
        others = [p for p in (small / d["source"]).parent.glob("*.jpg")
                  if p.name not in (Path(d["path"]).name, Path(d["source"]).name)]
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
    with caplog.at_level("INFO", logger="tune_rice.demo"):
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

    def flaky(job, size, seed):
        calls.append(job)
        if len(calls) == 5:
            raise RuntimeError("killed")
        return real(job, size, seed)

    real = demo._render_job
    monkeypatch.setattr(demo, "_render_job", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        demo.generate_demo(tmp_path / "out", per_class=4, size=SIZE, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_bad_parameters_are_user_errors(tmp_path):
    for kwargs, word in [({"per_class": 0}, "per_class"), ({"size": 8}, "size"), ({"seed": -1}, "seed"),
                         ({"per_class": 2.5}, "per_class")]:
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
    assert demo.ensure_demo(per_class=2, size=48, seed=3, root=tmp_path / "elsewhere") == \
        tmp_path / "elsewhere" / "rice-p2-s48-seed3"
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
    h = np.bincount((a[:, 0] * bins + a[:, 1]) * bins + a[:, 2], minlength=bins ** 3)
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
