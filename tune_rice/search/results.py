"""The search's results and its final model: results.csv from the trials' result grid, the final model
chosen on valid from the best checkpoints of the top trials (an ensemble or the single best,
temperature-calibrated; ``final.py``) saved as best/model.pt, and the one read of the test split
(test_metrics.json and the ``test`` TensorBoard run). ``search.run_search`` calls these in order."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch
import yaml

from .. import UserError
from ..data.images import LabelTable
from ..experiment import storage
from ..experiment.space import SearchSpace
from ..experiment.storage import ExperimentPaths
from ..features.bank import FeatureBank, by_reference
from ..features.model import ResolvedWeights, save_artifact
from ..heads import final
from ..heads.engine import TrialConfig
from ..heads.probe import Baseline, probe_row, write_probe_tensorboard
from ..records import (
    BEST_DIR,
    CONFIG_FILE,
    FINAL_FILE,
    MODEL_FILE,
    MODEL_PATH,
    RESULTS_FILE,
    TEST_MARK,
    TEST_METRICS_FILE,
    Direction,
    FinalRecord,
    TestMetrics,
)

log = logging.getLogger(__name__)

TOP_CANDIDATES = 20  # the best checkpoints of this many top trials are the ensemble's candidates


# -------------------------------------------------------------------------------- the trials' results
def collect_results(
    result_grid, space: SearchSpace, max_epochs: int, exp_dir: Path, baseline: Baseline, *, budget: str | None = None
):
    """results.csv (the trials, then the probe of each bank as rows of kind ``probe``), the probe's
    TensorBoard run, checkpoints pruned to each trial's best and latest; (the trials' table, the best
    trial's result). Trials that ``--time-budget`` kept from starting get no row."""
    df = summarize_trials(result_grid, space.metric, space.mode, max_epochs)
    exp_dir.mkdir(parents=True, exist_ok=True)
    probes = pd.DataFrame(
        [probe_row(name, p, baseline.banks[name], space.metric) for name, p in baseline.probes.items()]
    )
    rows = pd.concat([df, probes], ignore_index=True)
    for col in df.columns:  # whole numbers stay whole where the probe rows have none (epochs, best_epoch)
        if pd.api.types.is_bool_dtype(df[col]):  # and flags stay flags: the probe was not stopped early
            rows[col] = rows[col].astype("boolean").fillna(False).astype(bool)
        elif pd.api.types.is_integer_dtype(df[col]):
            rows[col] = rows[col].astype("Int64")
    rows.to_csv(exp_dir / RESULTS_FILE, index=False)
    folder = exp_dir / "probe"  # the probe's TensorBoard run, beside the trials'
    shutil.rmtree(folder, ignore_errors=True)  # a resumed search writes the same numbers again
    write_probe_tensorboard(folder, baseline.probes, max_epochs=max_epochs)
    _prune_checkpoints(result_grid, space.metric, space.mode)
    best = _best_result(result_grid, space.metric, space.mode)
    if best is None and budget and not any(r.error for r in result_grid):
        raise UserError(
            f"--time-budget {budget} ran out before any trial finished an epoch: nothing to score "
            f"(details in {exp_dir})"
        )
    if best is None:
        first = next((r.error for r in result_grid if r.error), None)
        reason = str(first).strip().splitlines()[-1] if first else "none"
        raise UserError(f"all {len(df)} trials failed; first error: {reason} (details in {exp_dir})")
    return df, best


