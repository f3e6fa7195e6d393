"""Ray Tune glue for the search: Ray start-up, GPU sizing, the Optuna searcher, the TensorBoard callback
and the console reporter.

Everything here is about Ray and Tune, and nothing here knows how a trial trains (``trainable.py``) or
what a search does in which order (``search.py``).

Ray and Optuna are imported inside the functions that need them, never at the top: ``tune-rice search``
reads and checks its arguments and data (and answers ``--help`` or a user error) before it pays the few
seconds Ray Tune and Optuna take to import. That is why the Tune subclasses (the searcher, the TensorBoard
callback, the reporter) are defined inside the ``*_cls`` / ``progress_reporter`` factories: their base
classes exist only once Ray is imported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from .. import UserError
from ..experiment.space import SearchSpace
from ..experiment.study import TRIAL_ID_ATTR

log = logging.getLogger(__name__)

DEFAULT_GPU_FRACTION = 0.25


# ------------------------------------------------------------------------------------------- searcher
def optuna_search_cls():
    import optuna
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

        def __init__(self, *args, max_t: int, first: Sequence[dict] = (), **kwargs):
            # Set before OptunaSearch.__init__, which sets the study up (_setup_study) when given a space.
            self._max_t = max_t
            self._first = [dict(p) for p in first]
            super().__init__(*args, **kwargs)

        def _setup_study(self, mode):
            super()._setup_study(mode)
            # Trials to run first, each may fix only some parameters (the rest are sampled). Enqueued
            # here rather than through points_to_evaluate, which wants every parameter; a resumed
            # search's study holds them already and skips them.
            assert self._ot_study is not None
            for point in self._first:
                self._ot_study.enqueue_trial(point, skip_if_exists=True)

        def suggest(self, trial_id):
            config = super().suggest(trial_id)
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None and isinstance(config, dict):
                # which trial_<id> folder it is, in the kept study (optuna-dashboard shows user attrs)
                ot_trial.set_user_attr(TRIAL_ID_ATTR, trial_id)
            return config

        def _reported(self, trial_id) -> dict:
            ot_trial = self._ot_trials[trial_id]
            assert self._ot_study is not None  # set up before any trial is suggested
            return self._ot_study.get_trials(deepcopy=False)[ot_trial.number].intermediate_values

        def on_trial_result(self, trial_id, result):
            # A trial restored from a checkpoint runs the epochs after it again, with the same values
            # (tested): Optuna keeps the first and would warn for each repeat, so repeats are not passed on.
            step = result.get("training_iteration")
            if (
                trial_id in self._ot_trials
                and trial_id not in self._completed_trials
                and step is not None
                and int(step) in self._reported(trial_id)
            ):
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
            state = _ended_state(error, step, self._max_t)
            if state is None:
                return super().on_trial_complete(trial_id, result, error)
            try:
                self._ot_study.tell(ot_trial, state=state)
            except Exception as e:  # Optuna refuses e.g. a trial already told; keep the search going
                log.warning("optuna could not record trial %s as %s: %s", trial_id, state.name, e)
            self._completed_trials.add(trial_id)

    return PruningAwareOptunaSearch


def _ended_state(error: bool, step: int | None, max_t: int):
    """How Optuna records a trial that Tune reports ended: FAIL when it errored, PRUNED when it stopped
    before ``max_t`` epochs (Optuna takes the last reported value as its value), or None: COMPLETE, as
    OptunaSearch tells it."""
    from optuna.trial import TrialState

    if error:
        return TrialState.FAIL
    if step is not None and step < max_t:
        return TrialState.PRUNED
    return None


# ---------------------------------------------------------------------------------------- TensorBoard
def last_logged_step(trial_dir: str | os.PathLike | None, storage_fs=None, storage_dir: str | None = None) -> int:
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


def tensorboard_callback_cls():
    from ray.tune.logger import LoggerCallback
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    class TrialScalars(LoggerCallback):
        """The trials' TensorBoard runs: namespaced scalars (train/loss, train/lr, valid/acc, ...), an
        HParams summary of the ``params`` against the ``metrics``, and a note on the backbone's weights.

        Runs on the driver and writes into the trial's directory, which Tune syncs to the storage path,
        so it works the same on a laptop and a multi-node cluster. It replaces Ray's TBX logger (the search
        turns Ray's automatic loggers off, see run_trials), which wrote every scalar a second time under
        ``ray/tune/``: those cards came first on the page and buried the ``train/`` and ``valid/`` ones.
        """

        def __init__(self, params=None, metrics=("valid/acc", "valid/loss")):
            self._params = None if params is None else list(params)  # None: every config value
            self._metrics = list(metrics)
            self._writers = {}
            self._last_step = {}  # trial -> the last epoch written (kept across restarts of the trial)

        def log_trial_start(self, trial):
            if trial in self._writers:
                self._writers[trial].close()
            trial.init_local_path()
            if trial not in self._last_step:  # a trial resumed by a new driver: what is written already
                self._last_step[trial] = last_logged_step(
                    trial.local_path, trial.storage.storage_filesystem, trial.path
                )
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
            if step == 1:  # once per trial: a trial resumed past its first epoch has them already
                self._write_trial_info(writer, trial, result)
            for key, value in result.items():
                if ("/" in key or key == "lr") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar("train/lr" if key == "lr" else key, value, global_step=step)
            writer.flush()

        def _write_trial_info(self, writer, trial, result):
            config = {
                k: _hparam_value(v)
                for k, v in sorted(trial.config.items())
                if self._params is None or k in self._params
            }
            for summary in hparams(config, dict.fromkeys(self._metrics, 0.0)):
                writer.file_writer.add_summary(summary)
            if result.get("weights"):
                writer.add_text("weights", weights_text(trial.config.get("backbone", "backbone"), result["weights"]), 0)

        def log_trial_end(self, trial, failed=False):
            writer = self._writers.pop(trial, None)
            if writer is not None:
                writer.close()

    return TrialScalars


def _hparam_value(value):
    """A config value as the HParams summary takes it (bool, int, float or str)."""
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def weights_text(backbone: str, identity: str) -> str:
    """A trial's TensorBoard note on where its backbone's numbers came from; random init is flagged."""
    if str(identity).startswith("random:"):
        return (
            f"**{backbone}: RANDOMLY INITIALISED ({identity})**, not pretrained: this trial's features come "
            "from a random backbone, and its scores are far below what ImageNet weights give."
        )
    return f"{backbone}: {identity}"


# ------------------------------------------------------------------------------- Ray start, GPU sizing
def init_ray(address: str | None):
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=True, logging_level=logging.WARNING)
        log.info("joined Ray cluster at %s", address)
    else:
        # A local Ray: its dashboard (if installed) listens on loopback only.
        ray.init(
            dashboard_host="127.0.0.1",
            include_dashboard=False,
            ignore_reinit_error=True,
            log_to_driver=True,
            logging_level=logging.WARNING,
        )


def cluster_gpus() -> tuple[float, float]:
    """(total GPUs in the cluster, most GPUs on any one alive node)."""
    import ray

    per_node = [n.get("Resources", {}).get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    return float(sum(per_node)), float(max(per_node, default=0.0))


def trials_at_once(cpus_per_trial: float, gpus_per_trial: float, num_samples: int) -> int:
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


def wait_for_gpus(seconds: float) -> None:
    """Make sure a GPU node is up before GPUs are counted (a no-op when one is, or ``seconds`` is 0).

    With GPU workers at ``min_workers: 0`` the cluster has no GPU when the search starts: ``auto`` would
    then mean CPU trials and the autoscaler would never be asked for a GPU node.
    """
    if seconds <= 0 or cluster_gpus()[0] > 0:
        return
    from ray.autoscaler.sdk import request_resources

    log.info("no GPU node in the cluster: asking the autoscaler for one, waiting up to %.0fs", seconds)
    request_resources(bundles=[{"GPU": 1}])
    deadline = time.monotonic() + seconds
    try:
        while cluster_gpus()[0] == 0:
            if time.monotonic() > deadline:
                raise UserError(
                    f"--wait-for-gpus {seconds:g}: no GPU node joined the cluster in time "
                    "(check the cluster's GPU node type and `ray status`)"
                )
            time.sleep(5)
    finally:
        request_resources(bundles=[])  # a standing request would keep the GPU node up after the search
    log.info("a GPU node joined the cluster")


def resolve_gpus(value: str) -> float:
    total, per_node = cluster_gpus()
    if value == "auto":
        return DEFAULT_GPU_FRACTION if total > 0 else 0.0
    g = float(value)
    if g > per_node:
        raise UserError(
            f"--gpus-per-trial {value}: no node has that many GPUs (the most on one node: "
            f"{per_node:g}, in the cluster: {total:g})"
        )
    return g


# ----------------------------------------------------------------------------- running trials, console
@contextlib.contextmanager
def env_default(name: str, value: str):
    """Set environment variable ``name`` for the duration, unless the user has set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def progress_reporter(space: SearchSpace, results: str):
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
            super()._print(
                "\n".join(
                    f"Results: {results}" if line.startswith("Result logdir: ") else line for line in msg.splitlines()
                )
            )

    return Reporter(
        metric_columns=metrics,
        parameter_columns=space.searched,
        metric=space.metric,
        mode=space.mode,
        max_report_frequency=30,
        max_column_length=16,
    )


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"
