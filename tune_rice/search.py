"""``python -m tune_rice.search``: the hyperparameter search, end to end.

data -> labels.csv -> feature banks (once) -> Ray Tune (OptunaSearch proposes, ASHA stops the weak,
trials train heads on the banks) -> the best trial's best checkpoint -> one full model scored ONCE on the
test split -> ``runs/<name>/`` with results.csv, best/model.pt, test_metrics.json, TensorBoard runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from . import UserError, cli
from .data import LabelTable, preprocessing_spec, read_labels_checked
from .engine import TrialConfig
from .features import FeatureBank, FeatureSpec, extract_banks, pass_key
from .model import Classifier, ResolvedWeights, build_backbone, resolve_weights, save_artifact
from .space import SearchSpace, load_search_space

log = logging.getLogger("tune_rice.search")

ARGS_FILE = "search_args.json"
DEFAULT_GPU_FRACTION = 0.25


# ------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=os.environ.get("TUNE_RICE_PROG", "python -m tune_rice.search"),
        description="Search hyperparameters of a frozen-backbone image classifier with Ray Tune "
                    "(Optuna proposes, ASHA stops early), then score the best model once on the test split.",
        formatter_class=cli.HelpFormatter)
    p.add_argument("--data", help="dataset folder (class sub-folders; prepared if it has no labels.csv) or a "
                                  "labels.csv; default: the built-in synthetic rice-leaf demo set")
    p.add_argument("--data-root", metavar="DIR", help="folder the labels.csv paths are relative to (default: the "
                                                      "folder holding it; for `prepare --out` outside DATA_DIR)")
    p.add_argument("--num-samples", type=int, default=30, help="number of trials")
    p.add_argument("--search-space", default="default",
                   help="YAML file, or the name of a bundled space: default, quick or wide (default: default)")
    p.add_argument("--max-epochs", type=int, help="epochs per trial (default: the space's max_epochs, else 10)")
    p.add_argument("--grace-period", type=int, default=2, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--reduction-factor", type=float, default=3, help="ASHA: keep 1/R of trials at each rung")
    p.add_argument("--gpus-per-trial", default="auto",
                   help=f"GPUs per trial: a number, or auto = {DEFAULT_GPU_FRACTION} when the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per trial")
    p.add_argument("--max-concurrent", type=int, default=0, help="most trials at once (0 = as resources allow)")
    p.add_argument("--storage-path", default="runs", help="where experiments are written (local path or URI)")
    p.add_argument("--name", help="experiment name (default: search-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted experiment --name")
    p.add_argument("--seed", type=int, default=0, help="seed for the search, the heads and the augmentation")
    p.add_argument("--weights", default="auto",
                   help="backbone weights: auto (ImageNet if available, else random with a warning), "
                        "imagenet, none (random init), or a state-dict file")
    p.add_argument("--feature-cache", choices=("on", "off"), default="on",
                   help="on: extract features once and train heads on them; off: run the backbone inside "
                        "every trial with online augmentation (the slow reference path)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default: $RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--wait-for-gpus", type=float, default=0, metavar="SECONDS",
                   help="autoscaling cluster whose GPU nodes scale from zero: if no GPU node is up, ask the "
                        "autoscaler for one and wait up to SECONDS before sizing trials and extracting")
    p.add_argument("--no-report", action="store_true", help="skip the plots and report.md at the end")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _validate_args(args) -> None:
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_epochs is not None and args.max_epochs < 1:
        raise UserError(f"--max-epochs must be >= 1, got {args.max_epochs}")
    if args.grace_period < 1:
        raise UserError(f"--grace-period must be >= 1, got {args.grace_period}")
    if args.reduction_factor < 2:
        raise UserError(f"--reduction-factor must be >= 2, got {args.reduction_factor}")
    if args.cpus_per_trial <= 0:
        raise UserError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}")
    if args.max_concurrent < 0:
        raise UserError(f"--max-concurrent must be >= 0, got {args.max_concurrent}")
    if args.gpus_per_trial != "auto":
        try:
            g = float(args.gpus_per_trial)
        except ValueError:
            raise UserError(f"--gpus-per-trial must be 'auto' or a number, got {args.gpus_per_trial!r}") from None
        if g < 0 or not math.isfinite(g):
            raise UserError(f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}")
    if args.resume and not args.name:
        raise UserError("--resume needs --name of the experiment to continue")


def _is_uri(path: str) -> bool:
    return "://" in str(path)


# ----------------------------------------------------------------------------------------------- data
def resolve_data(data: str | None) -> Path:
    """--data (folder, labels.csv, or nothing for the demo set) -> the path of a labels.csv.

    Data and split never depend on the search's --seed: seeds compare searches on the same data."""
    from .prepare import format_report, prepare_dataset

    if data is None:
        from .demo import ensure_demo

        # The demo data and its split stay fixed (seed 0) whatever --seed: seeds compare searches, not data.
        folder = ensure_demo()
        csv = folder / "labels.csv"
        if not csv.is_file():
            prepare_dataset(folder, progress=False)
        log.info("no --data given: using the synthetic rice-leaf demo set at %s", folder)
        return csv
    p = Path(data).expanduser().resolve()
    if p.is_file():
        return p
    if not p.exists():
        raise UserError(f"--data {data}: no such file or folder")
    csv = p / "labels.csv"
    if csv.is_file():
        log.info("using %s", csv)
        return csv
    log.info("%s has no labels.csv: preparing it now with the default split fractions", p)
    result = prepare_dataset(p)  # the default split (seed 0), the same as `python -m tune_rice.prepare`
    # prepare's own warning says the skipped files are "listed in the report": this is that report
    log.log(logging.WARNING if result.skipped or result.empty_classes else logging.INFO, "prepared %s:\n%s",
            p, format_report(result))
    return result.labels_csv


