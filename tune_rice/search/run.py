"""``python -m tune_rice.search``: the hyperparameter search, end to end.

data -> labels.csv -> feature banks (once) -> Ray Tune (OptunaSearch proposes, ASHA stops the weak,
trials train heads on the banks) -> the final model chosen on valid from the best checkpoints of the top
trials (an ensemble or the single best, temperature-calibrated; ``final.py``) -> scored ONCE on the test
split -> ``runs/<name>/`` with results.csv, final.json, best/model.pt, test_metrics.json, TensorBoard runs.

:func:`run_search` lists the phases in order; each is a function below it or in a module of its own:
the Ray Tune glue (searcher, TensorBoard callback, reporter, Ray start, GPU sizing) in ``tune_glue.py``;
experiment folders, saved arguments and storage-URI I/O in ``experiment/storage.py``; results.csv, the
final model and the one read of the test split in ``results.py``; the console summary and baseline.json
in ``summary.py``; every test read in the ledger beside labels.csv (``experiment/ledger.py``).

``--extend N`` grows a finished experiment: N more trials in ``runs/<name>/extend-<k>/`` with the kept
Optuna study (warm start), the final model chosen again over all trials, the test split read again and
that read recorded. :func:`search` is ``tune_rice.search(...)``, the Python API (the package is callable).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import UserError, cli
from ..data.images import LabelTable, is_labels_file, prepared_labels_path, read_labels_checked
from ..experiment import ledger, storage, study
from ..experiment.space import (
    CLI_METRICS,
    SearchSpace,
    bundled_spaces,
    linear_point,
    load_search_space,
    space_difference,
    with_metric,
)
from ..experiment.storage import SPACE_KEY, ExperimentPaths
from ..features.bank import FeatureBank, FeatureSpec, by_reference, extract_banks, pooled_banks
from ..features.model import ResolvedWeights, fetch_hint, resolve_weights
from ..heads import final
from ..heads.audit import (
    DataAudit,
    audit_bank,
    audit_before_trials,
    audit_test,
    feature_network,
    first_view,
    summary_lines,
    write_audit,
)
from ..heads.cv import CV_AUTO_BELOW, CV_AUTO_FOLDS, bank_folds, resolve_folds
from ..heads.probe import Baseline, fit_probes
from ..records import (
    ARGS_FILE,
    BASELINE_FILE,
    BEST_DIR,
    FINAL_FILE,
    LABELS_FILE,
    MODEL_PATH,
    RESULTS_FILE,
    SUMMARY_FILE,
    TEST_MARK,
    TEST_METRICS_FILE,
    TIMINGS_FILE,
)
from . import tracking, tune_glue
from .config import SearchConfig, parse_duration
from .results import TOP_CANDIDATES, Winner, collect_results, save_winner, score_winner
from .summary import baseline_record, format_summary

if TYPE_CHECKING:
    from ..tools.api import SearchResult

log = logging.getLogger("tune_rice.search")

DEFAULT_GPU_FRACTION = tune_glue.DEFAULT_GPU_FRACTION
EXTEND_PREFIX = "extend-"  # runs/<name>/extend-<k>/: the k-th --extend batch, a Ray experiment of its own
# What an --extend replaces, moved to runs/<name>/extend-<k>/before/ first.
ARCHIVED = (BEST_DIR, FINAL_FILE, TEST_MARK, TEST_METRICS_FILE, SUMMARY_FILE, RESULTS_FILE, "test", "report")


# ------------------------------------------------------------------------------------------ arguments
D = SearchConfig()  # the defaults: one place, shared with tune_rice.search(...) in Python


def build_parser() -> argparse.ArgumentParser:
    """``tune-rice search``'s options in groups; :func:`parse_config` turns them into a SearchConfig."""
    p = argparse.ArgumentParser(
        prog=os.environ.get("TUNE_RICE_PROG", "python -m tune_rice.search"),
        description="Search hyperparameters of a frozen-backbone image classifier with Ray Tune "
        "(Optuna proposes, ASHA stops early), choose the final model on valid and score it once on the test split.",
        formatter_class=cli.HelpFormatter,
    )
    _data_options(p.add_argument_group("data"))
    _model_options(p.add_argument_group("model and features"))
    _search_options(p.add_argument_group("search"))
    _experiment_options(p.add_argument_group("experiment and outputs"))
    _resource_options(p.add_argument_group("resources (Ray)"))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _data_options(g) -> None:
    g.add_argument(
        "--data",
        help="a labels.csv; or a dataset folder (one sub-folder per class, or train/ valid/ test/ "
        "folders of them), or a CSV of image paths and labels, prepared if no labels.csv is there yet; "
        "default: the bundled synthetic rice-leaf demo set",
    )
    g.add_argument(
        "--data-root",
        metavar="DIR",
        help="folder the labels.csv paths are relative to (default: the "
        "folder holding it; for `prepare --out` outside DATA_DIR); for a CSV of images, their folder",
    )
    g.add_argument("--path-col", metavar="NAME", help="a CSV of images: its column of paths or ids (default: found)")
    g.add_argument("--label-col", metavar="NAME", help="a CSV of images: its column of labels (default: found)")


