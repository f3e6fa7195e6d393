"""The Python API as a user calls it, ``--extend`` and the test-read ledger, on one tiny search.

``tune_rice.search(...)`` runs a 2-trial search of the separable test set (random init); its model is
loaded with ``tune_rice.load`` and checked against ``tune-rice predict``'s CSV; then ``evaluate`` (the
API and the CLI) and ``--extend`` read the test split again, and the ledger beside labels.csv counts
every read. The same search logs to MLflow and W&B (``log_to``), read back by their own readers before
``--extend`` adds to it. The tests without a search (options, the renamed flag, help groups) need no Ray."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SMALL_SPACE, error_line, local_ray, make_separable_dataset
from PIL import Image

import tune_rice
from tune_rice import UserError
from tune_rice.experiment import ledger
from tune_rice.experiment.space import SPACES_DIR
from tune_rice.experiment.study import load_study
from tune_rice.heads.final import DEFAULT_ENSEMBLE
from tune_rice.search import run as search
from tune_rice.search import tracking
from tune_rice.search.config import SearchConfig
from tune_rice.tools import evaluate, predict


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-trial search made through ``tune_rice.search(...)``, logged to MLflow (a file store) and
    W&B (offline): (result, labels.csv, space file)."""
    work = tmp_path_factory.mktemp("api")
    labels = make_separable_dataset(work / "data", per_class=8, size=32)
    space = work / "space.yaml"
    space.write_text(SMALL_SPACE)
    with local_ray(tmp_path_factory), pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", tracking.MLFLOW_FILE_STORE_OK):
            mp.delenv(name, raising=False)
        result = tune_rice.search(
            data=labels,
            num_samples=2,
            search_space=space,
            weights="none",
            storage_path=work / "runs",
            name="api",
            no_report=True,
            log_to=[f"mlflow={(work / 'mlruns').as_uri()}", "wandb=leaves"],  # read back by the tracker tests
        )
        yield result, labels, space


@pytest.mark.slow
def test_search_returns_the_experiment_and_load_predicts_as_the_predict_tool(finished, tmp_path):
    result, labels, _ = finished
    assert result.path == labels.parent.parent / "runs" / "api"
    assert result.test_metrics == json.loads((result.path / "test_metrics.json").read_text())
    assert (result.results["kind"] == "trial").sum() == 2
    assert result.model.classes == ["alpha", "beta", "gamma"]

    files = sorted((labels.parent / "alpha").glob("*.png"))[:3]
    out = tmp_path / "pred.csv"
    assert predict.main(["--model", str(result.path / "best" / "model.pt"), *map(str, files), "--out", str(out)]) == 0
    tool = pd.read_csv(out)
    model = tune_rice.load(result.path)
    by_path = model.predict([str(f) for f in files])
    in_memory = model.predict([Image.open(files[0]), np.asarray(Image.open(files[1]).convert("RGB")), files[2]])
    for table in (by_path, in_memory):
        assert list(table["label"]) == list(tool["label"])
        assert table["score"].to_numpy() == pytest.approx(tool["score"].to_numpy(), abs=1e-5)  # CSV: 6 decimals
        probs = table[model.classes].to_numpy()
        assert probs.sum(axis=1) == pytest.approx(1.0) and (probs.max(axis=1) == table["score"]).all()
    assert list(in_memory["image"][:2]) == ["image[0]", "image[1]"]

    maps = model.explain([files[0], Image.open(files[1])], tmp_path / "maps")
    assert list(maps["label"]) == list(tool["label"][:2]) and (tmp_path / "maps" / "inputs" / "image-1.png").is_file()
    assert all((tmp_path / "maps" / Path(png).name).is_file() for png in maps["overlay"])


# ------------------------------------------------------------- the trackers the search logged to (--log-to)
# These read the trackers before the --extend test below adds trials and a second final run.
def _mlflow_uri(result) -> str:
    return (result.path.parent.parent / "mlruns").as_uri()


def _epochs(trial_dir: Path) -> pd.DataFrame:
    """A trial's results per epoch, as Tune's JSON logger wrote them."""
    return pd.read_json(trial_dir / "result.json", lines=True).sort_values("training_iteration")


