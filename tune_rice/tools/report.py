"""``python -m tune_rice report runs/<name>``: plots and tables that explain a finished search.

Writes ``runs/<name>/report/``:

- ``curves.png``: the optimised metric per epoch for every trial, the best five in colour, trials that
  ASHA stopped early ending in an ``x``, errored trials in a red square;
- ``params.png``: one panel per searched hyperparameter, each trial's best metric against its value
  (log axis for log-scaled parameters, strip plots for choices, dashed lines at the search bounds);
- ``importance.png``: hyperparameter importance by Optuna's PED-ANOVA evaluator (it needs only
  numpy/scipy; fANOVA would need scikit-learn), computed on the searcher's study kept in
  ``optuna_journal.log`` (each trial valued at its best epoch), or for an experiment without one on a
  study rebuilt from results.csv with the distributions of the search space;
- ``confusion.png``: the test confusion matrix from test_metrics.json;
- ``cost.png`` (searches over several backbones): each backbone's best metric against its GFLOPs, the
  Pareto front marked, with a table that adds the extraction rate measured in the search (timings.json);
- ``reliability.png`` and ``coverage.png``: the deployed model's reliability diagram on valid before and
  after its temperature, and its valid accuracy against coverage with the suggested ``--min-confidence``
  (from final.json, the record of the final model's choice);
- ``mistakes.png`` and ``correct.png``: the deployed model on the valid images, the highest losses and the
  most confident right ones per class, each with its activation map (``report_gallery.gallery_section``; also
  into the TensorBoard run ``valid``), and per-class recall;
- ``label_issues.png``: the data audit's likeliest label errors (``audit.report_section``: with the
  near-copies of train images among valid and test, from audit.json, leakage.csv, label_issues.csv);
- ``report.md``: the headline numbers, flags (best value at the edge of the space, errored and stopped
  trials, a randomly initialised backbone), the top trials and the figures;
- ``index.html``: report.md as one self-contained page (images inlined), readable on a phone.

Reads only files the search wrote (results.csv, search_args.json, test_metrics.json, final.json,
trial_*/result.json or trial_*/progress.csv, best/model.pt, optuna_journal.log, the audit's files), the
valid images and the images the audit flags; no Ray.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .. import UserError, cli
from ..devices import resolve_device
from ..experiment.study import best_values, load_study
from ..heads.audit import report_section as audit_section
from ..heads.engine import TrialConfig
from ..heads.final import comparison_lines, deployed_label, lead_lines, single_best_label, test_figures, threshold_lines
from ..heads.probe import is_probe_id
from ..records import TIMINGS_FILE, Direction, FinalRecord, TestMetrics, read_json
from .report_data import Experiment, load_experiment, match_choice, param_kind, plain
from .report_figures import (
    DPI,
    TOP_CURVES,
    confusion_figure,
    cost_figure,
    coverage_figure,
    curves_figure,
    importance_figure,
    params_figure,
    reliability_figure,
)
from .report_gallery import gallery_section
from .report_html import PAGE, write_html

log = logging.getLogger(__name__)

REPORT_DIR = "report"
FIGURES = ("curves.png", "params.png", "importance.png", "confusion.png", "reliability.png", "coverage.png", "cost.png")
TOP_TABLE = 10
EDGE_FRACTION = 0.05  # a best value this close to a bound (as a fraction of the range) says: widen the space
MIN_TRIALS_FOR_IMPORTANCE = 4


# -------------------------------------------------------------------------------------------- flags
def edge_flags(exp: Experiment) -> list[str]:
    """Numeric parameters whose best value sits within EDGE_FRACTION of a search bound."""
    if exp.space is None or exp.key not in exp.results or exp.results[exp.key].isna().all():
        return []
    best = exp.results.iloc[0]
    flags = []
    for name, (lo, hi) in exp.space.bounds().items():
        col = f"config/{name}"
        if col not in exp.results or pd.isna(best.get(col)):
            continue
        value = float(best[col])
        log_scale = name in exp.space.log_scaled
        if log_scale and value <= 0:
            continue
        f = (lambda v: math.log(v)) if log_scale else float
        position = (f(value) - f(lo)) / (f(hi) - f(lo))
        if position <= EDGE_FRACTION or position >= 1 - EDGE_FRACTION:
            side, bound = ("lower", lo) if position <= EDGE_FRACTION else ("upper", hi)
            if not _can_widen(name, lo, hi, side, log_scale):
                continue  # e.g. dropout 0 or warmup 0: the edge of what the parameter can take, not of the space
            scale = " (measured on a log scale)" if log_scale else ""
            flags.append(
                f"`{name}` = {value:.4g} in the best trial is within {EDGE_FRACTION:.0%} of the {side} "
                f"bound {bound:g} of [{lo:g}, {hi:g}]{scale}: **widen the space** past that bound."
            )
    return flags


def _can_widen(name: str, lo, hi, side: str, log_scale: bool) -> bool:
    """Whether a value past ``side`` of [lo, hi] is one the trial config accepts."""
    if log_scale:
        beyond = lo / 2 if side == "lower" else hi * 2
    else:
        step = max((hi - lo) * EDGE_FRACTION, 1 if isinstance(lo, int) and isinstance(hi, int) else 0)
        beyond = lo - step if side == "lower" else hi + step
        if isinstance(lo, int) and isinstance(hi, int):
            beyond = int(beyond)
    try:
        TrialConfig.from_dict({name: beyond})
        return True
    except UserError:
        return False


def trial_flags(exp: Experiment) -> list[str]:
    df = exp.results
    n = len(df)
    statuses = [exp.status(r) for _, r in df.iterrows()]
    errored = [t for t, s in zip(df["trial_id"], statuses) if s == "errored"]
    stopped = [t for t, s in zip(df["trial_id"], statuses) if s == "stopped early"]
    lines = []
    share = len(errored) / n
    text = f"{len(errored)} of {n} trials errored ({share:.0%})."
    if errored:
        first = df.loc[df["status"] == "ERROR", "error"].dropna() if "error" in df else pd.Series(dtype=str)
        if not first.empty:
            text += f" First error: `{str(first.iloc[0])[:200]}`."
        if share >= 0.2:
            text = "**" + text + "** Check the space for values that break training (learning rates too high)."
    lines.append(text)
    shown = ", ".join(f"`{t}`" for t in stopped[:12]) + (f" and {len(stopped) - 12} more" if len(stopped) > 12 else "")
    lines.append(
        f"{len(stopped)} of {n} trials were stopped early by ASHA"
        + (f" ({shown})." if stopped else ".")
        + (" Their best values come from fewer epochs than the others'." if stopped else "")
    )
    return lines


def weights_flag(exp: Experiment) -> str:
    w = exp.weights
    if w.startswith("random:"):
        return (
            f"**The backbone was randomly initialised ({w}), not pretrained: every score here is far below "
            "what ImageNet weights would give, and the best hyperparameters may differ.**"
        )
    return f"Backbone weights: `{w}`."


def random_weights_flag(exp: Experiment) -> str | None:
    """Every backbone whose trials ran on randomly initialised weights, not only the winner's."""
    runs = exp.trials_by_weights()
    random = {k: n for k, n in runs.items() if k[1].startswith("random:")}
    if not random:
        return None
    named = ", ".join(f"{b} (`{w}`, {n} trial{'s' if n != 1 else ''})" for (b, w), n in random.items())
    total = sum(runs.values())
    return (
        f"**{sum(random.values())} of {total} trials ran on randomly initialised backbones: {named}.** Their "
        "scores say little about what the same settings give on pretrained features."
    )