def _model_options(g) -> None:
    g.add_argument(
        "--search-space",
        default=D.search_space,
        help=f"YAML file, or the name of a bundled space ({', '.join(bundled_spaces())}); default: {D.search_space}",
    )
    g.add_argument(
        "--metric",
        choices=CLI_METRICS,
        help="what the trials, the probe and the final model are judged by on valid (default: the space's metric; "
        "macro_f1 or balanced_acc for imbalanced classes)",
    )
    g.add_argument(
        "--weights",
        help="backbone weights: imagenet (the published pretrained weights; when they cannot be had the "
        "search stops before any work, saying where they were looked for and how to fetch them), auto "
        "(pretrained if available, else random init with a warning), none (random init), or a state-dict "
        "file. Default: imagenet with --data, auto for the built-in demo set",
    )
    g.add_argument(
        "--bank",
        choices=("on", "off"),
        default=D.bank,
        help="on: extract features once into a feature bank and train heads on it; off: run the backbone "
        "inside every trial with online augmentation (the slow reference path)",
    )
    g.add_argument(
        "--feature-cache", dest="bank", choices=("on", "off"), action=_Renamed, const="--bank", help=argparse.SUPPRESS
    )
    g.add_argument(
        "--bank-cache",
        metavar="DIR",
        help="folder of the feature-bank cache (default: $TUNE_RICE_CACHE/features, else "
        "~/.cache/tune_rice/features); on a cluster, a folder every node shares",
    )


def _search_options(g) -> None:
    g.add_argument("--num-samples", type=int, default=D.num_samples, help="number of trials")
    g.add_argument("--max-epochs", type=int, help="epochs per trial (default: the space's max_epochs, else 10)")
    g.add_argument("--grace-period", type=int, default=D.grace_period, help="ASHA: epochs before a trial can stop")
    g.add_argument("--reduction-factor", type=float, default=D.reduction_factor, help="ASHA: keep 1/R at each rung")
    g.add_argument(
        "--cv",
        default=D.cv,
        metavar="K|auto|off",
        help="cross-validate every trial on the bank: train+valid pooled into K folds (by group and "
        f"class), K heads per trial, out-of-fold scores; auto = {CV_AUTO_FOLDS} folds when valid "
        f"has fewer than {CV_AUTO_BELOW} images (default: off)",
    )
    g.add_argument(
        "--ensemble",
        type=int,
        default=D.ensemble,
        metavar="K",
        help="after the trials, greedy ensemble selection on valid over the best checkpoints of the "
        f"top {TOP_CANDIDATES} trials, up to K heads; deployed only when not worse than the single "
        "best on valid. 1 = the single best trial",
    )
    g.add_argument("--seed", type=int, default=D.seed, help="seed for the search, the heads and the augmentation")
    g.add_argument(
        "--time-budget",
        metavar="DURATION",
        help="stop starting trials after this long (2h, 90m, 40s or seconds); running trials are "
        "stopped, and the best trial so far is still scored once on test",
    )


def _experiment_options(g) -> None:
    g.add_argument("--storage-path", default=D.storage_path, help="where experiments are written (path or URI)")
    g.add_argument("--name", help="experiment name (default: search-<timestamp>)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted experiment --name")
    g.add_argument(
        "--extend",
        type=int,
        default=D.extend,
        metavar="N",
        help="add N trials to the finished experiment --name (same space, Optuna warm-started from its "
        "study), choose the final model again over all trials and score it on test again (a recorded read)",
    )
    g.add_argument(
        "--log-to",
        action="append",
        metavar="TRACKER",
        help="also log to an experiment tracker: mlflow[=URI] or wandb[=PROJECT] (repeat, or a comma list): "
        "each trial's parameters and per-epoch metrics, then the final model's test metrics and files as a "
        "run of its own (docs/trackers.md; extras tune-rice[mlflow], tune-rice[wandb])",
    )
    g.add_argument("--no-report", action="store_true", help="skip the plots and report.md at the end")


def _resource_options(g) -> None:
    g.add_argument(
        "--gpus-per-trial",
        default=D.gpus_per_trial,
        help=f"GPUs per trial: a number, or auto = {DEFAULT_GPU_FRACTION} when the cluster has GPUs, else 0",
    )
    g.add_argument("--cpus-per-trial", type=float, default=D.cpus_per_trial, help="CPUs reserved per trial")
    g.add_argument("--max-concurrent", type=int, default=D.max_concurrent, help="most trials at once (0: all fit)")
    g.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster to join (default: $RAY_ADDRESS, else start a local Ray)",
    )
    g.add_argument(
        "--wait-for-gpus",
        type=float,
        default=D.wait_for_gpus,
        metavar="SECONDS",
        help="autoscaling cluster whose GPU nodes scale from zero: if no GPU node is up, ask the "
        "autoscaler for one and wait up to SECONDS before sizing trials and extracting",
    )


class _Renamed(argparse.Action):
    """An old option name (``const``: the new one): taken as the new one, with a note naming it."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is now {self.const} (the old name still works)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def parse_config(argv: Sequence[str] | None = None) -> SearchConfig:
    """The command line as a SearchConfig (checked by :meth:`SearchConfig.validate` before the search)."""
    return SearchConfig(**vars(build_parser().parse_args(argv)))


# ------------------------------------------------------------------------------------------ the search
class _Clock:
    """Seconds per named phase, in the order they ran."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        yield
        self.phases[name] = time.perf_counter() - t

    def total(self) -> float:
        return time.perf_counter() - self.start