@pytest.mark.slow
def test_mlflow_holds_a_run_per_trial_and_the_final_model(finished, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    exp, uri = finished[0].path, _mlflow_uri(finished[0])
    monkeypatch.setenv(tracking.MLFLOW_FILE_STORE_OK, "true")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("api")
    runs = client.search_runs([experiment.experiment_id])
    trials = {r.info.run_name: r for r in runs if r.data.tags.get("tune_rice.kind") == "trial"}
    results = pd.read_csv(exp / "results.csv")
    assert sorted(trials) == sorted(f"trial_{t}" for t in results.loc[results["kind"] == "trial", "trial_id"])
    for name, run in trials.items():
        epochs = _epochs(exp / name)
        assert float(run.data.params["lr"]) == pytest.approx(epochs["config"].iloc[0]["lr"], rel=1e-12)
        assert run.data.params["backbone"] == "resnet18"
        history = sorted(client.get_metric_history(run.info.run_id, "valid/acc"), key=lambda m: m.step)
        assert [m.step for m in history] == list(epochs["training_iteration"])
        assert [m.value for m in history] == pytest.approx(list(epochs["valid/acc"]))
    (final,) = [r for r in runs if r.data.tags.get("tune_rice.kind") == "final"]
    test = json.loads((exp / "test_metrics.json").read_text())
    assert final.info.run_name == "api/final" and final.data.params["trial_id"] == test["trial_id"]
    assert final.data.metrics["test/accuracy"] == pytest.approx(test["accuracy"])
    assert final.data.metrics["test/macro_f1"] == pytest.approx(test["macro_f1"])
    names = {a.path for a in client.list_artifacts(final.info.run_id)} | {
        a.path for a in client.list_artifacts(final.info.run_id, "best")
    }
    assert {"best/model.pt", "summary.txt", "test_metrics.json"} <= names
    got = client.download_artifacts(final.info.run_id, "best/model.pt", str(tmp_path))
    assert Path(got).read_bytes() == (exp / "best" / "model.pt").read_bytes()


def _wandb_records(path: Path):
    """The records of a W&B run file (.wandb): LevelDB's log format (32 KiB blocks, each record a 7-byte
    header: CRC, length, kind full/first/middle/last) after W&B's 7-byte file header, records in W&B's
    protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, parts = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in the block for a header: padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):  # full, or the last piece
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


def _wandb_run(path: Path) -> dict:
    run: dict = {"history": {}, "config": {}, "summary": {}, "artifacts": []}
    for r in _wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run.update(name=r.run.display_name, group=r.run.run_group, project=r.run.project, job=r.run.job_type)
            run["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            run["history"][row["_step"]] = row
        elif kind == "summary":
            run["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "artifact":
            run["artifacts"].append((r.artifact.name, r.artifact.type, {e.path for e in r.artifact.manifest.contents}))
    return run


@pytest.mark.slow
def test_wandb_offline_runs_hold_every_trial_and_the_final_model(finished):
    exp = finished[0].path
    runs = [_wandb_run(f) for f in sorted(exp.glob("wandb/offline-run-*/run-*.wandb"))]
    assert {r["group"] for r in runs} == {"api"} and {r["project"] for r in runs} == {"leaves"}
    trials = {r["name"]: r for r in runs if r["job"] == "trial"}
    results = pd.read_csv(exp / "results.csv")
    assert sorted(trials) == sorted(f"trial_{t}" for t in results.loc[results["kind"] == "trial", "trial_id"])
    for name, run in trials.items():
        epochs = _epochs(exp / name)
        assert run["config"]["lr"] == pytest.approx(epochs["config"].iloc[0]["lr"], rel=1e-12)
        logged = {step: row["valid/acc"] for step, row in run["history"].items() if "valid/acc" in row}
        assert sorted(logged) == list(epochs["training_iteration"])
        assert [logged[s] for s in sorted(logged)] == pytest.approx(list(epochs["valid/acc"]))
    (final,) = [r for r in runs if r["job"] == "final"]
    test = json.loads((exp / "test_metrics.json").read_text())
    assert final["name"] == "api/final" and final["config"]["trial_id"] == test["trial_id"]
    assert final["summary"]["test/accuracy"] == pytest.approx(test["accuracy"])
    ((name, kind, files),) = final["artifacts"]
    assert (name, kind) == ("api-model", "model") and {"best/model.pt", "summary.txt", "test_metrics.json"} <= files


@pytest.mark.slow
def test_the_ledger_counts_test_reads_across_tools_and_extend_grows_the_search(finished, tmp_path, capsys):
    result, labels, space = finished
    reads = ledger.read_ledger(labels)
    assert list(reads["tool"]) == ["search"] and reads["experiment"][0] == str(result.path)

    scored = tune_rice.load(result.path).evaluate(labels, split="test")
    assert scored["accuracy"] == pytest.approx(result.test_metrics["accuracy"]) and scored["test_reads"] == 2
    assert evaluate.main(["--model", str(result.path), "--data", str(labels), "--out", str(tmp_path / "e.json")]) == 0
    assert "this test split has now been read 3 times" in capsys.readouterr().out
    valid = ["--split", "valid", "--out", str(tmp_path / "v.json")]
    assert evaluate.main(["--model", str(result.path), "--data", str(labels), *valid]) == 0  # not a test read

    before = pd.read_csv(result.path / "results.csv").query("kind == 'trial'")
    argv = ["--name", "api", "--storage-path", str(result.path.parent), "--extend", "1", "--no-report"]
    assert search.main(argv) == 0
    summary = capsys.readouterr().out
    assert (
        "this test split has now been read 4 times" in summary and "--extend added 1 trial to the earlier 2" in summary
    )
    assert "TEST (scored once here; the split's read 4 in all, " in summary  # not 'scored once' alone
    after = pd.read_csv(result.path / "results.csv").query("kind == 'trial'")
    assert len(after) == 3 and set(before["trial_id"]) < set(after["trial_id"])  # the old trials kept
    study = load_study(result.path)
    assert study is not None and len(study.trials) == 3  # warm-started: one study, old and new trials
    archived = result.path / "extend-1" / "before"
    assert json.loads((archived / "test_metrics.json").read_text()) == result.test_metrics
    final = json.loads((result.path / "final.json").read_text())  # chosen again: every trial a candidate
    assert {c["name"] for c in final["candidate_info"]} >= set(after["trial_id"])
    assert list(ledger.read_ledger(labels)["tool"]) == ["search", "evaluate", "evaluate", "extend"]

    # a changed space is refused, with the change named, and nothing is touched
    space.write_text(SMALL_SPACE.replace("3.0e-2", "1.0e-1"))
    assert search.main([*argv[:-2], "1"]) == 2
    line = error_line(capsys.readouterr().err)
    assert "search space changed" in line and "lr: loguniform [0.001, 0.03] -> loguniform [0.001, 0.1]" in line
    assert not (result.path / "extend-2").exists() and len(ledger.read_ledger(labels)) == 4


def test_unknown_options_are_one_error_naming_them():
    with pytest.raises(
        UserError, match=r"unknown search option\(s\): bogus; num_sampls \(did you mean num_samples\?\); valid: data,"
    ):
        tune_rice.search(data="x", num_sampls=3, bogus=1)


def test_the_old_feature_cache_spelling_answers_with_the_new_name(capsys, caplog):
    assert search.parse_config(["--feature-cache", "off"]).bank == "off"
    assert "--feature-cache is now --bank" in capsys.readouterr().err
    assert SearchConfig.from_options(feature_cache="off").bank == "off"
    assert "'feature_cache' is now called 'bank'" in caplog.text
    config = SearchConfig()
    config.restore({"feature_cache": "off", "num_samples": 7, "name": "other", "resolved_weights": {}})
    assert (config.bank, config.num_samples, config.name) == ("off", 7, None)


def test_search_help_groups_its_options_and_lists_the_bundled_spaces(capsys):
    with pytest.raises(SystemExit):
        search.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for group in ("data:", "model and features:", "search:", "experiment and outputs:", "resources (Ray):"):
        assert f"\n{group}\n" in text
    bundled = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
    assert "zoo" in bundled and f"bundled space ({', '.join(bundled)})" in " ".join(text.split())
    assert SearchConfig().ensemble == DEFAULT_ENSEMBLE and "--feature-cache" not in text


def test_extend_refuses_an_experiment_that_has_not_finished(tmp_path, capsys):
    from tune_rice.experiment import storage

    assert search.main(["--extend", "3"]) == 2
    assert "--extend needs --name" in error_line(capsys.readouterr().err)
    storage.save_args(tmp_path / "runs" / "half", SearchConfig(name="half").saved())  # started, never scored
    assert search.main(["--name", "half", "--storage-path", str(tmp_path / "runs"), "--extend", "3"]) == 2
    assert "'half' has not finished (no test_metrics.json" in error_line(capsys.readouterr().err)
    assert sorted(p.name for p in (tmp_path / "runs" / "half").iterdir()) == ["search_args.json"]