# ------------------------------------------------------------------------------- parameter importance
def importances(exp: Experiment) -> tuple[dict[str, float] | None, str]:
    """PED-ANOVA importances of the searched parameters; (None, why) when they cannot be computed."""
    import optuna
    from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

    names = exp.searched
    if exp.key not in exp.results or not names:
        return None, "no metric values or no searched parameters"
    dists: dict[str, CategoricalDistribution | IntDistribution | FloatDistribution] = {}
    for name in names:
        kind, spec = param_kind(exp, name)
        if kind == "choice":
            dists[name] = CategoricalDistribution([plain(c) for c in spec])
        elif kind == "int":
            dists[name] = IntDistribution(int(spec[0]), int(spec[1]))
        elif float(spec[0]) < float(spec[1]):
            dists[name] = FloatDistribution(float(spec[0]), float(spec[1]), log=kind == "log")
    searched: dict[str, BaseDistribution] = dict(dists)  # what create_trial takes (dict is invariant)
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(direction=Direction(exp.mode).optuna)
        kept = load_study(exp.exp_dir)
        if kept is not None:
            # The searcher's own study: its params and distributions exactly as searched; each trial's
            # value is its best epoch's, as results.csv's best/<metric>, so pruned trials count too.
            frozen = {t.number: t for t in kept.get_trials(deepcopy=False)}
            for number, value in best_values(kept, exp.mode).items():
                t = frozen[number]
                study.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=value))
        rows = exp.results.iterrows() if kept is None else ()
        for _, row in rows:
            value = row.get(exp.key)
            if pd.isna(value) or not math.isfinite(float(value)):
                continue
            params = {}
            for name, dist in dists.items():
                v = row.get(f"config/{name}")
                if isinstance(dist, CategoricalDistribution):
                    v = match_choice(v, dist.choices)
                    if v is None:
                        break
                elif pd.isna(v):
                    break
                elif isinstance(dist, IntDistribution):
                    v = int(min(max(int(round(float(v))), dist.low), dist.high))
                else:
                    v = float(min(max(float(v), dist.low), dist.high))
                params[name] = v
            else:
                study.add_trial(optuna.trial.create_trial(params=params, distributions=searched, value=float(value)))
        n = len(study.trials)
        if n < MIN_TRIALS_FOR_IMPORTANCE:
            return None, f"only {n} trials with a value (need {MIN_TRIALS_FOR_IMPORTANCE})"
        if len({t.value for t in study.trials}) < 2:
            return None, f"all {n} trials have the same {exp.metric}: nothing to explain"
        # The top group must hold at least two trials, or one lucky trial decides everything.
        evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=max(0.1, 2 / n))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = optuna.importance.get_param_importances(study, evaluator=evaluator)
        if any("select the same set of trials" in str(w.message) for w in caught):
            # ties at the top: the "best" group is every trial, and Optuna returns equal importances
            return None, (
                f"the best trials cannot be told apart from the rest ({n} trials, "
                f"{len({t.value for t in study.trials})} distinct {exp.metric} values)"
            )
    except Exception as e:  # noqa: BLE001 - an importance estimate is a nicety; the report goes on
        return None, f"Optuna could not compute it ({type(e).__name__}: {e})"
    finally:
        optuna.logging.set_verbosity(previous)
    return {k: float(v) for k, v in result.items()}, f"{n} trials"