def summarize_trials(result_grid, metric: str, mode: str, max_epochs: int) -> pd.DataFrame:
    """One row per trial: status, epochs, whether ASHA stopped it, best/last metrics, config, where."""
    rows = []
    for r in result_grid:
        hist = r.metrics_dataframe
        if r.error is None and (hist is None or hist.empty or metric not in hist):
            continue  # created but never started: --time-budget ended the search first
        last = r.metrics or {}
        trial_id = last.get("trial_id") or Path(r.path).name
        row = {"kind": "trial", "trial_id": trial_id, "status": "ERROR" if r.error else "TERMINATED"}
        if hist is not None and not hist.empty and metric in hist:
            best_i = Direction(mode).best_label(hist[metric])
            epochs = int(hist["training_iteration"].max())
            row.update(
                {
                    "epochs": epochs,
                    "stopped_early": bool(not r.error and epochs < max_epochs),
                    f"best/{metric}": float(hist.loc[best_i, metric]),
                    "best_epoch": int(hist.loc[best_i, "training_iteration"]),
                }
            )
            # the size behind the best figure (out-of-fold: all train+valid images) and the accuracy there
            for key, out in (
                ("valid/acc", "best/valid/acc"),
                ("valid/acc_sd", "best/valid/acc_sd"),
                ("valid_count", "valid_count"),
                ("cv_folds", "cv_folds"),
            ):
                if key in hist and pd.notna(hist.loc[best_i, key]):
                    row[out] = hist.loc[best_i, key]
            for key in ("valid/acc", "valid/loss", "valid/macro_f1", "train/loss"):
                if key in hist:
                    row[f"last/{key}"] = float(hist[key].iloc[-1])
            for key in ("node_id", "device", "gpu_ids", "weights"):
                if key in hist:
                    row[key] = hist[key].iloc[-1]
        else:
            row.update({"epochs": 0, "stopped_early": False})
        if r.error:
            row["error"] = (
                str(r.error).strip().splitlines()[-1][:300] if str(r.error).strip() else type(r.error).__name__
            )
        for k, v in sorted((r.config or {}).items()):
            row[f"config/{k}"] = v
        row["trial_dir"] = r.path
        rows.append(row)
    df = pd.DataFrame(rows)
    key = f"best/{metric}"
    if key in df:
        df = df.sort_values(key, ascending=Direction(mode).ascending, na_position="last").reset_index(drop=True)
    return df


def _best_result(result_grid, metric: str, mode: str):
    """The trial with the best ``metric`` at any epoch. A trial that errored (diverged, crashed) is
    chosen only when no trial ended cleanly: its config is not one to recommend, even on a tie."""
    ranked = _ranked_results(result_grid, metric, mode)
    return ranked[0] if ranked else None


def _ranked_results(result_grid, metric: str, mode: str) -> list:
    """Trials with a checkpoint, best first by ``metric`` at any epoch; errored ones after every clean
    one (ties keep the grid's order)."""
    keyed = []
    for r in result_grid:
        hist = r.metrics_dataframe
        if hist is None or hist.empty or metric not in hist or not r.best_checkpoints:
            continue
        best = float((Direction(mode).sign * hist[metric]).max())  # larger is better for either direction
        keyed.append(((r.error is None, best), r))
    return [r for _, r in sorted(keyed, key=lambda kr: kr[0], reverse=True)]


def _prune_checkpoints(result_grid, metric: str, mode: str) -> None:
    """Once the trials are over, delete every checkpoint but each trial's best and latest."""
    for r in result_grid:
        keep = {r.checkpoint.path} if r.checkpoint else set()
        with contextlib.suppress(Exception):  # RuntimeError when no checkpoint has the metric
            keep.add(r.get_best_checkpoint(metric, mode).path)
        for checkpoint, _ in r.best_checkpoints or []:
            if checkpoint.path not in keep:
                if checkpoint.filesystem.get_file_info(checkpoint.path).type.name == "NotFound":
                    continue  # pruned already: an --extend reads the earlier trials back
                try:
                    checkpoint.filesystem.delete_dir(checkpoint.path)
                except OSError as e:
                    log.warning("could not delete %s: %s", checkpoint.path, e)


