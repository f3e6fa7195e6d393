"""--log-to: one tiny search logged to a real local MLflow file store and to W&B in offline mode at once,
read back with MLflow's own client and from W&B's offline run files; a tracker that is unknown or not
installed stops the search in one line before any work."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pandas as pd
import pytest
from conftest import SMALL_SPACE, error_line, local_ray, make_separable_dataset, search_argv

from tune_rice import UserError
from tune_rice.search import run as search
from tune_rice.search import tracking

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")


# ------------------------------------------------------------------------------- the option, no search
def test_log_to_takes_repeats_and_comma_lists():
    got = tracking.parse_log_to(["mlflow=file:/tmp/x", "wandb=leaves"])
    assert got == tracking.parse_log_to(["mlflow=file:/tmp/x,wandb=leaves"])
    assert got == [tracking.Tracker("mlflow", "file:/tmp/x"), tracking.Tracker("wandb", "leaves")]
    assert tracking.parse_log_to(None) == [] and tracking.parse_log_to(["wandb"]) == [tracking.Tracker("wandb")]
    for bad, words in (("neptune", "unknown tracker"), ("mlflow,mlflow", "named twice"), ("mlflow=", "nothing after")):
        with pytest.raises(UserError, match=words):
            tracking.parse_log_to([bad])


def test_a_missing_tracker_package_stops_the_search_before_any_work(separable, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    space = tmp_path / "space.yaml"
    space.write_text(SMALL_SPACE)
    argv = search_argv(separable, space, tmp_path / "runs", "x", "--log-to", "mlflow,wandb")
    assert search.main(argv) == 2
    assert error_line(capsys.readouterr().err) == (
        "error: --log-to wandb: wandb is not installed; pip install 'tune-rice[wandb]'"
    )
    assert not (tmp_path / "runs").exists()


def test_mlflow_defaults_to_a_file_store_under_the_storage_path(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.mlflow_uri(None, str(tmp_path / "runs")) == (tmp_path / "runs" / "mlruns").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert tracking.mlflow_uri(None, str(tmp_path)) == "http://tracker:5000"
    with pytest.raises(UserError, match="not a local folder"):
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        tracking.mlflow_uri(None, "s3://bucket/runs")


# ------------------------------------------------------------------------------ one search, both trackers
@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A search of 1 trial (2 epochs) logging to MLflow (a file store) and W&B (offline); (experiment folder, URI)."""
    work = tmp_path_factory.mktemp("tracked")
    labels = make_separable_dataset(work / "data", per_class=8, size=32)
    (work / "space.yaml").write_text(SMALL_SPACE)
    uri = (work / "mlruns").as_uri()
    with local_ray(tmp_path_factory), pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", tracking.MLFLOW_FILE_STORE_OK):
            mp.delenv(name, raising=False)
        argv = search_argv(labels, work / "space.yaml", work / "runs", "t", "--num-samples", "1", "--ensemble", "1")
        assert search.main([*argv, "--log-to", f"mlflow={uri},wandb=leaves"]) == 0
        yield work / "runs" / "t", uri


def _epochs(trial_dir: Path) -> pd.DataFrame:
    """A trial's results per epoch, as Tune's JSON logger wrote them."""
    return pd.read_json(trial_dir / "result.json", lines=True).sort_values("training_iteration")


@pytest.mark.slow
def test_mlflow_holds_a_run_per_trial_and_the_final_model(tracked, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    exp, uri = tracked
    monkeypatch.setenv(tracking.MLFLOW_FILE_STORE_OK, "true")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("t")
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
    assert final.info.run_name == "t/final" and final.data.params["trial_id"] == test["trial_id"]
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
def test_wandb_offline_runs_hold_every_trial_and_the_final_model(tracked):
    exp, _ = tracked
    runs = [_wandb_run(f) for f in sorted(exp.glob("wandb/offline-run-*/run-*.wandb"))]
    assert {r["group"] for r in runs} == {"t"} and {r["project"] for r in runs} == {"leaves"}
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
    assert final["name"] == "t/final" and final["config"]["trial_id"] == test["trial_id"]
    assert final["summary"]["test/accuracy"] == pytest.approx(test["accuracy"])
    ((name, kind, files),) = final["artifacts"]
    assert (name, kind) == ("t-model", "model") and {"best/model.pt", "summary.txt", "test_metrics.json"} <= files