def final_lines(exp: Experiment, fin: FinalRecord) -> list[str]:
    """The report's section on the deployed model (``fin``: final.json): members, weights, valid and test
    figures."""
    test = exp.test or TestMetrics()
    md = ["## Final model", ""]
    n = len(fin.members)
    probe_led = is_probe_id(fin.candidates[0])
    single = "the linear probe's head" if probe_led else "the single best trial's head"
    what = f"an ensemble of {n} heads" if fin.deployed == "ensemble" else single
    md.append(
        f"Deployed: {what}, chosen on valid among {len(fin.candidates)} candidates (the best "
        f"checkpoints of the top trials and the linear probe) by greedy selection with replacement, up to "
        f"{fin.k or '?'} members; temperature {fin.temperature:.4g} fitted on valid."
    )
    md += [line.strip() for line in lead_lines(fin.to_dict())]
    if fin.deployed == "single" and len(fin.selection["members"]) > 1:
        bar = "beat the probe by more than picking the best explains on" if probe_led else "improve"
        md.append(
            f"An ensemble of {len(fin.selection['members'])} lowered the valid NLL but did not {bar} "
            f"{fin.metric}, so it was not deployed."
        )
    md.append("")
    specs = {c["name"]: c for c in fin.candidate_info}
    rows = [
        {"member": m, "weight": w, **{k: specs.get(m, {}).get(k) for k in ("score", "backbone", "head", "hidden")}}
        for m, w in zip(fin.members, fin.weights)
    ]
    md += [markdown_table(pd.DataFrame(rows).rename(columns={"score": f"best {exp.metric}"})), ""]
    v = fin.valid
    kinds = [("single best", "single", fin.single_temperature)]
    if len(fin.selection["members"]) > 1:
        kinds.append((f"ensemble of {len(fin.selection['members'])}", "ensemble", fin.ensemble_temperature))
    scores = []  # (model, split, temperature, metrics)
    for label, key, t in kinds:
        mark = " (deployed)" if fin.deployed == key else ""
        scores += [
            (f"{label}{mark}", "valid (in-sample)", "1", v[key]),
            (f"{label}{mark}", "valid (in-sample)", f"{t:.3g}", v[f"{key}_calibrated"]),
        ]
        if mark and "deployed_crossfit" in v:
            scores.append(
                (f"{label}{mark}", "valid (cross-fitted)", "fitted on the other folds", v["deployed_crossfit"])
            )
        scored = test.single_best if key == "single" else test.ensemble
        if scored and scored.get("calibration"):
            scores += [
                (f"{label}{mark}", "test", "1", scored["calibration"]["before"]),
                (f"{label}{mark}", "test", f"{t:.3g}", scored["calibration"]["after"]),
            ]
    frame = pd.DataFrame(
        [
            {
                "model": name,
                "split": split,
                "temperature": t,
                **{k: m[k] for k in ("acc", "macro_f1", "ece", "nll", "brier")},
            }
            for name, split, t, m in scores
        ]
    )
    md += [
        markdown_table(frame),
        "",
        "ECE: expected calibration error over 15 bins of the top probability; NLL: mean negative log "
        "likelihood; Brier: mean squared error of the probability vector. In-sample valid figures are "
        "optimistic: valid chose the ensemble and fitted the temperature. Cross-fitted: each fifth of valid "
        "scaled by a temperature fitted on the other four.",
        "",
    ]
    th = fin.threshold
    if th.get("threshold") is None:
        md += [f"No confidence threshold reaches {th['target_accuracy']:.0%} accuracy on valid.", ""]
    elif th["threshold"] == 0:
        md += [f"All valid images together reach {th['target_accuracy']:.0%} accuracy: no threshold is needed.", ""]
    else:
        md += threshold_lines(th)
        md += [""] + threshold_lines(test.threshold or {}, split="test") + [""]
    return md