# ------------------------------------------------------------------------------------ the final model
def final_candidates(
    result_grid,
    base: dict,
    space: SearchSpace,
    *,
    limit: int = TOP_CANDIDATES,
    weights: dict[str, ResolvedWeights] | None = None,
):
    """The best checkpoints (not the latest) of the top ``limit`` trials, best first, as final-model
    candidates; and each one's (best epoch, config) by trial id. With ``weights`` (backbone -> the weights
    the final model will be built on), a checkpoint whose head was trained on other weights is refused."""
    candidates: list[final.Candidate] = []
    info: dict = {}
    for r in _ranked_results(result_grid, space.metric, space.mode)[:limit]:
        if r.error is not None and candidates:
            continue  # an errored trial only when nothing ended cleanly (see _best_result)
        checkpoint = r.get_best_checkpoint(space.metric, space.mode)
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
        trial_id = r.metrics.get("trial_id") or Path(r.path).name
        cfg = TrialConfig.from_dict({**base, **r.config})
        _check_trained_on(state, cfg, weights, checkpoint.path)
        candidates.append(final.candidate_from_state(trial_id, state, cfg, score=float(state["best"])))
        info[trial_id] = (int(state["epoch"]), cfg)
    return candidates, info


def _check_trained_on(state: dict, cfg: TrialConfig, weights: dict[str, ResolvedWeights] | None, where) -> None:
    trained_on, here = state.get("weights"), (weights or {}).get(cfg.backbone)
    if trained_on is not None and here is not None and trained_on != here.identity:
        raise UserError(
            f"the checkpoint {where} holds a head trained on {cfg.backbone} features from {trained_on} "
            f"weights, but the backbone here has {here.identity}: a model built from the two would be wrong"
        )


@dataclass
class Winner:
    """The deployed model (an ensemble, or the single best trial's best checkpoint) with its temperature,
    how it was chosen, and what its artifact records."""

    fm: final.FinalModel
    cfg: TrialConfig  # the single best trial's
    trial_id: str  # the single best trial
    metrics: dict
    best_value: float
    classes: tuple

    @property
    def identity(self) -> str:
        return " + ".join(dict.fromkeys(r.identity for r in self.fm.resolved))

    @property
    def pretrained(self) -> bool:
        return all(r.pretrained for r in self.fm.resolved)

    def save(self, folder: Path, extra_metrics: dict | None = None) -> Path:
        c = self.fm.choice
        cv = any(cand.oof_logits is not None for cand in self.fm.pool)
        calibration = {
            "method": "temperature scaling",
            # with --cv the heads trained on valid too: the choice and T were made on out-of-fold logits
            "fitted_on": "out-of-fold logits over train+valid (one fold head per image; the model averages them)"
            if cv
            else "valid",
            "temperature": c.temperature,
            "valid_before": c.valid["deployed"],
            "valid_after": c.valid["deployed_calibrated"],
        }
        return save_artifact(
            folder / MODEL_FILE,
            self.fm.model,
            classes=self.classes,
            preprocessing=self.cfg.feature_spec().preprocessing.to_dict(),
            weights=self.fm.resolved,
            config=self.cfg.to_dict(),
            metrics={**self.metrics, **(extra_metrics or {})},
            calibration=calibration,
        )