# ------------------------------------------------------------------------------------------ Ray edge
def _optuna_search_cls():
    import optuna
    from optuna.trial import TrialState
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" per search

    class PruningAwareOptunaSearch(OptunaSearch):
        """OptunaSearch that records ASHA-stopped trials as PRUNED, not COMPLETE.

        Ray reports a trial stopped by the scheduler as completed with its last (early) value, so TPE
        would take an epoch-2 score as a final one. Optuna has each trial's per-epoch values
        (``on_trial_result`` reports them), so a trial that ended before ``max_t`` is told PRUNED.
        Tune does not pass the result that made the scheduler stop a trial to ``on_trial_result``, so
        that last value is reported here before the trial is told; and an errored trial is FAIL even
        when a result comes with it (OptunaSearch would tell it COMPLETE).
        """

        def __init__(self, *args, max_t: int, **kwargs):
            super().__init__(*args, **kwargs)
            self._max_t = max_t

        def _reported(self, trial_id) -> dict:
            ot_trial = self._ot_trials[trial_id]
            return self._ot_study.get_trials(deepcopy=False)[ot_trial.number].intermediate_values

        def on_trial_result(self, trial_id, result):
            # A trial restored from a checkpoint runs the epochs after it again, with the same values
            # (tested): Optuna keeps the first and would warn for each repeat, so repeats are not passed on.
            step = result.get("training_iteration")
            if (trial_id in self._ot_trials and trial_id not in self._completed_trials
                    and step is not None and int(step) in self._reported(trial_id)):
                return None
            return super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id, result=None, error=False):
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is None or trial_id in self._completed_trials:
                return super().on_trial_complete(trial_id, result, error)
            step = (result or {}).get("training_iteration")
            value = (result or {}).get(self.metric)
            if not error and step is not None and value is not None:
                if step not in self._reported(trial_id):
                    ot_trial.report(float(value), int(step))
            if error:
                state = TrialState.FAIL
            elif step is not None and step < self._max_t:
                state = TrialState.PRUNED  # Optuna takes the last reported value as its value
            else:
                return super().on_trial_complete(trial_id, result, error)
            try:
                self._ot_study.tell(ot_trial, state=state)
            except Exception as e:  # Optuna refuses e.g. a trial already told; keep the search going
                log.warning("optuna could not record trial %s as %s: %s", trial_id, state.name, e)
            self._completed_trials.add(trial_id)

    return PruningAwareOptunaSearch


def _last_logged_step(trial_dir: str | os.PathLike | None, storage_fs=None, storage_dir: str | None = None) -> int:
    """The highest step of the TrialScalars metrics already written for a trial (0: none), from the
    event files in its local folder and, with ``storage_fs``, in its folder on the storage path: a driver
    that resumes in a new Ray session gets a new, empty local folder, and the old files are only there.
    Ray's own ``ray/tune/*`` copies live in the same files and are not counted."""
    import tempfile

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    prefix = "events.out.tfevents."
    files = sorted(Path(trial_dir).glob(prefix + "*")) if trial_dir else []
    last = 0
    with tempfile.TemporaryDirectory() as tmp:
        if storage_fs is not None and storage_dir:
            import pyarrow.fs

            local = {f.name for f in files}  # already read from the local folder
            try:
                infos = storage_fs.get_file_info(pyarrow.fs.FileSelector(storage_dir, allow_not_found=True))
                for info in infos:
                    if info.is_file and info.base_name.startswith(prefix) and info.base_name not in local:
                        with storage_fs.open_input_stream(info.path) as src:
                            (Path(tmp) / info.base_name).write_bytes(src.readall())
                        files.append(Path(tmp) / info.base_name)
            except OSError as e:  # storage not reachable now: the local files are all there is to go by
                log.debug("reading event files under %s: %s", storage_dir, e)
        for path in files:
            try:
                for event in EventFileLoader(str(path)).Load():
                    if any(not v.tag.startswith(("ray/", "_hparams_")) for v in event.summary.value):
                        last = max(last, int(event.step))
            except Exception as e:  # a truncated file from a killed driver: use what could be read
                log.debug("reading %s: %s", path, e)
    return last