def run_search(config: SearchConfig) -> dict:
    """The whole search (or, with ``config.extend``, more trials for a finished one); returns a dict of what
    it produced (used by tests, benchmarks and ``tune_rice.search(...)``)."""
    clock = _Clock()
    paths = open_experiment(config)
    space, max_epochs = load_space(config, paths)
    specs = space.feature_specs(seed=config.seed)
    weights = backbone_weights(config, specs, paths)  # before any work: missing weights stop the search here
    with clock("data"):
        table = load_data(config)
    gpus = start_ray(config)
    with clock("extract"):
        banks = search_banks(config, specs, table, weights)
    with clock("probe"):
        baseline = fit_baseline(config, table, banks, specs, weights, space)
    with clock("audit"):
        data_audit = audit_train_valid(config, table, banks, baseline, weights)
    base = {"epochs": max_epochs, "seed": config.seed}
    with clock("trials"):
        if not (config.resume or config.extend):  # only now: an input error found above leaves no folder behind
            record_start(config, paths, weights, space)
        result_grid = run_trials(config, paths, space, base, trial_data(table, banks, weights, baseline.folds), gpus)
    ended = study.close_unfinished(
        paths.local,
        reason="time budget" if config.time_budget else "the search ended before Tune told the searcher",
    )
    df, best = collect_results(result_grid, space, max_epochs, paths.local, baseline, budget=config.time_budget)
    with clock("final"):
        probes = final.probe_candidates(baseline.probes, baseline.banks, metric=space.metric)
        # (an --extend moved the earlier final.json away: the choice is made again over all the trials)
        winner = save_winner(result_grid, base, weights, space, table, banks, paths, k=config.ensemble, extra=probes)
    with clock("test"):
        net = feature_network(data_audit, winner.fm.single_best.spec.preprocessing)
        test = score_winner(winner, table, paths, features=net)
        reads = record_test_read(table, "extend" if config.extend else "search", paths)
        test["test_reads"] = reads  # the summary's TEST line says when this is not the split's first read
    with clock("test audit"):
        audit_lines = audit_test_split(
            data_audit, table, test.pop("predictions", None), test.pop("features", None), paths
        )
    if not config.no_report:
        with clock("report"):
            write_report_or_warn(paths.local)
    notes = budget_notes(config, df, ended, clock.phases["trials"]) + extend_notes(config, df, reads, table)
    summary = write_outputs(
        paths, df, test, space, winner, weights, clock, result_grid, banks, baseline, notes=notes, audit=audit_lines
    )
    tracking.log_final(
        tracking.parse_log_to(config.log_to),
        experiment=paths.local.name,
        storage_path=config.storage_path,
        exp_dir=paths.local,
    )
    print("\n" + summary, flush=True)
    return {
        "exp_dir": paths.local,
        "results": df,
        "test": test,
        "phases": clock.phases,
        "seconds": clock.total(),
        "banks": banks,
        "best_trial": winner.trial_id,
        "probes": baseline.probes,
        "test_reads": reads,
    }


# ---------------------------------------------------------------------------- experiment and arguments
def open_experiment(config: SearchConfig) -> ExperimentPaths:
    """Name the experiment and find its folders. ``--resume``: restore its arguments and refuse one that
    finished; ``--extend``: restore them and refuse one that has not; a new search: refuse a name that is
    taken, locally or on the storage path."""
    if not config.name:
        config.name = "search-" + datetime.now().strftime("%Y%m%d-%H%M%S")
    paths = storage.experiment_paths(config.storage_path, config.name)
    if config.resume:
        _restore_experiment(config, paths)
    elif config.extend:
        _restore_finished(config, paths)
    elif paths.local.exists() and any(paths.local.iterdir()):
        raise UserError(f"{paths.local} already exists: pass --resume to continue it, or another --name")
    elif paths.remote and storage.remote_exists(paths.ray_path):
        # Another job (or machine) ran this name: a new search would write into its experiment.
        raise UserError(f"{paths.ray_path} already exists: pass --resume to continue it, or another --name")
    return paths


def _restore_saved(config: SearchConfig, paths: ExperimentPaths, what: str) -> None:
    args_file = paths.local / ARGS_FILE
    if paths.remote and not args_file.is_file():
        storage.fetch_args(paths.local, paths.ray_path)
    if not args_file.is_file():
        raise UserError(f"{what}: no experiment {config.name!r} under {config.storage_path} ({args_file} not found)")
    config.restore(storage.load_args(paths.local))


def _restore_finished(config: SearchConfig, paths: ExperimentPaths) -> None:
    """``--extend N``: the finished experiment's arguments, N trials more, its test split read again."""
    if paths.remote:
        raise UserError(f"--extend: {paths.ray_path}: extending works on a local --storage-path only")
    extend, space = config.extend, config.search_space
    _restore_saved(config, paths, "--extend")
    if paths.read(TEST_METRICS_FILE) is None:
        raise UserError(
            f"--extend: {config.name!r} has not finished (no test_metrics.json in {paths.local}); "
            "--resume it first, or start a new --name"
        )
    given = space if space != D.search_space else None
    config.search_space = given or config.search_space  # a space given here is checked against the searched one
    config.num_samples, config.extend, config.time_budget = extend, extend, None
    log.info("extending %s by %d trials with its original arguments", paths.local, extend)