def save_winner(
    result_grid,
    base: dict,
    weights: dict[str, ResolvedWeights],
    space: SearchSpace,
    table: LabelTable,
    banks: dict[str, FeatureBank] | None,
    paths: ExperimentPaths,
    *,
    k: int = final.DEFAULT_ENSEMBLE,
    extra: Sequence[final.Candidate] = (),
) -> Winner:
    """The final model, chosen on valid (from the banks' valid logits: no image decoded) and calibrated,
    saved as best/model.pt with final.json before the test images are read: a bad test file must not
    lose it. A resumed search that had chosen already reads final.json back instead of choosing again.
    ``extra``: more candidates beside the trials' checkpoints (``final.probe_candidates``: the linear
    probes, once the search fits them)."""
    exp_dir = paths.local
    candidates, info = final_candidates(result_grid, base, space, weights=weights)
    candidates = final.merge_candidates(candidates, extra, mode=space.mode)  # final.lead_index: who leads
    for c in extra:  # a probe has no epochs
        info[c.name] = (None, _probe_config(c, base["seed"]))
    recorded = paths.read(FINAL_FILE)
    if banks is not None and by_reference(banks):
        from .shards import final_views

        banks = final_views(banks)  # the valid split only: the driver never holds a whole bank
    fm = final.make_final_model(
        candidates,
        weights=weights,
        banks=banks,
        table=table,
        k=k,
        metric=space.metric,
        mode=space.mode,
        recorded=json.loads(recorded) if recorded else None,
        trials_run=len(_ranked_results(result_grid, space.metric, space.mode)),
    )
    single = fm.single_best
    epoch, cfg = info[single.name]
    metrics = {
        "trial_id": single.name,
        "best_epoch": epoch,
        space.metric: single.score,
        "deployed": fm.choice.deployed,
        "members": fm.choice.members,
    }
    winner = Winner(fm, cfg, single.name, metrics, single.score, table.classes)
    winner.save(exp_dir / BEST_DIR)
    FinalRecord.from_dict({**fm.record(), "k": k}).write(exp_dir)
    (exp_dir / BEST_DIR / CONFIG_FILE).write_text(
        yaml.safe_dump(
            {
                "trial_id": single.name,
                "metric": space.metric,
                "best_value": single.score,
                "epoch": metrics["best_epoch"],
                "weights": winner.identity,
                "config": cfg.to_dict(),
                "deployed": fm.choice.deployed,
                "members": fm.choice.members,
                "member_weights": fm.choice.weights,
                "temperature": fm.choice.temperature,
            },
            sort_keys=False,
        )
    )
    return winner


def _probe_config(c: final.Candidate, seed: int) -> TrialConfig:
    """A linear probe's configuration, as a trial's: its bank and a linear head."""
    return TrialConfig(
        backbone=c.spec.backbone,
        image_size=c.spec.image_size,
        head="seed" if c.spec.feature_layer == "logits" else "pooled",
        aug_policy=c.spec.policy,
        views=c.spec.views,
        hidden=0,
        dropout=0.0,
        epochs=1,
        seed=seed,
    )


# --------------------------------------------------------------------- the one read of the test split
def score_winner(
    winner: Winner, table: LabelTable, paths: ExperimentPaths, *, features: torch.nn.Module | None = None
) -> dict:
    """The one read of the test split; writes test_metrics.json, the test TensorBoard run and the test
    scores into best/model.pt, and copies them to a URI storage path at once. Returns what
    test_metrics.json holds, and ``predictions``: the deployed model's class per test image (with
    ``features``, a network taking the model's input: ``features``, its outputs, from the same pass)."""
    exp_dir = paths.local
    best_dir = exp_dir / BEST_DIR
    mark_test_started(paths, winner, table)
    try:
        test = score_on_test(winner.fm, table, features=features)
    except UserError as e:  # an unreadable test image, already reduced to one line
        raise UserError(
            f"scoring the test split failed: {e}. The final model is saved at {best_dir / 'model.pt'}; "
            "fix or remove the file, then score it with python -m tune_rice evaluate"
        ) from None
    winner.save(best_dir, {"test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"]})
    test_out = {"trial_id": winner.trial_id, "weights": winner.identity, "pretrained": winner.pretrained, **test}
    saved = {k: v for k, v in test_out.items() if k not in ("predictions", "features")}  # per image: not saved
    TestMetrics.from_dict(saved).write(exp_dir)
    write_test_tensorboard(exp_dir / "test", test_out, winner.cfg.to_dict(), winner.trial_id)
    if paths.remote:
        storage.upload(exp_dir, paths.ray_path, names=(BEST_DIR, TEST_METRICS_FILE, "test"))
    return test_out