# -------------------------------------------------------------------------------------------- report
def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def _valid_size(row) -> str:
    """`` (valid acc 0.800 on 45 [0.66, 0.89])``: the size and 95% interval behind a valid figure."""
    from ..heads.probe import format_accuracy

    n, acc = row.get("valid_count"), row.get("best/valid/acc")
    if n is None or acc is None or pd.isna(n) or pd.isna(acc):
        return ""
    return f" (valid acc {format_accuracy(float(acc), int(n))})"


def probe_lines(exp: Experiment) -> list[str]:
    """The linear-probe baseline beside the best trial, and plainly whether the search beat it (the one
    verdict, final.json's ``lead``)."""
    from ..heads.probe import probe_verdict

    if exp.probes.empty or exp.key not in exp.probes:
        return []
    sign = Direction(exp.mode).sign
    best = exp.probes.loc[(sign * exp.probes[exp.key]).idxmax()]
    how = f"C by {int(best['cv_folds'])}-fold CV on train+valid" if best.get("cv_folds") else "C chosen on valid"
    lines = [
        f"- linear probe baseline (`{best['trial_id']}`, C={best['config/C']:g}, {how}): "
        f"{exp.metric} {best[exp.key]:.4f}" + _valid_size(best)
    ]
    lines.append(f"- {probe_verdict(exp.final.lead if exp.final else None, metric=exp.metric)}")
    return lines


def extraction_rates(exp: Experiment) -> dict[str, float]:
    """Images/s of each backbone's bank extraction in this search (timings.json; a bank read from the
    cache has none). Banks extracted in one pass share its rate."""
    timings = read_json(exp.exp_dir / TIMINGS_FILE) or {}
    rates: dict[str, float] = {}
    for name, info in (timings.get("banks") or {}).items():
        if isinstance(info, dict) and info.get("images_per_s") and not info.get("from_cache"):
            rates.setdefault(name.split("-")[0], float(info["images_per_s"]))  # "<backbone>-<size>px-..."
    return rates


def cost_table(exp: Experiment) -> pd.DataFrame:
    """Best metric per backbone against its cost (empty unless several backbones ran)."""
    from ..features.backbones import cost_frontier

    try:
        return cost_frontier(exp.results, exp.key, exp.mode, extraction_rates=extraction_rates(exp))
    except UserError as e:  # a backbone this torchvision does not know (results from elsewhere)
        log.warning("report: no cost table (%s)", e)
        return pd.DataFrame()


def top_table(exp: Experiment, n: int = TOP_TABLE) -> pd.DataFrame:
    df = exp.results.head(n)
    out = pd.DataFrame({"rank": range(1, len(df) + 1), "trial": df["trial_id"].to_numpy()})
    if exp.key in df:
        out[exp.metric] = df[exp.key].to_numpy()
    for col in ("best_epoch", "epochs"):
        if col in df:
            out[col.replace("_", " ")] = df[col].astype("Int64").to_numpy()
    out["status"] = [exp.status(r) for _, r in df.iterrows()]
    for name in exp.searched:
        out[name] = df[f"config/{name}"].to_numpy()
    return out