def _tensorboard_callback_cls():
    from ray.tune.logger import LoggerCallback
    from torch.utils.tensorboard import SummaryWriter

    class TrialScalars(LoggerCallback):
        """Writes each trial's namespaced metrics (train/loss, valid/acc, ...) as TensorBoard scalars.

        Runs on the driver and writes into the trial's directory, which Tune syncs to the storage path,
        so it works the same on a laptop and a multi-node cluster. Ray's own TBX logger still writes the
        ``ray/tune/*`` copies and the HParams summary next to these.
        """

        def __init__(self):
            self._writers = {}
            self._last_step = {}  # trial -> the last epoch written (kept across restarts of the trial)

        def log_trial_start(self, trial):
            if trial in self._writers:
                self._writers[trial].close()
            trial.init_local_path()
            if trial not in self._last_step:  # a trial resumed by a new driver: what is written already
                self._last_step[trial] = _last_logged_step(trial.local_path, trial.storage.storage_filesystem,
                                                           trial.path)
            self._writers[trial] = SummaryWriter(trial.local_path, flush_secs=10)

        def log_trial_result(self, iteration, trial, result):
            if trial not in self._writers:
                self.log_trial_start(trial)
            writer = self._writers[trial]
            step = int(result.get("epoch", iteration))
            if step <= self._last_step[trial]:
                # An epoch run again after a restore from a checkpoint: the same numbers as the first
                # time (tested), already in TensorBoard; writing them twice draws the curve back over itself.
                return
            self._last_step[trial] = step
            for key, value in result.items():
                if ("/" in key or key == "lr") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(key, value, global_step=step)
            writer.flush()

        def log_trial_end(self, trial, failed=False):
            writer = self._writers.pop(trial, None)
            if writer is not None:
                writer.close()

    return TrialScalars


def _init_ray(address: str | None):
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs = dict(ignore_reinit_error=True, log_to_driver=True, logging_level=logging.WARNING)
    # The trainable's test hooks (TUNE_RICE_TEST_*) must reach workers that a cluster started, which do
    # not inherit this process's environment. Only when set: a job's own runtime_env stays untouched.
    hooks = {k: v for k, v in os.environ.items() if k.startswith("TUNE_RICE_TEST_")}
    if hooks:
        kwargs["runtime_env"] = {"env_vars": hooks}
    if address:
        ray.init(address=address, **kwargs)
        log.info("joined Ray cluster at %s", address)
    else:
        # A local Ray: its dashboard (if installed) listens on loopback only.
        ray.init(dashboard_host="127.0.0.1", include_dashboard=False, **kwargs)