def mark_test_started(paths: ExperimentPaths, winner: Winner, table: LabelTable) -> None:
    """The durable mark that the test split is about to be read (on the storage URI too, before any image)."""
    mark = {
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "trial_id": winner.trial_id,
        "model": str(paths.local / MODEL_PATH),
        "labels": str(table.csv_path),
        "data_root": str(table.root) if table.root != table.csv_path.parent else None,
    }
    storage.write_durably(paths.local / TEST_MARK, json.dumps(mark, indent=1))
    if paths.remote:  # the model that is being scored goes with the mark
        storage.upload(paths.local, paths.ray_path, names=(BEST_DIR, TEST_MARK))


def score_on_test(
    fm: final.FinalModel,
    table: LabelTable,
    *,
    device="auto",
    batch_size: int = 64,
    features: torch.nn.Module | None = None,
) -> dict:
    """The one read of the test split: the deployed model on the test images, the single best (and the
    selected ensemble when it is not deployed) scored in the same pass (see ``final.score_final``). With
    ``features`` (a network on the same input, e.g. the data audit's backbone), its outputs on each test
    image from that same decode, as ``features`` (N, D)."""
    if features is None:
        return final.score_final(fm, table, device=device, batch_size=batch_size)
    from ..heads.engine import split_logits

    members = final.MemberLogits(fm.selected, fm.groups)
    both = _WithFeatures(members, features)
    out, y = split_logits(both, table, "test", fm.single_best.spec.preprocessing, device, batch_size=batch_size)
    m, c = len(final.scored_names(fm.choice)), len(table.classes)  # the members, then the compared ones
    z = out[:, : m * c].reshape(len(out), m, c)  # (N, M, C)
    record = final.record_test_scores(z.double().numpy(), y.numpy(), table.classes, fm.choice)
    return {**record, "features": out[:, m * c :].numpy()}


class _WithFeatures(torch.nn.Module):
    """Images -> each member's logits (flattened, M * C) then ``features``' outputs (D), one row each."""

    def __init__(self, members: torch.nn.Module, features: torch.nn.Module):
        super().__init__()
        self.members, self.features = members, features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.members(x).flatten(1).float(), self.features(x).float()], dim=1)


def write_test_tensorboard(folder: Path, test: dict, config: dict, trial_id: str) -> None:
    """A ``test`` run next to the trials: the deployed model's test scalars (and its calibration), the
    single best's beside them, the confusion matrix image, the members and the best config."""
    from torch.utils.tensorboard import SummaryWriter

    from ..tools.report_figures import draw_confusion

    writer = SummaryWriter(str(folder))
    writer.add_scalar("test/acc", test["accuracy"], 0)
    writer.add_scalar("test/macro_f1", test["macro_f1"], 0)
    writer.add_scalar("test/loss", test["loss"], 0)
    for key in ("ece", "nll", "brier"):
        if "calibration" in test:
            writer.add_scalar(f"test/{key}", test["calibration"]["after"][key], 0)
            writer.add_scalar(f"test/{key}_before_temperature", test["calibration"]["before"][key], 0)
    for which in ("single_best", "ensemble"):
        if which in test:
            writer.add_scalar(f"test/{which}/acc", test[which]["accuracy"], 0)
            writer.add_scalar(f"test/{which}/macro_f1", test[which]["macro_f1"], 0)
    deployed = (
        f"the {final.single_best_label(test)}"
        if test.get("deployed", "single") == "single"
        else f"an ensemble of {len(test['members'])} heads"
    )
    fig = draw_confusion(test["confusion_matrix"], test["classes"], title=f"test confusion matrix ({deployed})")
    writer.add_figure("test/confusion_matrix", fig, 0, close=False)
    if "members" in test:
        rows = "\n".join(f"| {m} | {w:.3f} |" for m, w in zip(test["members"], test["member_weights"]))
        writer.add_text(
            "final/members",
            f"deployed: {deployed}, temperature {test['temperature']:.4g}\n\n| member | weight |\n|---|---|\n{rows}",
            0,
        )
    text = f"best trial: {trial_id}\n\n    " + yaml.safe_dump(config, sort_keys=True).replace("\n", "\n    ")
    writer.add_text("best/config", text, 0)
    writer.close()
