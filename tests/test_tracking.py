"""--log-to: the option's grammar, the MLflow store it defaults to, and a tracker that is unknown or not
installed stopping the search in one line before any work. The search that logs to a real MLflow file
store and to W&B offline, read back by their own readers, is tests/test_api.py's (one search serves both)."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import SMALL_SPACE, error_line, search_argv

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