def _restore_experiment(config: SearchConfig, paths: ExperimentPaths) -> None:
    _restore_saved(config, paths, "--resume")
    if paths.read(TEST_METRICS_FILE) is not None:
        # Finished already: the test split was scored once; scoring it again would break that promise.
        summary = paths.read(SUMMARY_FILE)
        print(summary.decode() if summary else f"{paths.where()}: finished", flush=True)
        raise UserError(
            f"--resume: {config.name!r} already finished (test split scored, results in "
            f"{paths.where()}); nothing to resume"
        )
    started = paths.read(TEST_MARK)
    if started is not None:
        # Scoring began and left no result (killed, or a test image failed): the test split may have been
        # read already, and a second score would be a second look presented as the first.
        mark = json.loads(started)
        model = mark.get("model") or str(paths.local / MODEL_PATH)
        if paths.remote and not Path(model).is_file():
            model = f"{model} (a copy of {paths.ray_path}/best/model.pt)"
        raise UserError(
            f"--resume: {config.name!r} began scoring the test split at {mark.get('started', '?')} and "
            f"recorded no result; it is not scored again. To score the saved model deliberately "
            f"(a second look at the test split): python -m tune_rice evaluate --model {model} "
            f"--data {mark.get('labels', 'LABELS_CSV')}"
            + (f" --data-root {mark['data_root']}" if mark.get("data_root") else "")
        )
    log.info("resuming %s with its original arguments", paths.local)


def load_space(config: SearchConfig, paths: ExperimentPaths | None = None) -> tuple[SearchSpace, int]:
    """The search space and the epochs per trial; ``--extend``: the very space the experiment searched."""
    space = with_metric(load_search_space(config.search_space), config.metric)
    max_epochs = config.max_epochs or space.max_epochs or 10
    if config.grace_period > max_epochs:
        raise UserError(f"--grace-period {config.grace_period} is more than the {max_epochs} epochs per trial")
    if config.extend and paths is not None:
        _same_space(space.record(), storage.load_args(paths.local).get(SPACE_KEY), config)
    return space, max_epochs


def _same_space(now: dict, searched: dict | None, config: SearchConfig) -> None:
    """Optuna's warm start learns from the study's trials: only over the space they were drawn from."""
    if searched is None:
        log.warning(
            "--extend: %s holds no record of its search space; assuming %s is it", ARGS_FILE, config.search_space
        )
        return
    changes = space_difference(searched, now)
    if changes:
        raise UserError(
            f"--extend: the search space changed since {config.name!r} searched it ({config.search_space}): "
            + "; ".join(changes)
            + ". Its study's trials were drawn from the old space: start a new --name to search the new one"
        )


def default_weights(config: SearchConfig) -> str:
    """``--weights`` when not given: the real pretrained weights for the user's data (no silent fallback to
    random features), today's ``auto`` for the built-in demo set, which must run offline."""
    return "auto" if config.data is None else "imagenet"


def backbone_weights(
    config: SearchConfig, specs: list[FeatureSpec], paths: ExperimentPaths
) -> dict[str, ResolvedWeights]:
    """Each backbone's weights. A new search resolves ``--weights``; ``--resume`` gets the very weights
    the search started with (recorded in search_args.json), or refuses: heads trained on one backbone's
    features are meaningless on another's."""
    if config.weights is None:
        config.weights = default_weights(config)  # recorded as such in search_args.json
    names = sorted({s.backbone for s in specs})
    recorded = storage.recorded_weights(paths.local) if (config.resume or config.extend) else None
    if recorded is None:  # a new search (or one started before the record was kept)
        return {b: resolve_weights(b, config.weights, seed=config.seed) for b in names}
    return {b: _same_weights(b, recorded.get(b), config) for b in names}


def _same_weights(backbone: str, identity: str | None, config) -> ResolvedWeights:
    if identity is None or identity.startswith("random:"):
        # Random init is rebuilt from the seed, whatever --weights auto would find in today's cache.
        request = config.weights if identity is None else "none"
    else:
        request = "imagenet" if identity.startswith(("imagenet:", "hub:")) else config.weights
    try:
        resolved = resolve_weights(backbone, request, seed=config.seed)
    except UserError as e:
        resolved, problem = None, str(e)
    if resolved is not None and (identity is None or resolved.identity == identity):
        return resolved
    head = f"--resume: the search trained {backbone} heads on {identity} features"
    if (identity or "").startswith(("imagenet:", "hub:")):
        problem = (
            f"here they resolve to {resolved.identity}"
            if resolved is not None
            else "they are not in the local cache here and cannot be downloaded"
        )
        raise UserError(f"{head}, but {problem}; to fetch them: {fetch_hint(backbone)}; then resume again")
    if resolved is not None:
        problem = f"here the file is {resolved.identity}"
    raise UserError(
        f"{head}, but {problem.rstrip('.')}; put the file the search started with back at "
        f"{config.weights}, then resume again"
    )


def record_start(
    config: SearchConfig, paths: ExperimentPaths, weights: dict[str, ResolvedWeights], space: SearchSpace
) -> None:
    """search_args.json with each backbone's resolved weights and the space searched, next to Ray's state on
    a URI storage path (so that --resume finds it anywhere)."""
    record = {**config.saved(), SPACE_KEY: space.record()}
    storage.save_args(paths.local, record, weights={b: w.identity for b, w in weights.items()})
    if paths.remote:
        storage.upload(paths.local, paths.ray_path, names=(ARGS_FILE,))


