"""The search's console summary (also summary.txt) and baseline.json: the top trials, the linear probe
and whether the search beat it, the final model, the test score, and which backbones ran on random
weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..experiment.space import SearchSpace
from ..features.backbones import cheaper_choice, cost_frontier
from ..heads import final
from ..heads.probe import Baseline, ProbeResult, format_accuracy, is_probe_id, probe_verdict
from .results import Winner


def format_summary(
    df: pd.DataFrame,
    test: dict | None,
    *,
    metric: str,
    exp_dir: Path,
    seconds: float,
    phases: dict,
    weights: str,
    top: int = 5,
    searched: Sequence[str] | None = None,
    final_record: dict | None = None,
    mode: str | None = None,
    backbones: dict[str, str] | None = None,
    probes: dict[str, ProbeResult] | None = None,
    folds: int = 0,
    notes: Sequence[str] = (),
    audit: Sequence[str] = (),
) -> str:
    """The console summary; the top-trials table shows only the ``searched`` parameters (default: all),
    each valid figure with its size and 95% interval; then the linear probe, and whether it was beaten.
    With ``mode`` and several backbones, it names the best one under a phone-sized cost when that is not
    the overall best. ``weights``: the deployed model's backbone weights; ``backbones``: every backbone's
    (name -> identity). ``notes`` follow the count of trials; ``audit`` (the data audit's lines) the test score."""
    lines = []
    if folds:
        lines.append(f"cross-validated: {folds} folds over train+valid; every valid figure is out-of-fold")
    n = len(df)
    errored = int((df["status"] == "ERROR").sum())
    stopped = int(df.get("stopped_early", pd.Series(dtype=bool)).fillna(False).sum())
    lines.append(
        f"{n} trials: {n - errored - stopped} ran to the end, {stopped} stopped early by ASHA, {errored} errored"
    )
    lines.extend(notes)
    key = f"best/{metric}"
    lines += top_trials_lines(df, metric, searched=searched, top=top)
    lines += probe_summary(probes or {}, (final_record or {}).get("lead"), metric=metric)
    if final_record:
        lines += final_lines(final_record)
    cheaper = cheaper_choice(cost_frontier(df, key, mode), mode) if mode else ""
    if cheaper:
        lines.append(cheaper[0].upper() + cheaper[1:] + " (report/cost.png)")
    if test:
        lines += scored_test_lines(test)
    lines.extend(audit)
    lines += random_weights_notes(weights, backbones or {})
    lines.append("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in phases.items()) + f", total {seconds:.1f}s")
    lines.append(f"outputs: {exp_dir}  (results.csv, best/model.pt, test_metrics.json, report/)")
    lines.append(f"tensorboard --logdir {exp_dir}   # then open http://localhost:6006")
    return "\n".join(lines)


def top_trials_lines(df: pd.DataFrame, metric: str, *, searched: Sequence[str] | None, top: int) -> list[str]:
    """The best ``top`` trials as a table of their ``searched`` parameters (default: all), each valid
    figure with its size and 95% interval."""
    key = f"best/{metric}"
    if key not in df:
        return []
    show = [c for c in ("trial_id", key, "best_epoch", "epochs") if c in df] + [
        c for c in df.columns if c.startswith("config/") and (searched is None or c[7:] in searched)
    ]
    table = df[df[key].notna()].head(top)
    shown = table[show].rename(columns=lambda c: c.replace("config/", ""))
    if "valid_count" in table and "best/valid/acc" in table:
        shown.insert(
            2,
            "valid acc, n [95% CI]",
            [
                format_accuracy(float(a), int(n)) if pd.notna(a) and pd.notna(n) else ""
                for a, n in zip(table["best/valid/acc"], table["valid_count"])
            ],
        )
    return [f"top {min(top, len(table))} by {metric}:", shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")]


def scored_test_lines(test: dict) -> list[str]:
    """The one test score of the deployed model, the models scored beside it and the threshold on test."""
    what = final.deployed_label(test)
    cal = test.get("calibration")
    ece = f", ECE {cal['before']['ece']:.3f} -> {cal['after']['ece']:.3f} with the temperature" if cal else ""
    reads = test.get("test_reads") or 1
    once = "scored once" if reads <= 1 else f"scored once here; the split's read {reads} in all"
    lines = [f"TEST ({once}, {what}): {final.test_figures(test)} on {test['test_count']} images{ece}"]
    for which in ("single_best", "ensemble"):
        other = test.get(which)
        if other and not other.get("deployed"):
            label = "selected ensemble" if which == "ensemble" else final.single_best_label(other)
            lines.append(f"  {label} (same pass, not deployed): {final.test_figures(other)}")
    lines += [f"  {line}" for line in final.comparison_lines(test)]
    lines += [f"  {line}" for line in final.threshold_lines(test.get("threshold") or {}, split="test")]
    return lines


def random_weights_notes(weights: str, backbones: dict[str, str]) -> list[str]:
    """Loud notes where backbones ran on random weights: the deployed model's (``weights``) or others."""
    lines = []
    random = {b: w for b, w in backbones.items() if w.startswith("random:")}
    if random and (len(backbones) > 1 or not weights.startswith("random:")):
        named = ", ".join(f"{b} ({w})" for b, w in list(random.items())[:2])
        more = f" and {len(random) - 2} more" if len(random) > 2 else ""
        lines.append(
            f"NOTE: {len(random)} of {len(backbones)} backbones ran on RANDOMLY INITIALISED weights: "
            f"{named}{more}; their trials' scores are far below what ImageNet weights give."
        )
    if weights.startswith("random:"):
        lines.append(
            f"NOTE: the deployed model's backbone was RANDOMLY INITIALISED ({weights}); ImageNet weights give far "
            "better features (see README: weights)."
        )
    return lines


def baseline_record(df: pd.DataFrame, baseline: Baseline, winner: Winner, space: SearchSpace) -> dict:
    """baseline.json: every probe, the best trial, whether it beat the best probe on valid, and the
    deployed model's valid figures (out-of-fold with --cv)."""
    from ..heads.probe import best_probe, search_beats_probe

    key = f"best/{space.metric}"
    trials = df[df[key].notna()] if key in df else df.iloc[:0]
    top = trials.iloc[0] if len(trials) else None

    def num(row, col):
        return float(row[col]) if row is not None and col in row and pd.notna(row[col]) else None

    out = {
        "metric": space.metric,
        "mode": space.mode,
        "cv_folds": baseline.k,
        "probes": {n: p.to_dict() for n, p in baseline.probes.items()},
        "best_trial": None
        if top is None
        else {
            "trial_id": top["trial_id"],
            "value": num(top, key),
            "valid_acc": num(top, "best/valid/acc"),
            "valid_count": num(top, "valid_count"),
        },
        "single_best": winner.trial_id,
        "deployed": winner.fm.choice.deployed,
        "members": list(winner.fm.choice.members),
    }
    if baseline.probes:
        name, _ = best_probe(baseline.probes, space.metric, space.mode)
        out["best_probe"] = name
        out["search_beat_probe"] = search_beats_probe(winner.fm.choice.lead)  # the one verdict: final.lead_index
        out["lead"] = winner.fm.choice.lead
    # the deployed model on the logits the choice was made on (valid, or out-of-fold), before its temperature
    deployed = winner.fm.choice.valid["deployed"]
    out["deployed_valid_acc"], out["deployed_valid_count"] = deployed["acc"], deployed["count"]
    return out


def probe_summary(probes: dict[str, ProbeResult], lead: dict | None, *, metric: str) -> list[str]:
    """The linear probe of each bank with its valid figures, then one plain line: was it beaten (``lead``:
    final.json's record, the one verdict)."""
    if not probes:
        return []
    from ..heads.probe import metric_key

    lines = []
    for name, p in probes.items():
        how = f"C by {p.folds}-fold CV" if p.folds else "C chosen on valid"
        lines.append(
            f"linear probe on {name} ({how}: {p.C:g}): valid acc "
            f"{format_accuracy(p.valid['acc'], p.valid['count'])}, {metric} {p.valid[metric_key(metric)]:.4g}"
        )
    lines.append(probe_verdict(lead, metric=metric))
    return lines


def final_lines(record: dict) -> list[str]:
    """The summary's lines on the final model: what was deployed, from what, and the suggested threshold."""
    v = record["valid"]
    sel = record["selection"]
    single = "the linear probe" if is_probe_id(record["candidates"][0]) else "the single best trial"
    if record["deployed"] == "ensemble":
        members = ", ".join(f"{m} {w:.2f}" for m, w in zip(record["members"], record["weights"]))
        head = f"FINAL: an ensemble of {len(record['members'])} ({members})"
    elif len(sel["members"]) > 1:
        key = record["metric"].split("/")[-1]
        key = key if key in v["ensemble"] else "acc"  # the figure the decision was made on, where kept
        head = (
            f"FINAL: {single} (an ensemble of {len(sel['members'])} was not deployed on valid: "
            f"{key} {v['ensemble'][key]:.4f} vs {v['single'][key]:.4f})"
        )
    else:
        head = f"FINAL: {single}"
    lines = [
        f"{head}; chosen on valid among {len(record['candidates'])} candidates; temperature "
        f"{record['temperature']:.3g} ({final.valid_ece_text(v)})"
    ]
    lines += final.lead_lines(record)
    lines += [f"  {line}" for line in final.threshold_lines(record["threshold"])]
    return lines