class _Page:
    """The report being written: its markdown lines, its folder and the figures drawn into it."""

    def __init__(self, out: Path):
        self.out = out
        self.md: list[str] = []
        self.drawn: list[str] = []

    def draw(self, name: str, make) -> bool:
        """Save the figure ``make()`` returns as ``name``; a failure costs that figure, not the report."""
        try:
            fig = make()
            fig.savefig(self.out / name, dpi=DPI)
            self.drawn.append(name)
            return True
        except Exception as e:  # noqa: BLE001 - the search calls this after its results are safe on disk
            log.warning("report: %s not drawn (%s: %s)", name, type(e).__name__, e)
            self.md.extend([f"({name} could not be drawn: {type(e).__name__}: {e})", ""])
            return False


def write_report(exp_dir: str | os.PathLike) -> Path:
    """Write ``<exp_dir>/report/`` (report.md and PNGs) for a finished search; returns report.md's path."""
    exp = load_experiment(exp_dir)
    out = exp.exp_dir / REPORT_DIR
    out.mkdir(exist_ok=True)
    for name in FIGURES:  # a figure this run cannot draw must not be left over from an earlier run
        (out / name).unlink(missing_ok=True)
    page = _Page(out)
    page.md += overview_lines(exp)
    page.md += flag_lines(exp)
    page.md += ["## Top trials", "", markdown_table(top_table(exp)), ""]
    for section in (curves_section, cost_section, params_section, importance_section, final_section, confusion_section):
        section(exp, page)
    page.md += other_sections(exp, out)
    path = out / "report.md"
    path.write_text("\n".join(page.md))
    write_html(path)
    log.info("report: %s and %s (%s)", path, PAGE, ", ".join(page.drawn) or "no figures")
    return path


def overview_lines(exp: Experiment) -> list[str]:
    """The report's title and its first list: data, space, trials, the best, the probe, the one test score."""
    df = exp.results
    statuses = [exp.status(r) for _, r in df.iterrows()]
    md = [f"# Search report: {exp.exp_dir.name}", ""]
    md.append(f"- experiment: `{exp.exp_dir}`")
    if exp.args.get("data"):
        md.append(f"- data: `{exp.args['data']}`")
    space_name = (
        f"`{exp.space.path}`"
        if exp.space
        else f"`{exp.args.get('search_space', 'unknown')}` (not readable now: scales and bounds guessed from the trials)"
    )
    md.append(
        f"- search space: {space_name}; optimised `{exp.metric}` ({exp.mode}), up to {exp.max_epochs} epochs per trial"
    )
    md.append(
        f"- trials: {len(df)}: {statuses.count('completed')} ran to the end, "
        f"{statuses.count('stopped early')} stopped early by ASHA, {statuses.count('errored')} errored"
    )
    if exp.key in df and df[exp.key].notna().any():
        best = df.iloc[0]
        epoch = f" at epoch {int(best['best_epoch'])}" if pd.notna(best.get("best_epoch")) else ""
        md.append(f"- best trial: `{best['trial_id']}`, {exp.metric} {best[exp.key]:.4f}{epoch}" + _valid_size(best))
    md += probe_lines(exp)
    if exp.test:
        t = exp.test.to_dict()  # the figures' format is shared with the console summary's dicts
        scored = deployed_label(t, heads=True)
        md.append(f"- test (scored once, {scored}): {test_figures(t)} on {exp.test.test_count} images")
        single = exp.test.single_best
        if single and not single.get("deployed"):
            md.append(f"- {single_best_label(single)} on test (same pass, not deployed): {test_figures(single)}")
        md += [f"- {line}" for line in comparison_lines(t)]
    md.append(
        f"- backbone weights: `{exp.weights}`"
        + (" (randomly initialised)" if exp.weights.startswith("random:") else "")
    )
    return md + [""]


def flag_lines(exp: Experiment) -> list[str]:
    """The report's flags: best values at a range's edge, trials that errored or stopped, the weights."""
    md = ["## Flags", ""]
    flags = edge_flags(exp)
    md += [f"- {f}" for f in flags] or ["- No best value sits at the edge of a numeric search range."]
    md += [f"- {f}" for f in trial_flags(exp)]
    md += [f"- {weights_flag(exp)}"]
    md += [f"- {flag}" for flag in [random_weights_flag(exp)] if flag]
    return md + [""]