# ----------------------------------------------------------------------------------------------- data
def load_data(config: SearchConfig) -> LabelTable:
    """labels.csv (prepared first when --data is a bare folder), checked, with no empty split."""
    labels_csv = resolve_data(config.data, config.data_root, path_col=config.path_col, label_col=config.label_col)
    table = read_labels_checked(labels_csv, config.data_root)
    config.labels = str(table.csv_path)  # saved with the arguments: prepare names the experiments a split fed
    for split in ("train", "valid", "test"):
        if table.split(split).empty:
            raise UserError(f"{labels_csv}: the {split} split is empty")
    return table


def resolve_data(
    data: str | None,
    data_root: str | None = None,
    *,
    path_col: str | None = None,
    label_col: str | None = None,
) -> Path:
    """--data (folder, labels.csv, CSV of images, or nothing for the demo set) -> the path of a labels.csv.

    Data and split never depend on the search's --seed: seeds compare searches on the same data.
    ``prepare`` (and the image libraries its grouping needs) is imported only when something is prepared."""
    if data is None:
        from ..data.demo import ensure_demo
        from ..data.prepare import prepare_dataset

        # The demo data and its split stay fixed (seed 0) whatever --seed: seeds compare searches, not data.
        folder = ensure_demo()
        csv = folder / LABELS_FILE
        if not csv.is_file():
            prepare_dataset(folder, progress=False)
        log.info("no --data given: using the synthetic rice-leaf demo set at %s", folder)
        return csv
    p = Path(data).expanduser().resolve()
    if p.is_file() and is_labels_file(p):
        return p
    if not p.exists():
        raise UserError(f"--data {data}: no such file or folder")
    csv = prepared_labels_path(p) if p.is_file() else p / LABELS_FILE
    if csv.is_file():
        log.info("using %s", csv)
        if p.is_file() and p.stat().st_mtime > csv.stat().st_mtime:
            log.warning(
                "%s changed after %s was prepared from it: the search uses the labels as prepared; "
                "`python -m tune_rice prepare %s` updates them",
                p.name,
                csv.name,
                p,
            )
        return csv
    from ..data.prepare import format_report, prepare_dataset

    log.info("%s has no labels file: preparing it now (%s) with the default split fractions", p, csv.name)
    # the default split (seed 0), the same as `python -m tune_rice prepare`
    result = prepare_dataset(p, image_dir=data_root if p.is_file() else None, path_col=path_col, label_col=label_col)
    # prepare's own warning says the skipped files are "listed in the report": this is that report
    log.log(
        logging.WARNING if result.skipped or result.empty_classes or result.warnings or result.leaks else logging.INFO,
        "prepared %s:\n%s",
        p,
        format_report(result),
    )
    return result.labels_csv


# -------------------------------------------------------------------------------------- Ray and banks
def start_ray(config: SearchConfig) -> float:
    """Start or join Ray, wait for a GPU node when asked to, and return the GPUs per trial."""
    tune_glue.init_ray(config.address)
    tune_glue.wait_for_gpus(config.wait_for_gpus)
    return tune_glue.resolve_gpus(config.gpus_per_trial)


def search_banks(
    config: SearchConfig, specs: list[FeatureSpec], table: LabelTable, weights: dict[str, ResolvedWeights]
) -> dict | None:
    """The feature banks the trials train on (FeatureBank, or shards.BankRef on a GPU cluster, by spec
    name); None with ``--bank off`` (trials read the images)."""
    if config.bank != "on":
        return None
    return _extract_banks(specs, table, weights, use_gpu=tune_glue.cluster_gpus()[0] > 0, cache_dir=config.bank_cache)


def _extract_banks(
    specs: list[FeatureSpec],
    table: LabelTable,
    weights: dict[str, ResolvedWeights],
    use_gpu: bool,
    cache_dir: str | os.PathLike | None = None,
) -> dict:
    """One bank per spec, train and valid only (the test split is not touched before the end). Specs
    that see the same input tensors are extracted together (one decode pass; see extract_banks).

    On a cluster with GPUs each pass runs in shards over all of them (shards.py) and the banks stay in
    the object store: the result holds references (BankRef), never the arrays."""
    banks: dict  # FeatureBank, or shards.BankRef on a GPU cluster, by spec name
    if use_gpu:
        import ray

        from .shards import extract_banks_sharded, shard_cpus

        banks = extract_banks_sharded(
            table,
            specs,
            weights=weights,
            splits=("train", "valid"),
            cache_dir=cache_dir,
            num_cpus=shard_cpus(ray.nodes()),  # a GPU's share of its node's CPUs, all decoding for it
        )
    else:
        banks = extract_banks(table, specs, weights=weights, splits=("train", "valid"), cache_dir=cache_dir)
    for name, bank in banks.items():
        log.info(
            "bank %s: %s, %.1f MB, %s",
            name,
            "from cache" if bank.from_cache else f"{bank.seconds:.1f}s",
            bank.nbytes() / 1e6,
            bank.weights,
        )
    return banks


# ------------------------------------------------------------------------------------ probe and folds