def _cluster_gpus() -> tuple[float, float]:
    """(total GPUs in the cluster, most GPUs on any one alive node)."""
    import ray

    per_node = [n.get("Resources", {}).get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return float(sum(per_node)), float(max(per_node, default=0.0))


def _trials_at_once(cpus_per_trial: float, gpus_per_trial: float, num_samples: int) -> int:
    """How many trials the cluster's resources hold at once now: how many Tune may keep pending.

    With a searcher (and no ``max_concurrent_trials``) Tune keeps only ONE trial pending, so a trial
    starts only once the previous one is running, and trials shorter than a worker's start-up (seconds,
    for heads on a bank) never run side by side. A pending limit, unlike a concurrency limit, still
    lets an autoscaling cluster grow: pending trials are what it scales for.
    """
    import ray

    resources = ray.cluster_resources()
    n = int(resources.get("CPU", 1.0) // cpus_per_trial)
    if gpus_per_trial > 0:
        n = min(n, int(resources.get("GPU", 0.0) // gpus_per_trial))
    return max(1, min(n, num_samples))


def _wait_for_gpus(seconds: float) -> None:
    """Make sure a GPU node is up before GPUs are counted (a no-op when one is, or ``seconds`` is 0).

    With GPU workers at ``min_workers: 0`` the cluster has no GPU when the search starts: ``auto`` would
    then mean CPU trials and the autoscaler would never be asked for a GPU node.
    """
    if seconds <= 0 or _cluster_gpus()[0] > 0:
        return
    from ray.autoscaler.sdk import request_resources

    log.info("no GPU node in the cluster: asking the autoscaler for one, waiting up to %.0fs", seconds)
    request_resources(bundles=[{"GPU": 1}])
    deadline = time.monotonic() + seconds
    try:
        while _cluster_gpus()[0] == 0:
            if time.monotonic() > deadline:
                raise UserError(f"--wait-for-gpus {seconds:g}: no GPU node joined the cluster in time "
                                "(check the cluster's GPU node type and `ray status`)")
            time.sleep(5)
    finally:
        request_resources(bundles=[])  # a standing request would keep the GPU node up after the search
    log.info("a GPU node joined the cluster")


def _resolve_gpus(value: str) -> float:
    total, per_node = _cluster_gpus()
    if value == "auto":
        return DEFAULT_GPU_FRACTION if total > 0 else 0.0
    g = float(value)
    if g > per_node:
        raise UserError(f"--gpus-per-trial {value}: no node has that many GPUs (the most on one node: "
                        f"{per_node:g}, in the cluster: {total:g})")
    return g


def _extract_banks(specs: list[FeatureSpec], table: LabelTable, weights: dict[str, ResolvedWeights],
                   use_gpu: bool) -> dict[str, FeatureBank]:
    """One bank per spec, train and valid only (the test split is not touched before the end). Specs
    that see the same input tensors are extracted together (one decode pass; see extract_banks)."""
    banks = {}
    if use_gpu:  # on a GPU cluster extraction runs as Ray tasks on GPU nodes, one per shared pass
        import ray

        # 2 CPUs to decode for the GPU, but never more than a GPU node has: a task that no node can hold
        # waits forever (a GPU node started with 1 CPU would hang the search here).
        gpu_node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes()
                         if n.get("Alive") and n["Resources"].get("GPU", 0.0) >= 1]
        remote = ray.remote(num_gpus=1, num_cpus=min(2.0, max(gpu_node_cpus, default=1.0)))(extract_banks)
        groups: dict[tuple, list[FeatureSpec]] = {}
        for s in specs:
            groups.setdefault(pass_key(s), []).append(s)
        refs = [remote.remote(table, group, weights=weights, splits=("train", "valid"), progress=False)
                for group in groups.values()]
        for ref in refs:
            banks.update(ray.get(ref))
        banks = {s.name: banks[s.name] for s in specs}
    else:
        banks = extract_banks(table, specs, weights=weights, splits=("train", "valid"))
    for name, bank in banks.items():
        log.info("bank %s: %s, %.1f MB, %s", name, "from cache" if bank.from_cache else f"{bank.seconds:.1f}s",
                 bank.nbytes() / 1e6, bank.weights)
    return banks


# --------------------------------------------------------------------------------------- after fit
def summarize_trials(result_grid, metric: str, mode: str, max_epochs: int) -> pd.DataFrame:
    """One row per trial: status, epochs, whether ASHA stopped it, best/last metrics, config, where."""
    rows = []
    for r in result_grid:
        hist = r.metrics_dataframe
        last = r.metrics or {}
        trial_id = last.get("trial_id") or Path(r.path).name
        row = {"trial_id": trial_id, "status": "ERROR" if r.error else "TERMINATED"}
        if hist is not None and not hist.empty and metric in hist:
            best_i = hist[metric].idxmax() if mode == "max" else hist[metric].idxmin()
            epochs = int(hist["training_iteration"].max())
            row.update({"epochs": epochs, "stopped_early": bool(not r.error and epochs < max_epochs),
                        f"best/{metric}": float(hist.loc[best_i, metric]),
                        "best_epoch": int(hist.loc[best_i, "training_iteration"])})
            for key in ("valid/acc", "valid/loss", "valid/macro_f1", "train/loss"):
                if key in hist:
                    row[f"last/{key}"] = float(hist[key].iloc[-1])
            for key in ("node_id", "device", "gpu_ids", "weights"):
                if key in hist:
                    row[key] = hist[key].iloc[-1]
        else:
            row.update({"epochs": 0, "stopped_early": False})
        if r.error:
            row["error"] = str(r.error).strip().splitlines()[-1][:300] if str(r.error).strip() else type(r.error).__name__
        for k, v in sorted((r.config or {}).items()):
            row[f"config/{k}"] = v
        row["trial_dir"] = r.path
        rows.append(row)
    df = pd.DataFrame(rows)
    key = f"best/{metric}"
    if key in df:
        df = df.sort_values(key, ascending=(mode == "min"), na_position="last").reset_index(drop=True)
    return df


def _best_result(result_grid, metric: str, mode: str):
    """The trial with the best ``metric`` at any epoch. A trial that errored (diverged, crashed) is
    chosen only when no trial ended cleanly: its config is not one to recommend, even on a tie."""
    best, best_key = None, None
    for r in result_grid:
        hist = r.metrics_dataframe
        if hist is None or hist.empty or metric not in hist or not r.best_checkpoints:
            continue
        v = float(hist[metric].max() if mode == "max" else hist[metric].min())
        key = (r.error is None, v if mode == "max" else -v)
        if best is None or key > best_key:
            best, best_key = r, key
    return best


def _prune_checkpoints(result_grid, metric: str, mode: str) -> None:
    """Once the trials are over, delete every checkpoint but each trial's best and latest."""
    for r in result_grid:
        keep = {r.checkpoint.path} if r.checkpoint else set()
        with contextlib.suppress(Exception):  # RuntimeError when no checkpoint has the metric
            keep.add(r.get_best_checkpoint(metric, mode).path)
        for checkpoint, _ in r.best_checkpoints or []:
            if checkpoint.path not in keep:
                try:
                    checkpoint.filesystem.delete_dir(checkpoint.path)
                except OSError as e:
                    log.warning("could not delete %s: %s", checkpoint.path, e)


def build_best_model(result, base: dict, weights: dict[str, ResolvedWeights], metric: str, mode: str):
    """The best checkpoint (not the latest) of ``result`` rebuilt as backbone + head."""
    checkpoint = result.get_best_checkpoint(metric, mode)
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    cfg = TrialConfig.from_dict({**base, **result.config})
    spec = cfg.feature_spec()
    backbone, resolved = build_backbone(spec.backbone, weights=weights[spec.backbone], seed=cfg.seed,
                                        feature_layer=spec.feature_layer)
    from .model import build_head

    head = build_head(cfg.head, in_dim=state["head"]["mean"].shape[0], n_classes=len(state["classes"]),
                      hidden=cfg.hidden, dropout=cfg.dropout)
    head.load_state_dict(state["head"])
    return Classifier(backbone, head).eval(), cfg, state, resolved


def score_on_test(model: Classifier, table: LabelTable, image_size: int, *, device="auto",
                  batch_size: int = 64) -> dict:
    """The one read of the test split: full model on the test images (the metrics ``evaluate`` gives)."""
    from .evaluate import evaluate_model

    return evaluate_model(model, table, "test", image_size, device, batch_size=batch_size)


def write_test_tensorboard(folder: Path, test: dict, config: dict, trial_id: str) -> None:
    """A ``test`` run next to the trials: test scalars, the confusion matrix image, the best config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    writer.add_scalar("test/acc", test["accuracy"], 0)
    writer.add_scalar("test/macro_f1", test["macro_f1"], 0)
    writer.add_scalar("test/loss", test["loss"], 0)
    fig = confusion_figure(np.asarray(test["confusion_matrix"]), test["classes"],
                           title=f"test confusion matrix (best trial {trial_id})")
    writer.add_figure("test/confusion_matrix", fig, 0)
    plt.close(fig)
    text = f"best trial: {trial_id}\n\n    " + yaml.safe_dump(config, sort_keys=True).replace("\n", "\n    ")
    writer.add_text("best/config", text, 0)
    writer.close()


def confusion_figure(cm: np.ndarray, classes, *, title: str = "confusion matrix"):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.1 * len(classes) + 2))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > top / 2 else "black")
    fig.tight_layout()
    return fig


def format_summary(df: pd.DataFrame, test: dict | None, *, metric: str, exp_dir: Path, seconds: float,
                   phases: dict, weights: str, top: int = 5, searched: Sequence[str] | None = None) -> str:
    """The console summary; the top-trials table shows only the ``searched`` parameters (default: all)."""
    lines = []
    n = len(df)
    errored = int((df["status"] == "ERROR").sum())
    stopped = int(df.get("stopped_early", pd.Series(dtype=bool)).fillna(False).sum())
    lines.append(f"{n} trials: {n - errored - stopped} ran to the end, {stopped} stopped early by ASHA, "
                 f"{errored} errored")
    key = f"best/{metric}"
    show = [c for c in ("trial_id", key, "best_epoch", "epochs") if c in df] + \
        [c for c in df.columns if c.startswith("config/") and (searched is None or c[7:] in searched)]
    if key in df:
        table = df[df[key].notna()].head(top)[show].rename(columns=lambda c: c.replace("config/", ""))
        lines.append(f"top {min(top, len(table))} by {metric}:")
        lines.append(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if test:
        lines.append(f"TEST (scored once, best trial's best checkpoint): accuracy {test['accuracy']:.4f}, "
                     f"macro-F1 {test['macro_f1']:.4f} on {test['test_count']} images")
    if weights.startswith("random:"):
        lines.append(f"NOTE: the backbone was RANDOMLY INITIALISED ({weights}); ImageNet weights give far "
                     "better features (see README: weights).")
    lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()) + f", total {seconds:.1f}s")
    lines.append(f"outputs: {exp_dir}  (results.csv, best/model.pt, test_metrics.json, report/)")
    lines.append(f"tensorboard --logdir {exp_dir}   # then open http://localhost:6006")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def _experiment_paths(args) -> tuple[str, Path]:
    """(storage path for Ray, local folder for the driver's outputs)."""
    if _is_uri(args.storage_path):
        return args.storage_path, Path("runs").resolve() / args.name
    storage = Path(args.storage_path).expanduser().resolve()  # trials change directory: absolute paths
    return str(storage), storage / args.name


def _save_args(exp_dir: Path, args) -> None:
    exp_dir.mkdir(parents=True, exist_ok=True)
    # --resume may run from another working directory: keep paths absolute.
    if args.data is not None:
        args.data = str(Path(args.data).expanduser().resolve())
    if args.data_root is not None:
        args.data_root = str(Path(args.data_root).expanduser().resolve())
    if Path(args.search_space).expanduser().is_file():
        args.search_space = str(Path(args.search_space).expanduser().resolve())
    if args.weights not in ("auto", "imagenet", "none") and Path(args.weights).expanduser().is_file():
        args.weights = str(Path(args.weights).expanduser().resolve())
    keep = {k: v for k, v in vars(args).items() if k not in ("resume", "verbose", "address")}
    (exp_dir / ARGS_FILE).write_text(json.dumps(keep, indent=1))


def _restore_args(exp_dir: Path, args) -> None:
    saved = json.loads((exp_dir / ARGS_FILE).read_text())
    for key, value in saved.items():
        if key not in ("name", "storage_path"):
            setattr(args, key, value)


def run_search(args) -> dict:
    """The whole search; returns a dict of what it produced (used by tests and benchmarks)."""
    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    if not args.name:
        args.name = "search-" + datetime.now().strftime("%Y%m%d-%H%M%S")
    storage, exp_dir = _experiment_paths(args)
    ray_exp_path = f"{storage.rstrip('/')}/{args.name}"
    if args.resume:
        if _is_uri(args.storage_path) and not (exp_dir / ARGS_FILE).is_file():
            _fetch_args(exp_dir, ray_exp_path)
        if not (exp_dir / ARGS_FILE).is_file():
            raise UserError(f"--resume: no experiment {args.name!r} under {args.storage_path} "
                            f"({exp_dir / ARGS_FILE} not found)")
        _restore_args(exp_dir, args)
        uri = _is_uri(args.storage_path)

        def finished_file(name: str) -> bytes | None:  # from the local folder, else from the storage URI
            local = exp_dir / name
            return local.read_bytes() if local.is_file() else (_remote_read(ray_exp_path, name) if uri else None)

        if finished_file("test_metrics.json") is not None:
            # Finished already: the test split was scored once; scoring it again would break that promise.
            where = ray_exp_path if uri else exp_dir
            summary = finished_file("summary.txt")
            print(summary.decode() if summary else f"{where}: finished", flush=True)
            raise UserError(f"--resume: {args.name!r} already finished (test split scored, results in {where}); "
                            "nothing to resume")
        log.info("resuming %s with its original arguments", exp_dir)
    elif exp_dir.exists() and any(exp_dir.iterdir()):
        raise UserError(f"{exp_dir} already exists: pass --resume to continue it, or another --name")
    elif _is_uri(args.storage_path) and _remote_exists(ray_exp_path):
        # Another job (or machine) ran this name: a new search would write into its experiment.
        raise UserError(f"{ray_exp_path} already exists: pass --resume to continue it, or another --name")

    space: SearchSpace = load_search_space(args.search_space)
    max_epochs = args.max_epochs or space.max_epochs or 10
    if args.grace_period > max_epochs:
        raise UserError(f"--grace-period {args.grace_period} is more than the {max_epochs} epochs per trial")
    t = time.perf_counter()
    labels_csv = resolve_data(args.data)
    table = read_labels_checked(labels_csv, args.data_root)
    for split in ("train", "valid", "test"):
        if table.split(split).empty:
            raise UserError(f"{labels_csv}: the {split} split is empty")
    phases["data"] = time.perf_counter() - t

    _init_ray(args.address)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    _wait_for_gpus(args.wait_for_gpus)
    gpus = _resolve_gpus(args.gpus_per_trial)
    specs = space.feature_specs(seed=args.seed)
    weights = {b: resolve_weights(b, args.weights, seed=args.seed) for b in {s.backbone for s in specs}}
    t = time.perf_counter()
    banks = None
    if args.feature_cache == "on":
        banks = _extract_banks(specs, table, weights, use_gpu=_cluster_gpus()[0] > 0)
    phases["extract"] = time.perf_counter() - t

    base = {"epochs": max_epochs, "seed": args.seed}
    trainable = tune.with_parameters(
        _trainable(), banks=banks, labels_csv=str(table.csv_path) if banks is None else None,
        data_root=str(table.root) if banks is None else None,
        weights=weights if banks is None else None, base=base, metric=space.metric, mode=space.mode)
    trainable = tune.with_resources(trainable, {"cpu": args.cpus_per_trial, "gpu": gpus})
    searcher = _optuna_search_cls()(metric=space.metric, mode=space.mode, seed=args.seed, max_t=max_epochs)
    scheduler = ASHAScheduler(metric=space.metric, mode=space.mode, time_attr="training_iteration",
                              max_t=max_epochs, grace_period=args.grace_period,
                              reduction_factor=args.reduction_factor)
    run_config = tune.RunConfig(
        name=args.name, storage_path=storage, verbose=1, progress_reporter=_progress_reporter(space, ray_exp_path),
        # Every checkpoint is kept until the search ends (then _prune_checkpoints): with num_to_keep, Tune
        # deletes a trial's previous checkpoint before its experiment snapshot stops naming it, and a driver
        # killed in between left a trial that --resume could only mark errored.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None, checkpoint_score_attribute=space.metric,
                                                checkpoint_score_order=space.mode),
        failure_config=tune.FailureConfig(max_failures=2),
        callbacks=[_tensorboard_callback_cls()()])
    t = time.perf_counter()
    if args.resume:
        if not tune.Tuner.can_restore(ray_exp_path):
            raise UserError(f"--resume: {ray_exp_path} has no Ray Tune state to restore (did the search start?)")
        # Tuner.restore unpickles the experiment state: point it only at your own experiments.
        tuner = tune.Tuner.restore(ray_exp_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        # Written only now: an input error found above (GPUs, weights, images) leaves no folder behind.
        _save_args(exp_dir, args)
        if _is_uri(args.storage_path):  # next to Ray's experiment state, so that --resume finds it anywhere
            _upload(exp_dir, ray_exp_path)
        tuner = tune.Tuner(
            trainable, param_space=space.tune_space(),
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=args.num_samples,
                                        max_concurrent_trials=args.max_concurrent or None,
                                        # A trial on a bank trains in seconds; starting a fresh worker
                                        # process (torch import) for each costs more than that.
                                        reuse_actors=True,
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=run_config)
    pending = args.max_concurrent or _trials_at_once(args.cpus_per_trial, gpus, args.num_samples)
    with _env_default("TUNE_MAX_PENDING_TRIALS_PG", str(pending)):
        result_grid = tuner.fit()
    phases["trials"] = time.perf_counter() - t

    df = summarize_trials(result_grid, space.metric, space.mode, max_epochs)
    exp_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(exp_dir / "results.csv", index=False)
    _prune_checkpoints(result_grid, space.metric, space.mode)
    best = _best_result(result_grid, space.metric, space.mode)
    if best is None:
        first = next((r.error for r in result_grid if r.error), None)
        raise UserError(f"all {len(df)} trials failed; first error: {str(first).strip().splitlines()[-1] if first else 'none'}"
                        f" (details in {exp_dir})")
    t = time.perf_counter()
    model, cfg, state, resolved = build_best_model(best, base, weights, space.metric, space.mode)
    best_dir = exp_dir / "best"
    best_id = best.metrics.get("trial_id") or Path(best.path).name
    trial_config = cfg.to_dict()
    metrics = {"trial_id": best_id, "best_epoch": int(state["epoch"]), space.metric: float(state["best"])}

    def save_best(extra: dict) -> None:
        save_artifact(best_dir / "model.pt", model, classes=table.classes,
                      preprocessing=preprocessing_spec(cfg.image_size), weights=resolved, config=trial_config,
                      metrics={**metrics, **extra})

    save_best({})  # before the test images are read: a bad test file must not lose the winner
    try:
        test = score_on_test(model, table, cfg.image_size)
    except UserError as e:  # an unreadable test image, already reduced to one line
        raise UserError(f"scoring the test split failed: {e}. The best model is saved at {best_dir / 'model.pt'}; "
                        "fix or remove the file, then score it with python -m tune_rice.evaluate") from None
    save_best({"test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"]})
    (best_dir / "config.yaml").write_text(yaml.safe_dump(
        {"trial_id": best_id, "metric": space.metric, "best_value": float(state["best"]), "epoch": int(state["epoch"]),
         "weights": resolved.identity, "config": trial_config}, sort_keys=False))
    test_out = {"trial_id": best_id, "weights": resolved.identity, "pretrained": resolved.pretrained, **test}
    (exp_dir / "test_metrics.json").write_text(json.dumps(test_out, indent=1))
    write_test_tensorboard(exp_dir / "test", test, trial_config, best_id)
    phases["test"] = time.perf_counter() - t
    if not args.no_report:
        t = time.perf_counter()
        try:
            from .report import write_report

            write_report(exp_dir)
        except UserError as e:
            log.warning("report not written: %s", e)
        phases["report"] = time.perf_counter() - t
    seconds = time.perf_counter() - t_start
    summary = format_summary(df, test, metric=space.metric, exp_dir=exp_dir, seconds=seconds, phases=phases,
                             weights=resolved.identity, searched=space.searched)
    (exp_dir / "summary.txt").write_text(summary + "\n")
    trial_seconds = [float(r.metrics.get("time_total_s", 0.0)) for r in result_grid if r.metrics]
    (exp_dir / "timings.json").write_text(json.dumps(
        {"seconds": seconds, "phases": phases, "trial_seconds": trial_seconds,
         "banks": {name: {"seconds": b.seconds, "from_cache": b.from_cache, "mb": b.nbytes() / 1e6, **b.info}
                   for name, b in (banks or {}).items()}}, indent=1))
    if _is_uri(args.storage_path):
        _upload(exp_dir, ray_exp_path)
    print("\n" + summary, flush=True)
    return {"exp_dir": exp_dir, "results": df, "test": test_out, "phases": phases, "seconds": seconds,
            "banks": banks, "best_trial": best_id}


def _upload(local: Path, uri: str) -> None:
    import pyarrow.fs

    fs, path = _storage_fs(uri)
    fs.create_dir(path, recursive=True)  # object stores need no folders; file systems (file://) do
    for name in ("results.csv", "test_metrics.json", "summary.txt", "timings.json", ARGS_FILE, "best", "test",
                 "report"):
        src = local / name
        if src.exists():
            if src.is_dir():
                fs.create_dir(f"{path}/{name}", recursive=True)
            pyarrow.fs.copy_files(str(src), f"{path}/{name}", source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)
    log.info("outputs copied to %s", uri)


def _storage_fs(uri: str):
    """(pyarrow file system, path) for a URI storage path; a URI it cannot open is a UserError."""
    import pyarrow
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError, ValueError) as e:
        raise UserError(f"--storage-path: cannot open {uri} ({e})") from None


def _remote_read(uri: str, name: str) -> bytes | None:
    """The file ``name`` under the experiment ``uri``, or None when it is not there. Any other failure
    (credentials, permissions, network) is a UserError: "not there" would mislead."""
    import pyarrow.fs

    fs, path = _storage_fs(uri)
    try:
        if fs.get_file_info(f"{path}/{name}").type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(f"{path}/{name}") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"--storage-path: cannot read {uri}/{name} ({e})") from None


def _remote_exists(uri: str) -> bool:
    """Whether the experiment ``uri`` holds anything (an object store has no empty folders)."""
    import pyarrow.fs

    fs, path = _storage_fs(uri)
    try:
        info = fs.get_file_info(path)
        if info.type != pyarrow.fs.FileType.Directory:
            return info.type != pyarrow.fs.FileType.NotFound
        return bool(fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True)))
    except OSError as e:
        raise UserError(f"--storage-path: cannot list {uri} ({e})") from None


