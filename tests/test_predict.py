"""predict: batched classification of files and folders with a trained artifact; bad inputs never crash it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tune_rice.data.images import build_transform, load_image
from tune_rice.features.model import load_artifact
from tune_rice.tools import predict

# Shared session fixtures (tiny_model, real_search): registered once as a plugin so every module
# gets the same trained model and the same real search.
pytest_plugins = ["helpers_artifacts"]


class _Evil:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def photo_folder(tiny_model, tmp_path) -> Path:
    """Three good images (one in a sub-folder), a truncated PNG, a text file named .jpg, and a notes.txt."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for rel, dest in (
        ("alpha/alpha_010.png", "a.png"),
        ("beta/beta_011.png", "b.png"),
        ("gamma/gamma_009.png", "sub/g.png"),
    ):
        shutil.copy(tiny_model.root / rel, folder / dest)
    data = (tiny_model.root / "alpha/alpha_011.png").read_bytes()
    (folder / "broken.png").write_bytes(data[: len(data) // 3])
    (folder / "sub" / "fake.jpg").write_text("this is not a photo\n")
    (folder / "notes.txt").write_text("not an image extension: not even looked at\n")
    return folder


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_predict_folder_lists_bad_files_and_matches_the_model(tiny_model, photo_folder, tmp_path, capsys):
    out_csv = tmp_path / "pred.csv"
    rc, out, err = _run(capsys, "--model", tiny_model.model_path, photo_folder, "--out", out_csv, "--topk", "2")
    assert rc == 0, err
    before = out_csv.read_bytes()
    refused = _run(capsys, "--model", tiny_model.model_path, photo_folder, "--out", out_csv, "--topk", "1")
    assert refused[:2] == (2, "") and out_csv.read_bytes() == before  # one overwrite policy: --force
    assert refused[2] == f"error: {out_csv} already exists: pass --force to overwrite, or --out another file\n"
    table = pd.read_csv(out_csv, keep_default_na=False)
    assert list(table.columns) == [
        "path",
        "label",
        "score",
        "top1_label",
        "top1_score",
        "top2_label",
        "top2_score",
        "error",
    ]
    assert len(table) == 5  # notes.txt is not an image file name, so not a candidate
    bad = table[table["error"] != ""]
    assert sorted(Path(p).name for p in bad["path"]) == ["broken.png", "fake.jpg"]
    assert (bad["label"] == "").all() and (bad["score"] == "").all()
    assert "not an image" in bad.loc[bad["path"].str.endswith("fake.jpg"), "error"].item()
    assert "skipped 2" in err and "broken.png" in err and "fake.jpg" in err

    good = table[table["error"] == ""].reset_index(drop=True)
    assert len(good) == 3
    assert (good["label"] == good["top1_label"]).all()
    assert np.allclose(good["score"].astype(float), good["top1_score"].astype(float))
    assert (good["top1_score"].astype(float) >= good["top2_score"].astype(float)).all()
    assert (good["top1_label"] != good["top2_label"]).all()
    # The summary counts agree with the CSV.
    assert "3 of 5 images classified" in out
    for cls, n in good["label"].value_counts().items():
        assert any(line.split()[:2] == [cls, str(n)] for line in out.splitlines()), (cls, n, out)

    # Reference: the artifact run directly on each image with the evaluation transform of its image size.
    model, meta = load_artifact(tiny_model.model_path)
    tf = build_transform(meta["preprocessing"]["image_size"], train=False)
    with torch.inference_mode():
        for _, row in good.iterrows():
            p = torch.softmax(model(tf(load_image(row["path"]))[None]), 1)[0]
            assert meta["classes"][int(p.argmax())] == row["label"]
            assert float(p.max()) == pytest.approx(float(row["score"]), abs=2e-6)


def test_batch_size_and_workers_do_not_change_predictions(tiny_model, photo_folder, tmp_path, capsys):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert _run(capsys, "--model", tiny_model.model_path, photo_folder, "--out", a, "--batch-size", "64")[0] == 0
    assert (
        _run(
            capsys,
            "--model",
            tiny_model.model_path,
            photo_folder,
            "--out",
            b,
            "--batch-size",
            "2",
            "--num-workers",
            "1",
        )[0]
        == 0
    )
    pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b), atol=1e-5)


def test_default_topk_single_file_and_experiment_folder(tiny_model, photo_folder, tmp_path, capsys):
    out_csv = tmp_path / "one.csv"
    run_dir = tiny_model.model_path.parent.parent  # an experiment folder with best/model.pt inside
    rc, _, err = _run(capsys, "--model", run_dir, photo_folder / "a.png", "--out", out_csv)
    assert rc == 0, err
    table = pd.read_csv(out_csv)
    assert len(table) == 1 and "top3_label" in table and "top4_label" not in table