def fit_baseline(
    config: SearchConfig,
    table: LabelTable,
    banks: dict | None,
    specs: list[FeatureSpec],
    weights: dict[str, ResolvedWeights],
    space: SearchSpace,
) -> Baseline:
    """``--cv``: the folds of train+valid (by group and class); then the linear probe on every bank, C
    chosen on valid or by the same folds. Deterministic: a resumed search fits the same. Without banks (``--bank off``) the probe gets banks of its own, one
    un-augmented view per image."""
    k = resolve_folds(config.cv, len(table.split("valid")))
    if k and banks is None:  # --cv auto with --bank off (an explicit K was refused up front)
        log.info("--cv auto: off, since trials read the images (--bank off)")
        k = 0
    if k and any(s.feature_layer == "stage" for s in specs):
        if config.cv != "auto":
            raise UserError(f"--cv {config.cv} does not combine with tune_last_stage (drop one of the two)")
        log.info("--cv auto: off, since trials tune the last stage (tune_last_stage)")
        k = 0
    groups = dict(zip(table.frame["path"], table.frame["group"]))
    banks = pooled_banks(banks)  # a stage bank holds activations inside the network, not features to probe
    specs = [s for s in specs if s.feature_layer != "stage"]
    if banks is not None and by_reference(banks):  # banks in the object store: the probes fit where they are
        from .shards import final_views, fit_probes_remote

        folds, probes = fit_probes_remote(banks, metric=space.metric, group_of_path=groups, k=k, seed=config.seed)
        baseline = Baseline(folds, probes, final_views(banks))
        _log_folds(config, baseline)
        return baseline
    probe_banks = banks
    if probe_banks is None:
        probe_specs = list(dict.fromkeys(dataclasses.replace(s, views=1) for s in specs))
        probe_banks = extract_banks(
            table, probe_specs, weights=weights, splits=("train", "valid"), cache_dir=config.bank_cache
        )
    folds = None
    if k:
        folds = bank_folds(next(iter(probe_banks.values())), groups, k, seed=config.seed)
    baseline = Baseline(folds, fit_probes(probe_banks, metric=space.metric, folds=folds), probe_banks)
    _log_folds(config, baseline)
    return baseline


def _log_folds(config: SearchConfig, baseline: Baseline) -> None:
    if baseline.folds is not None:
        log.info(
            "--cv %s: %d folds over %d train+valid images (each trial trains %d heads; valid figures are out-of-fold)",
            config.cv,
            baseline.k,
            len(baseline.folds),
            baseline.k,
        )


# ------------------------------------------------------------------------------------------ data audit
def audit_train_valid(
    config: SearchConfig, table: LabelTable, banks: dict | None, baseline: Baseline, weights: dict[str, ResolvedWeights]
) -> DataAudit | None:
    """The data audit on one bank (``audit.audit_bank``): valid images with a near-copy in train, likely
    label errors among train+valid. On a GPU cluster the bank's view 0 is fetched from the object store.
    A failure costs the audit (a warning), not the search."""
    source: dict = pooled_banks(banks) or {} if banks is not None else baseline.banks  # FeatureBank or BankRef
    name = audit_bank({n: baseline.banks[n] for n in source})
    try:
        bank = source[name]
        if by_reference(source):
            import ray

            bank = ray.get(ray.remote(num_cpus=1)(first_view).remote(bank.ref))
        probe = baseline.probes[name]
        return audit_before_trials(
            table,
            bank,
            weights[bank.spec.backbone],
            oof_logits=probe.oof_logits,
            probe_C=probe.C,
            seed=config.seed,
        )
    except Exception as e:  # noqa: BLE001 - the audit reports on the data; the search goes on without it
        log.warning("data audit not done (%s: %s)", type(e).__name__, e)
        return None


def audit_test_split(
    audit: DataAudit | None, table: LabelTable, predictions, features, paths: ExperimentPaths
) -> list[str]:
    """The test images' near-copies in train (``features``: theirs from the scoring pass, or None) and
    the test accuracy without them; leakage.csv, label_issues.csv and audit.json; the summary's lines."""
    if audit is None:
        return []
    try:
        audit_test(
            audit, table, predictions=None if predictions is None else np.asarray(predictions), features=features
        )
    except Exception as e:  # noqa: BLE001 - the test scores are saved already; the audit only adds to them
        log.warning("data audit of the test split not done (%s: %s)", type(e).__name__, e)
    write_audit(paths.local, audit)
    return summary_lines(audit.record(), audit.leaks, audit.issues)


# ------------------------------------------------------------------------------------------- the tuner
def trial_data(
    table: LabelTable,
    banks: dict[str, FeatureBank] | None,
    weights: dict[str, ResolvedWeights],
    folds: np.ndarray | None = None,
):
    """What every trial trains on: the banks (with ``folds``: K heads per trial on them), or (no banks)
    the images with the resolved weights."""
    if banks is not None:
        # a bank in the object store goes by reference: each trial fetches its own, on its node
        data = {name: getattr(bank, "ref", bank) for name, bank in banks.items()}
        if folds is None:
            return data
        from .trainable import CVBanks

        return CVBanks(data, folds)
    from .trainable import ImageSource

    return ImageSource(labels_csv=str(table.csv_path), data_root=str(table.root), weights=weights)


