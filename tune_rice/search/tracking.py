"""Experiment trackers for the search: ``--log-to mlflow[=URI]`` and ``--log-to wandb[=PROJECT]``.

The trials go through Ray Tune's own logger callbacks (``MLflowLoggerCallback``, ``WandbLoggerCallback``):
one run per trial, its configuration as parameters and every epoch's results as metrics, stepped by epoch.
After the one read of the test split the deployed model gets a run of its own (``<name>/final``): its test
metrics, a few parameters (the best trial, the weights, the temperature, what was deployed) and as
artifacts ``best/model.pt``, ``summary.txt`` and ``test_metrics.json``.

MLflow: the tracking URI given, else ``$MLFLOW_TRACKING_URI``, else a file store in ``mlruns/`` under the
(local) storage path; one MLflow experiment per search, named after it. W&B: the project given, else
``$WANDB_PROJECT``, else ``tune-rice``; the search's runs form a group named after it; ``$WANDB_MODE``
(``offline``: the runs stay on disk for ``wandb sync``) and ``$WANDB_DIR`` are handed to the trials' logging
processes, and the runs' files go to the experiment folder unless ``$WANDB_DIR`` says otherwise.

Everything Ray- and tracker-specific is imported inside the functions: this module loads without them, and a
missing package is one line naming the extra to install (:func:`parse_log_to`, before any work starts).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import UserError
from ..records import MODEL_PATH, SUMMARY_FILE, TEST_METRICS_FILE

log = logging.getLogger(__name__)

TRACKERS = ("mlflow", "wandb")
DEFAULT_WANDB_PROJECT = "tune-rice"
FINAL_FILES = (MODEL_PATH, SUMMARY_FILE, TEST_METRICS_FILE)  # the final run's artifacts
MLFLOW_FILE_STORE_OK = "MLFLOW_ALLOW_FILE_STORE"  # MLflow 3 refuses a file store unless this is true


@dataclass(frozen=True)
class Tracker:
    kind: str  # "mlflow" or "wandb"
    target: str | None = None  # mlflow: the tracking URI; wandb: the project


def parse_log_to(values: Sequence[str] | None) -> list[Tracker]:
    """``--log-to`` values (repeated, or comma-separated) -> trackers; refuses an unknown one, one named
    twice, or one whose package is not installed (naming the extra that installs it)."""
    trackers: list[Tracker] = []
    for item in (part.strip() for value in values or () for part in str(value).split(",")):
        if not item:
            continue
        kind, sep, target = item.partition("=")
        kind = kind.strip().lower()
        if kind not in TRACKERS:
            raise UserError(f"--log-to {item!r}: unknown tracker; valid: mlflow[=URI], wandb[=PROJECT]")
        if sep and not target.strip():
            raise UserError(f"--log-to {item!r}: nothing after '='; give a {'URI' if kind == 'mlflow' else 'project'}")
        if any(t.kind == kind for t in trackers):
            raise UserError(f"--log-to: {kind} is named twice")
        if importlib.util.find_spec(kind) is None:
            raise UserError(f"--log-to {kind}: {kind} is not installed; pip install 'tune-rice[{kind}]'")
        trackers.append(Tracker(kind, target.strip() or None))
    return trackers


def mlflow_uri(target: str | None, storage_path: str) -> str:
    """The tracking URI: ``target``, else ``$MLFLOW_TRACKING_URI``, else ``mlruns/`` under the storage
    path when it is a local folder. A plain path becomes an absolute ``file:`` URI."""
    uri = target or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if "://" in storage_path:
            raise UserError(
                f"--log-to mlflow: the storage path {storage_path} is not a local folder, so there is no "
                "default file store; give one (mlflow=URI) or set MLFLOW_TRACKING_URI"
            )
        uri = str(Path(storage_path) / "mlruns")
    if "://" not in uri and not uri.startswith("file:"):
        uri = Path(uri).expanduser().resolve().as_uri()
    return uri


def _allow_file_store(uri: str) -> None:
    """A file store was asked for by name (or is the default here): let MLflow 3 use it."""
    if uri.startswith("file:"):
        os.environ.setdefault(MLFLOW_FILE_STORE_OK, "true")


def _wandb_settings(target: str | None, folder: Path) -> dict:
    """wandb.init arguments every run of the search shares: project, mode and folder."""
    settings = {
        "project": target or os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT,
        "dir": os.environ.get("WANDB_DIR") or str(folder),
    }
    if os.environ.get("WANDB_MODE"):  # the trials log from Ray actors, which may not share this environment
        settings["mode"] = os.environ["WANDB_MODE"]
    return settings


def tune_callbacks(trackers: Sequence[Tracker], *, experiment: str, storage_path: str, folder: Path) -> list:
    """Ray Tune's callbacks for ``trackers``: one run per trial, named after it, in the experiment's MLflow
    experiment or W&B group. ``folder``: the experiment's local folder (W&B's files go there)."""
    callbacks: list = []
    for t in trackers:
        if t.kind == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            uri = mlflow_uri(t.target, storage_path)
            _allow_file_store(uri)
            callbacks.append(
                MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, tags={"tune_rice.kind": "trial"})
            )
            log.info("logging the trials to MLflow at %s, experiment %s", uri, experiment)
        else:
            from ray.air.integrations.wandb import WandbLoggerCallback

            settings = _wandb_settings(t.target, folder)
            folder.mkdir(parents=True, exist_ok=True)
            callbacks.append(WandbLoggerCallback(group=experiment, job_type="trial", **settings))
            log.info("logging the trials to W&B, project %s, group %s", settings["project"], experiment)
    return callbacks


# --------------------------------------------------------------------------------------- final model
def final_record(exp_dir: Path) -> tuple[dict, dict]:
    """(parameters, metrics) of the deployed model, from test_metrics.json: the metrics are its numbers
    (``test/accuracy``, ``test/macro_f1``, ``test/<class>/f1``, ...), the parameters what it is."""
    test = json.loads((exp_dir / TEST_METRICS_FILE).read_text())
    params = {k: test[k] for k in ("trial_id", "weights", "pretrained", "deployed", "temperature") if k in test}
    if test.get("members"):
        params["members"] = ", ".join(map(str, test["members"]))
    metrics = {
        f"test/{k}": float(v)
        for k, v in test.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in params
    }
    for cls, scores in (test.get("per_class") or {}).items():
        for k, v in scores.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[f"test/{cls}/{k}"] = float(v)
    return params, metrics


def log_final(trackers: Sequence[Tracker], *, experiment: str, storage_path: str, exp_dir: Path) -> None:
    """The deployed model as a run of its own in each tracker. A tracker that fails costs a warning, not
    the search: the test scores are saved already."""
    if not trackers:
        return
    params, metrics = final_record(exp_dir)
    files = {rel: exp_dir / rel for rel in FINAL_FILES if (exp_dir / rel).is_file()}  # name in the run -> file
    for t in trackers:
        try:
            if t.kind == "mlflow":
                _mlflow_final(mlflow_uri(t.target, storage_path), experiment, params, metrics, files)
            else:
                _wandb_final(_wandb_settings(t.target, exp_dir), experiment, params, metrics, files)
        except Exception as e:  # noqa: BLE001 - a tracker's server or disk problem must not lose the search
            log.warning("the final model was not logged to %s (%s: %s)", t.kind, type(e).__name__, e)


def _mlflow_final(uri: str, experiment: str, params: dict, metrics: dict, files: dict[str, Path]) -> None:
    from mlflow.tracking import MlflowClient

    _allow_file_store(uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=f"{experiment}/final", tags={"tune_rice.kind": "final"})
    run_id = run.info.run_id
    for k, v in params.items():
        client.log_param(run_id, k, v)
    for k, v in metrics.items():
        client.log_metric(run_id, k, v)
    for rel, f in files.items():
        folder = str(Path(rel).parent)
        client.log_artifact(run_id, str(f), artifact_path=None if folder == "." else folder)
    client.set_terminated(run_id)
    log.info("the final model is MLflow run %s in experiment %s (%s)", run_id, experiment, uri)


def _wandb_final(settings: dict, experiment: str, params: dict, metrics: dict, files: dict[str, Path]) -> None:
    import wandb

    Path(settings["dir"]).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        group=experiment, name=f"{experiment}/final", job_type="final", config=params, reinit="create_new", **settings
    )
    try:
        run.summary.update(metrics)
        artifact = wandb.Artifact(f"{experiment}-model", type="model", metadata=params)
        for rel, f in files.items():
            artifact.add_file(str(f), name=rel)
        run.log_artifact(artifact)
    finally:
        run.finish()
    log.info("the final model is W&B run %s in project %s, group %s", run.id, settings["project"], experiment)
