"""evaluate: the search's test metrics for any model and split, checked against a direct computation."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import error_line

from tune_rice.data.images import build_transform, load_image, read_labels
from tune_rice.features.model import load_artifact
from tune_rice.tools import evaluate

# Shared session fixtures (tiny_model, real_search): registered once as a plugin so every module
# gets the same trained model and the same real search.
pytest_plugins = ["helpers_artifacts"]

KEYS = {"accuracy", "macro_f1", "loss", "test_count", "classes", "per_class", "confusion_matrix"}


def _direct(model_path, labels_csv, split):
    """Metrics by hand: every image of the split through the artifact, one at a time."""
    model, meta = load_artifact(model_path)
    table = read_labels(labels_csv)
    tf = build_transform(meta["preprocessing"]["image_size"], train=False)
    classes = meta["classes"]
    y = np.array([classes.index(c) for c in table.split(split)["label"]])
    with torch.inference_mode():
        logits = torch.cat([model(tf(load_image(p))[None]) for p in table.paths(split)])
    pred = logits.argmax(1).numpy()
    n = len(classes)
    cm = np.zeros((n, n), dtype=int)
    for t, p in zip(y, pred):
        cm[t, p] += 1
    f1 = []
    for c in range(n):
        tp, fp, fn = cm[c, c], cm[:, c].sum() - cm[c, c], cm[c].sum() - cm[c, c]
        f1.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    loss = float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)))
    return {
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(np.mean(f1)),
        "cm": cm.tolist(),
        "loss": loss,
        "n": len(y),
    }


@pytest.mark.parametrize("split", ["test", "valid"])
def test_evaluate_agrees_with_a_direct_computation(tiny_model, tmp_path, capsys, split):
    out = tmp_path / "m.json"
    rc = evaluate.main(
        [
            "--model",
            str(tiny_model.model_path),
            "--data",
            str(tiny_model.root),
            "--split",
            split,
            "--out",
            str(out),
            "--num-workers",
            "0",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    got = json.loads(out.read_text())
    assert KEYS <= set(got) and got["split"] == split
    ref = _direct(tiny_model.model_path, tiny_model.labels_csv, split)
    assert got["test_count"] == ref["n"] == 9
    assert got["confusion_matrix"] == ref["cm"]
    assert got["accuracy"] == pytest.approx(ref["accuracy"])
    assert got["macro_f1"] == pytest.approx(ref["macro_f1"])
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert sum(v["support"] for v in got["per_class"].values()) == ref["n"]
    for cls in ("alpha", "beta", "gamma"):
        assert cls in printed
    assert "macro-F1" in printed and "confusion matrix" in printed
    assert f"accuracy  {got['accuracy']:.4f}" in printed


def test_default_out_and_never_test_metrics_json(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["--model", str(tiny_model.model_path), "--data", str(tiny_model.labels_csv), "--num-workers", "0"]
    assert evaluate.main(base + ["--out", str(tmp_path / "test_metrics.json")]) == 2
    assert "refusing" in capsys.readouterr().err and not (tmp_path / "test_metrics.json").exists()
    assert evaluate.main(base + ["--split", "train"]) == 0
    assert "optimistic" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval_train.json").read_text())["test_count"] == 18
    (tmp_path / "eval_train.json").write_text("{}")  # a run again refuses to overwrite it without --force
    assert evaluate.main(base + ["--split", "train"]) == 2
    err = capsys.readouterr().err
    assert err == "error: eval_train.json already exists: pass --force to overwrite, or --out another file\n"
    assert (tmp_path / "eval_train.json").read_text() == "{}"
    assert evaluate.main(base + ["--split", "train", "--force"]) == 0
    assert json.loads((tmp_path / "eval_train.json").read_text())["test_count"] == 18


def test_classes_that_differ_from_the_models_are_a_user_error(tiny_model, tmp_path, capsys):
    frame = pd.read_csv(tiny_model.labels_csv)
    frame.loc[frame["label"] == "gamma", "label"] = "delta"
    other = tiny_model.root / "labels_renamed.csv"  # in the dataset root: its paths are relative to it
    frame.to_csv(other, index=False)
    rc = evaluate.main(["--model", str(tiny_model.model_path), "--data", str(other), "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "alpha, beta, delta" in err and "alpha, beta, gamma" in err and "delta" in err.split("not known")[-1]


def test_a_subset_of_the_classes_is_scored_on_the_models_classes(tiny_model, tmp_path, capsys):
    frame = pd.read_csv(tiny_model.labels_csv)
    subset = tiny_model.root / "labels_no_beta.csv"
    frame[frame["label"] != "beta"].to_csv(subset, index=False)
    out = tmp_path / "s.json"
    assert (
        evaluate.main(
            ["--model", str(tiny_model.model_path), "--data", str(subset), "--out", str(out), "--num-workers", "0"]
        )
        == 0
    )
    got = json.loads(out.read_text())
    assert got["classes"] == ["alpha", "beta", "gamma"] and got["per_class"]["beta"]["support"] == 0
    assert got["test_count"] == 6


def test_a_labels_csv_kept_outside_the_dataset_needs_and_takes_data_root(tiny_model, tmp_path, capsys):
    elsewhere = tmp_path / "meta" / "labels.csv"  # what `prepare DATA --out meta/labels.csv` writes
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(tiny_model.labels_csv.read_bytes())
    base = ["--model", str(tiny_model.model_path), "--data", str(elsewhere), "--num-workers", "0"]
    assert evaluate.main(base + ["--out", str(tmp_path / "a.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "9 of 9 listed images are not under" in err and "--data-root" in err
    assert not (tmp_path / "a.json").exists()
    assert evaluate.main(base + ["--data-root", str(tiny_model.root), "--out", str(tmp_path / "b.json")]) == 0
    direct = tmp_path / "c.json"
    assert (
        evaluate.main(
            [
                "--model",
                str(tiny_model.model_path),
                "--data",
                str(tiny_model.labels_csv),
                "--num-workers",
                "0",
                "--out",
                str(direct),
            ]
        )
        == 0
    )
    got, want = json.loads((tmp_path / "b.json").read_text()), json.loads(direct.read_text())
    assert got["confusion_matrix"] == want["confusion_matrix"] and got["accuracy"] == want["accuracy"]


def test_a_folder_without_labels_csv_and_an_unreadable_image(tiny_model, tmp_path, capsys):
    assert evaluate.main(["--model", str(tiny_model.model_path), "--data", str(tmp_path)]) == 2
    assert "no labelled images" in capsys.readouterr().err
    root = tmp_path / "broken"
    (root / "alpha").mkdir(parents=True)
    (root / "alpha" / "x.png").write_bytes(b"garbage")
    pd.DataFrame([{"path": "alpha/x.png", "label": "alpha", "split": "test", "group": "g"}]).to_csv(
        root / "labels.csv", index=False
    )
    for workers in ("0", "1"):  # a decode error from a loader worker is still one line
        rc = evaluate.main(
            [
                "--model",
                str(tiny_model.model_path),
                "--data",
                str(root),
                "--num-workers",
                workers,
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
        err = capsys.readouterr().err
        assert rc == 2 and err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err, err
        assert "x.png: not an image" in err.strip().splitlines()[-1]


@pytest.mark.slow
def test_evaluate_reproduces_the_searchs_test_metrics(real_search, tmp_path, capsys):
    saved = json.loads((real_search / "test_metrics.json").read_text())
    args = json.loads((real_search / "search_args.json").read_text())
    out = tmp_path / "again.json"
    assert evaluate.main(["--model", str(real_search), "--data", args["data"], "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    for key in ("accuracy", "macro_f1", "test_count", "classes", "per_class", "confusion_matrix"):
        assert got[key] == saved[key], key
    assert got["loss"] == pytest.approx(saved["loss"], rel=1e-5)


def test_split_all_scores_every_image_of_a_labels_csv_a_class_folder_or_a_csv(tiny_model, tmp_path, capsys):
    """--split all on the labels.csv, the same images as bare class folders (a stray file beside them) and as
    a CSV of ids: every image scored once, the confusion matrix the sum of the three splits'; as a pre-split
    tree: its test/ folder by default."""
    model = ["--model", str(tiny_model.model_path), "--num-workers", "0"]
    by_split = [_direct(tiny_model.model_path, tiny_model.labels_csv, s) for s in ("train", "valid", "test")]
    want_cm = np.sum([r["cm"] for r in by_split], axis=0).tolist()
    assert sum(r["n"] for r in by_split) == np.sum(want_cm) == 36

    folders = tmp_path / "folders"
    shutil.copytree(tiny_model.root, folders, ignore=shutil.ignore_patterns("*.csv"))
    (folders / "alpha" / "readme.txt").write_text("not an image")
    frame = pd.read_csv(tiny_model.labels_csv)
    ids = tmp_path / "ids.csv"  # a CSV elsewhere: its paths are relative to --data-root
    pd.DataFrame({"filename": frame["path"].str.removesuffix(".png"), "category": frame["label"]}).to_csv(
        ids, index=False
    )

    presplit = tmp_path / "presplit"  # val/ train/ test/ folders of class folders: test by default
    for rel, label, split in frame[["path", "label", "split"]].itertuples(index=False):
        (presplit / split.replace("valid", "val") / label).mkdir(parents=True, exist_ok=True)
        os.link(tiny_model.root / rel, presplit / split.replace("valid", "val") / rel)

    cases = {
        "labels": ([str(tiny_model.labels_csv), "--split", "all"], "all", want_cm),
        "folders": ([str(folders)], "all", want_cm),
        "csv": ([str(ids), "--data-root", str(tiny_model.root)], "all", want_cm),
        "presplit": ([str(presplit)], "test", by_split[2]["cm"]),
    }
    for name, (data_args, split, cm) in cases.items():
        out = tmp_path / f"{name}.json"
        assert evaluate.main([*model, "--data", *data_args, "--out", str(out)]) == 0, name
        printed = capsys.readouterr().out
        got = json.loads(out.read_text())
        assert got["split"] == split and got["test_count"] == np.sum(cm), name
        assert got["confusion_matrix"] == cm, name
        assert sum(v["support"] for v in got["per_class"].values()) == got["test_count"]
        assert "confusion matrix" in printed and "precision" in printed
        assert ("optimistic" in printed) == (name == "labels"), name  # only the labels.csv says train/valid

    assert evaluate.main([*model, "--data", str(folders), "--split", "test", "--out", str(tmp_path / "x.json")]) == 2
    assert "no test images" in error_line(capsys.readouterr().err) and not (tmp_path / "x.json").exists()