def make_tuner(
    config: SearchConfig, paths: ExperimentPaths, space: SearchSpace, base: dict, data, gpus: float, *, batch=None
):
    """A new Tuner (arguments saved first), or with ``--resume`` the interrupted one restored. ``batch``:
    the folder of an ``--extend`` batch (a Ray experiment of its own inside the experiment's folder)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    max_epochs = base["epochs"]
    trainable = tune.with_parameters(_trainable(), data=data, base=base, metric=space.metric, mode=space.mode)
    trainable = tune.with_resources(trainable, {"cpu": config.cpus_per_trial, "gpu": gpus})
    if config.resume:
        if not tune.Tuner.can_restore(paths.ray_path):
            raise UserError(f"--resume: {paths.ray_path} has no Ray Tune state to restore (did the search start?)")
        # Tuner.restore unpickles the experiment state: point it only at your own experiments.
        return tune.Tuner.restore(paths.ray_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    scheduler = ASHAScheduler(
        metric=space.metric,
        mode=space.mode,
        time_attr="training_iteration",
        max_t=max_epochs,
        grace_period=config.grace_period,
        reduction_factor=config.reduction_factor,
    )
    run_config = tune.RunConfig(
        name=batch.name if batch else config.name,
        storage_path=str(batch.parent) if batch else paths.storage,
        verbose=1,
        progress_reporter=tune_glue.progress_reporter(space, paths.ray_path),
        # Every checkpoint is kept until the search ends (then _prune_checkpoints): with num_to_keep, Tune
        # deletes a trial's previous checkpoint before its experiment snapshot stops naming it, and a driver
        # killed in between left a trial that --resume could only mark errored.
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=None, checkpoint_score_attribute=space.metric, checkpoint_score_order=space.mode
        ),
        failure_config=tune.FailureConfig(max_failures=2),
        # Our TensorBoard writer instead of Ray's TBX logger (turned off in run_trials); CSV and JSON stay.
        callbacks=[
            CSVLoggerCallback(),
            JsonLoggerCallback(),
            tune_glue.tensorboard_callback_cls()(
                params=space.searched, metrics=dict.fromkeys([space.metric, "valid/acc", "valid/loss"])
            ),
            *tracking.tune_callbacks(
                tracking.parse_log_to(config.log_to),
                experiment=paths.local.name,
                storage_path=config.storage_path,
                folder=paths.local,
            ),
        ],
    )
    # The study lives in the experiment folder (optuna-dashboard reads it); --resume restores the
    # searcher with it from Tune's snapshot, which replays the same journal file.
    searcher = tune_glue.optuna_search_cls()(
        metric=space.metric,
        mode=space.mode,
        seed=config.seed,
        max_t=max_epochs,
        first=[point] if (point := linear_point(space)) else [],  # a linear head, tried first
        storage=study.study_storage(paths.local),
        study_name=config.name,
    )
    return tune.Tuner(
        trainable,
        param_space=space.tune_space(),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=config.num_samples,
            max_concurrent_trials=config.max_concurrent or None,
            time_budget_s=parse_duration(config.time_budget, what="--time-budget") if config.time_budget else None,
            # A trial on a bank trains in seconds; starting a fresh worker
            # process (torch import) for each costs more than that.
            reuse_actors=True,
            trial_name_creator=tune_glue.trial_name,
            trial_dirname_creator=tune_glue.trial_name,
        ),
        run_config=run_config,
    )


def run_trials(config: SearchConfig, paths: ExperimentPaths, space: SearchSpace, base: dict, data, gpus: float):
    """``tuner.fit()``, with as many trials pending as the cluster holds at once (see trials_at_once).
    ``--extend``: the new batch runs in a folder of its own (``extend-<k>``) with the kept study, and the
    results are the earlier runs' trials, then the new ones."""
    earlier, batch = (earlier_results(paths), next_batch(paths)) if config.extend else ([], None)
    tuner = make_tuner(config, paths, space, base, data, gpus, batch=batch)
    pending = config.max_concurrent or tune_glue.trials_at_once(config.cpus_per_trial, gpus, config.num_samples)
    # Ray's automatic loggers off: make_tuner passes the CSV and JSON ones, and TensorBoard is ours.
    with (
        tune_glue.env_default("TUNE_MAX_PENDING_TRIALS_PG", str(pending)),
        tune_glue.env_default("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"),
    ):
        grid = tuner.fit()
    if batch is None:
        return grid
    archive_outputs(paths.local, batch)
    return [*earlier, *grid]


def batches(exp_dir: Path) -> list[Path]:
    """The ``--extend`` batches of an experiment, in the order they ran."""
    found = [p for p in exp_dir.glob(f"{EXTEND_PREFIX}*") if p.is_dir() and p.name[len(EXTEND_PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(EXTEND_PREFIX) :]))


def next_batch(paths: ExperimentPaths) -> Path:
    done = batches(paths.local)
    return paths.local / f"{EXTEND_PREFIX}{int(done[-1].name[len(EXTEND_PREFIX) :]) + 1 if done else 1}"