@pytest.mark.parametrize("k", ["4", "0"])
def test_topk_outside_the_class_count_is_a_user_error(tiny_model, photo_folder, tmp_path, capsys, k):
    rc, _, err = _run(capsys, "--model", tiny_model.model_path, photo_folder, "--topk", k, "--out", tmp_path / "x.csv")
    assert rc == 2
    assert err.startswith("error: --topk") and "3 classes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.csv").exists()


def test_a_pickle_that_runs_code_is_refused_and_never_run(photo_folder, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"format": "tune-rice-model", "payload": _Evil(marker)}, evil)
    rc, _, err = _run(capsys, "--model", evil, photo_folder, "--out", tmp_path / "x.csv")
    assert rc == 2
    assert "refused to load" in err and "could run code" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_files_that_are_not_models_are_user_errors(photo_folder, tmp_path, capsys):
    plain = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, plain)
    rc, _, err = _run(capsys, "--model", plain, photo_folder, "--out", tmp_path / "x.csv")
    assert rc == 2 and "not a tune-rice model artifact" in err

    text = tmp_path / "notes.pt"
    text.write_text("hello")
    rc, _, err = _run(capsys, "--model", text, photo_folder, "--out", tmp_path / "x.csv")
    assert rc == 2 and err.startswith("error: ") and "tune-rice model" in err

    rc, _, err = _run(capsys, "--model", tmp_path / "missing.pt", photo_folder)
    assert rc == 2 and "not found" in err


def test_no_images_is_a_user_error(tiny_model, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no photos here")
    rc, _, err = _run(capsys, "--model", tiny_model.model_path, empty, "--out", tmp_path / "x.csv")
    assert rc == 2 and "no images found" in err
    rc, _, err = _run(capsys, "--model", tiny_model.model_path, tmp_path / "nowhere")
    assert rc == 2 and "no such file or folder" in err


def test_every_file_unreadable_still_writes_the_csv_and_exits_1(tiny_model, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"")
    out_csv = tmp_path / "bad.csv"
    rc, out, err = _run(capsys, "--model", tiny_model.model_path, folder, "--out", out_csv)
    assert rc == 1
    table = pd.read_csv(out_csv, keep_default_na=False)
    assert table["error"].str.contains("empty file").all()
    assert "0 of 1 images classified" in out


def test_min_confidence_labels_uncertain_and_keeps_the_topk(tiny_model, photo_folder, tmp_path, capsys):
    plain, unsure = tmp_path / "plain.csv", tmp_path / "unsure.csv"
    assert _run(capsys, "--model", tiny_model.model_path, photo_folder, "--out", plain)[0] == 0
    reference = pd.read_csv(plain, keep_default_na=False)
    scores = reference.loc[reference["error"] == "", "score"].astype(float)
    p = float(np.median(scores))  # some images above, some below (three distinct scores)
    rc, out, err = _run(
        capsys, "--model", tiny_model.model_path, photo_folder, "--out", unsure, "--min-confidence", str(p)
    )
    assert rc == 0, err
    table = pd.read_csv(unsure, keep_default_na=False)
    good = table["error"] == ""
    below = good & (table["score"].replace("", np.nan).astype(float) < p)
    assert below.sum() == 1 and (good & ~below).sum() == 2
    assert (table.loc[below, "label"] == predict.UNCERTAIN).all()
    assert (table.loc[good & ~below, "label"] == table.loc[good & ~below, "top1_label"]).all()
    # Everything but the label column is what predict gives without the option; skipped rows keep "".
    pd.testing.assert_frame_equal(table.drop(columns="label"), reference.drop(columns="label"))
    assert (table.loc[~good, "label"] == "").all()
    assert f"uncertain = top probability below {p:g}" in out
    assert "not calibrated" in err  # this model holds no temperature fitted on valid, and predict says so
    assert any(line.split()[:2] == [predict.UNCERTAIN, "1"] for line in out.splitlines()), out


@pytest.mark.parametrize("p", ["1.5", "-0.1"])
def test_min_confidence_outside_0_1_is_a_user_error(tiny_model, photo_folder, tmp_path, capsys, p):
    rc, _, err = _run(
        capsys, "--model", tiny_model.model_path, photo_folder, "--min-confidence", p, "--out", tmp_path / "x.csv"
    )
    assert rc == 2 and err.startswith("error: --min-confidence") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.csv").exists()