def _fetch_args(exp_dir: Path, uri: str) -> None:
    """``--resume`` with a URI storage path from another machine or job (``ray job submit`` runs each job
    in a fresh working directory): bring ``search_args.json`` back from the storage path."""
    data = _remote_read(uri, ARGS_FILE)
    if data is not None:
        exp_dir.mkdir(parents=True, exist_ok=True)
        (exp_dir / ARGS_FILE).write_bytes(data)


@contextlib.contextmanager
def _env_default(name: str, value: str):
    """Set environment variable ``name`` for the duration, unless the user has set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _progress_reporter(space: SearchSpace, results: str):
    """Ray's trial status table with the columns that matter, and nothing per trial.

    Ray heads the table with ``Result logdir: <its staging folder under /tmp/ray>``, where nothing of the
    search is kept; that line names ``results`` (the experiment folder or URI) instead.

    Ray's newer console output (``RAY_AIR_NEW_OUTPUT=1``) adds a config box when each trial starts and
    a box of every metric when it ends: about 40 lines a trial, which buries the status table. The
    classic reporter prints the table alone. Each improvement forces an experiment snapshot (we keep
    one checkpoint per trial), which Ray would otherwise warn about on every fast trial.
    """
    from ray import tune

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    metrics = {"training_iteration": "epochs", space.metric: space.metric}
    for key in ("valid/acc", "valid/loss"):
        metrics.setdefault(key, key)

    class Reporter(tune.CLIReporter):
        def _print(self, msg: str):
            super()._print("\n".join(f"Results: {results}" if line.startswith("Result logdir: ") else line
                                     for line in msg.splitlines()))

    return Reporter(metric_columns=metrics, parameter_columns=space.searched, metric=space.metric,
                    mode=space.mode, max_report_frequency=30, max_column_length=16)


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trainable():
    from .trainable import train_head

    return train_head


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    _validate_args(args)
    run_search(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