def earlier_results(paths: ExperimentPaths) -> list:
    """Every trial the experiment ran so far (its first run's, then each ``--extend`` batch's), read back
    from Ray's experiment state."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    results: list = []
    for run in [paths.local, *batches(paths.local)]:
        if any(run.glob("experiment_state-*.json")):  # a batch killed before its first snapshot has none
            grid = ResultGrid(ExperimentAnalysis(str(run)))
            results.extend(grid[i] for i in range(len(grid)))
    return results


def archive_outputs(exp_dir: Path, batch: Path) -> None:
    """Before an ``--extend`` writes its final model and test scores, the earlier ones move to
    ``<batch>/before/``: nothing of the earlier read is lost."""
    before = batch / "before"
    before.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVED:
        if (exp_dir / name).exists():
            os.replace(exp_dir / name, before / name)


# ------------------------------------------------------------------------------------------- outputs
def record_test_read(table: LabelTable, tool: str, paths: ExperimentPaths) -> int | None:
    """The test read just made, in the ledger beside labels.csv; how many reads of this split it holds now."""
    model = paths.local / MODEL_PATH
    return ledger.record_test_read(table.csv_path, table.frame, tool=tool, experiment=paths.where(), model=model)


def extend_notes(config: SearchConfig, df: pd.DataFrame, reads: int | None, table: LabelTable) -> list[str]:
    """The summary's lines on an ``--extend`` (how many trials it added) and on a test split read before."""
    notes = []
    if config.extend:
        added = f"{config.extend} trial{'s' if config.extend != 1 else ''}"
        notes.append(
            f"--extend added {added} to the earlier {len(df) - config.extend}; the final model was chosen "
            "again on valid over all of them"
        )
    note = ledger.reads_note(reads, table.csv_path)
    return [*notes, note] if note else notes


def write_report_or_warn(exp_dir: Path) -> None:
    from ..tools.report import write_report

    try:
        write_report(exp_dir)
    except UserError as e:
        log.warning("report not written: %s", e)


def budget_notes(config: SearchConfig, df: pd.DataFrame, ended: dict[str, int], trial_seconds: float) -> list[str]:
    """The summary's line when ``--time-budget`` cut the search (no line when every trial ran)."""
    if not config.time_budget:
        return []
    ran, cut = len(df), ended.get("cut", 0)
    if ran >= config.num_samples and not cut:
        return []
    return [
        f"the time budget ({config.time_budget}) cut the search after {trial_seconds:.0f}s of trials: "
        f"{ran} of {config.num_samples} trials ran; {cut} were running when it ran out and were stopped "
        "there (counted above as stopped early)"
    ]


def write_outputs(
    paths: ExperimentPaths,
    df: pd.DataFrame,
    test: dict,
    space: SearchSpace,
    winner: Winner,
    weights: dict[str, ResolvedWeights],
    clock: _Clock,
    result_grid,
    banks: dict[str, FeatureBank] | None,
    baseline: Baseline,
    *,
    notes: Sequence[str] = (),
    audit: Sequence[str] = (),
) -> str:
    """summary.txt, baseline.json and timings.json, everything copied to a URI storage path; returns the
    summary. ``notes``: extra summary lines after the count of trials; ``audit``: the data audit's."""
    seconds = clock.total()
    identities = {b: w.identity for b, w in sorted(weights.items())}
    summary = format_summary(
        df,
        test,
        metric=space.metric,
        exp_dir=paths.local,
        seconds=seconds,
        phases=clock.phases,
        weights=winner.identity,
        searched=space.searched,
        final_record=winner.fm.record(),
        mode=space.mode,
        backbones=identities,
        probes=baseline.probes,
        folds=baseline.k,
        notes=notes,
        audit=audit,
    )
    (paths.local / SUMMARY_FILE).write_text(summary + "\n")
    (paths.local / BASELINE_FILE).write_text(json.dumps(baseline_record(df, baseline, winner, space), indent=1))
    trial_seconds = [float(r.metrics.get("time_total_s", 0.0)) for r in result_grid if r.metrics]
    (paths.local / TIMINGS_FILE).write_text(
        json.dumps(
            {
                "seconds": seconds,
                "phases": clock.phases,
                "trial_seconds": trial_seconds,
                "weights": identities,
                "random_weights": [b for b, w in identities.items() if w.startswith("random:")],
                "banks": {
                    name: {"seconds": b.seconds, "from_cache": b.from_cache, "mb": b.nbytes() / 1e6, **b.info}
                    for name, b in (banks or {}).items()
                },
            },
            indent=1,
        )
    )
    if paths.remote:
        storage.upload(paths.local, paths.ray_path)
    return summary


def _trainable():
    from .trainable import train_head

    return train_head


def _main(argv: Sequence[str] | None) -> int:
    config = parse_config(argv)
    cli.setup_logging(config.verbose)
    config.validate()
    if config.data is None and not (config.resume or config.extend):
        log.warning(
            "no --data: this search runs on the bundled synthetic rice-leaf demo set, not on your images "
            "(--data FOLDER or CSV for your own)"
        )
    run_search(config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


# ------------------------------------------------------------------------------------------ Python API
def search(data: str | os.PathLike | None = None, num_samples: int = D.num_samples, **options) -> SearchResult:
    """``tune_rice.search(data="photos/", num_samples=30, **options)``: the search of ``tune-rice search``,
    from Python. ``options`` are its long options with underscores (``max_epochs=5``, ``name="x"``,
    ``extend=10``); an unknown name is one UserError naming it. Returns the experiment as a SearchResult."""
    from ..tools.api import SearchResult

    config = SearchConfig.from_options(
        data=None if data is None else os.fspath(data), num_samples=num_samples, **options
    )
    config.validate()
    return SearchResult.read(run_search(config)["exp_dir"])


if __name__ == "__main__":
    sys.exit(main())