def curves_section(exp: Experiment, page: _Page) -> None:
    page.md += ["## Learning curves", ""]
    if not exp.histories:
        page.md += ["No trial folder with a progress.csv was found.", ""]
    elif page.draw("curves.png", lambda: curves_figure(exp)):
        page.md += [
            f"![{exp.metric} per epoch for every trial](curves.png)",
            "",
            f"The best {min(TOP_CURVES, len(exp.histories))} trials are in colour; an `x` marks a trial "
            "ASHA stopped before the last epoch.",
            "",
        ]


def cost_section(exp: Experiment, page: _Page) -> None:
    frontier = cost_table(exp)
    if frontier.empty:
        return
    from ..features.backbones import cheaper_choice

    page.md += ["## Accuracy against cost", ""]
    if page.draw("cost.png", lambda: cost_figure(frontier, exp.metric)):
        page.md += ["![best metric per backbone against GFLOPs](cost.png)", ""]
    page.md += [
        markdown_table(
            frontier.rename(columns={"best": f"best {exp.metric}", "extract_img_s": "extraction img/s (this search)"})
        ),
        "",
    ]
    line = cheaper_choice(frontier, exp.mode)
    page.md += [
        f"The {line}." if line else "The best backbone is also the cheapest good one here.",
        "",
        "GFLOPs are torchvision's figures for the weights at their crop, scaled by area to the image "
        "size; the Pareto front holds the backbones no other one beats at equal or lower cost.",
        "",
    ]


def params_section(exp: Experiment, page: _Page) -> None:
    if exp.searched:
        page.md += ["## Hyperparameters", ""]
        if page.draw("params.png", lambda: params_figure(exp)):
            page.md += ["![best metric against each hyperparameter](params.png)", ""]


def importance_section(exp: Experiment, page: _Page) -> None:
    values, note = importances(exp)
    page.md += ["## Hyperparameter importance", ""]
    if not values:
        page.md += [f"Not computed: {note}.", ""]
    elif page.draw("importance.png", lambda: importance_figure(values, note)):
        page.md += [
            "![hyperparameter importance](importance.png)",
            "",
            f"Optuna's PED-ANOVA evaluator on {note}: how much each parameter's distribution among the best "
            "trials differs from its distribution over all trials. With few trials this is a rough guide.",
            "",
            markdown_table(pd.DataFrame({"parameter": list(values), "importance": list(values.values())})),
            "",
        ]


def final_section(exp: Experiment, page: _Page) -> None:
    fin = exp.final
    if not fin:
        return
    try:
        page.md += final_lines(exp, fin)
    except (KeyError, IndexError, TypeError, ValueError) as e:  # a final.json from another version
        page.md += [f"(final.json not understood: {type(e).__name__}: {e})", ""]
    if page.draw("reliability.png", lambda: reliability_figure(fin)):
        page.md += ["![reliability diagram on valid, before and after the temperature](reliability.png)", ""]
    if page.draw("coverage.png", lambda: coverage_figure(fin)):
        page.md += ["![accuracy against coverage on valid](coverage.png)", ""]


def confusion_section(exp: Experiment, page: _Page) -> None:
    test = exp.test
    if test and test.confusion_matrix:
        page.md += ["## Test confusion matrix", ""]
        if page.draw("confusion.png", lambda: confusion_figure(test)):
            page.md += [
                "![test confusion matrix](confusion.png)",
                "",
                "Rows are the true class, columns the predicted class.",
                "",
            ]


def other_sections(exp: Experiment, out: Path) -> list[str]:
    """The data audit's and the valid gallery's sections; a failure costs the section, not the report."""
    md = []
    try:
        md += audit_section(exp.exp_dir, out)
    except Exception as e:  # noqa: BLE001 - like a figure: a failed section costs the section, not the report
        log.warning("report: data audit not shown (%s: %s)", type(e).__name__, e)
    try:
        md += gallery_section(exp.exp_dir, out, device=resolve_device("auto"))
    except Exception as e:  # noqa: BLE001 - like a figure: a failed gallery costs the gallery, not the report
        log.warning("report: gallery not drawn (%s: %s)", type(e).__name__, e)
        md += [f"(the valid gallery could not be drawn: {type(e).__name__}: {e})", ""]
    return md


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=os.environ.get("TUNE_RICE_PROG", "python -m tune_rice report"),
        description="Write plots and a markdown report for a finished search into runs/<name>/report/.",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("experiment", help="the experiment folder, runs/<name>")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    path = write_report(args.experiment)
    print(f"wrote {path}")
    for png in sorted(path.parent.glob("*.png")):
        print(f"      {png}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
