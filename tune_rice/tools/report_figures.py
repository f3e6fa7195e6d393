"""The report's figures, each a matplotlib Figure drawn from the experiment's records (report.py saves
them): learning curves, hyperparameters, importance, the confusion matrix, reliability, coverage, cost."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..records import FinalRecord, TestMetrics
from .report_data import Experiment, match_choice, param_kind

TOP_CURVES = 5
DPI = 130
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd")  # the top five, best first
GREY = "#9a9a9a"
ERROR_COLOUR = "#c0392b"


def _figure(**kwargs):
    from matplotlib.figure import Figure

    return Figure(layout="constrained", dpi=DPI, **kwargs)


def curves_figure(exp: Experiment):
    """Metric per epoch for every trial; the best five coloured; ASHA stops and errors marked."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig = _figure(figsize=(11, 5.5))
    ax = fig.add_subplot()
    order = list(exp.results["trial_id"])
    top = [t for t in order if t in exp.histories][:TOP_CURVES]
    handles = []
    # Grey first, then the top five over them.
    for trial_id in [t for t in order if t not in top] + top:
        hist = exp.histories.get(trial_id)
        if hist is None:
            continue
        row = exp.results.loc[exp.results["trial_id"] == trial_id].iloc[0]
        status = exp.status(row)
        is_top = trial_id in top
        colour = COLOURS[top.index(trial_id)] if is_top else GREY
        x, y = hist["_epoch"].to_numpy(), hist[exp.metric].to_numpy(dtype=float)
        # The best is drawn widest and lowest, each next one narrower on top of it: curves that coincide
        # (several trials at 100% accuracy) show as nested bands instead of hiding one another.
        width = 1.6 + 0.8 * (len(top) - 1 - top.index(trial_id)) if is_top else 1.0
        (line,) = ax.plot(
            x,
            y,
            color=colour,
            lw=width,
            alpha=1.0 if is_top else 0.55,
            marker="o" if is_top else None,
            ms=1.5 + width,
            zorder=3 + 0.1 * top.index(trial_id) if is_top else 2,
        )
        if status == "stopped early":
            ax.plot(x[-1], y[-1], "x", color=colour, ms=9, mew=2.2, zorder=4)
        elif status == "errored":
            ax.plot(x[-1], y[-1], "s", color=ERROR_COLOUR, ms=7, mfc="none", mew=1.8, zorder=4)
        if is_top:
            best = row.get(exp.key)
            handles.append((top.index(trial_id), line, f"#{top.index(trial_id) + 1} {trial_id}: {best:.4g}"))
    labelled = [h[1:] for h in sorted(handles)]
    extra = [Line2D([], [], color=GREY, lw=1.0, label="other trials")] if len(exp.histories) > len(top) else []
    extra.append(Line2D([], [], color="black", marker="x", ls="none", ms=8, mew=2, label="stopped early (ASHA)"))
    if any(exp.status(r) == "errored" for _, r in exp.results.iterrows()):
        extra.append(
            Line2D([], [], color=ERROR_COLOUR, marker="s", ls="none", mfc="none", ms=7, mew=1.8, label="errored")
        )
    if exp.max_epochs:
        ax.axvline(exp.max_epochs, color="black", ls=":", lw=1)
        extra.append(Line2D([], [], color="black", ls=":", lw=1, label=f"max epochs ({exp.max_epochs})"))
    fig.legend(
        [h[0] for h in labelled] + extra,
        [h[1] for h in labelled] + [e.get_label() for e in extra],
        loc="outside right upper",
        fontsize=9,
        title=f"top {len(labelled)} by best {exp.metric}",
        title_fontsize=9,
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{exp.metric} ({exp.mode} is better)")
    ax.set_title(f"{exp.metric} per epoch: {len(exp.histories)} trials, best {len(labelled)} in colour")
    ax.grid(alpha=0.3)
    return fig


def params_figure(exp: Experiment):
    """Each trial's best metric against each searched hyperparameter."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    names = exp.searched
    ncols = min(3, max(1, len(names)))
    nrows = max(1, math.ceil(len(names) / ncols))
    fig = _figure(figsize=(max(7.0, 4.3 * ncols + 0.4), 3.5 * nrows + 0.9))
    df = exp.results
    statuses = np.asarray([exp.status(r) for _, r in df.iterrows()])
    y = df[exp.key].to_numpy(dtype=float) if exp.key in df else np.full(len(df), np.nan)
    rng = np.random.default_rng(0)
    kinds = set()
    for k, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        kind, spec = param_kind(exp, name)
        kinds.add(kind)
        raw = df[f"config/{name}"]
        if kind == "choice":
            index = {str(c): i for i, c in enumerate(spec)}
            matched = [match_choice(v, spec) for v in raw]
            x = np.asarray([index[str(m)] if m is not None else np.nan for m in matched], dtype=float)
            x = x + rng.uniform(-0.15, 0.15, len(x))
            ax.set_xticks(range(len(spec)), [str(c) for c in spec])
            ax.set_xlim(-0.6, len(spec) - 0.4)
            for i in range(len(spec)):  # the mean of each category as a short bar
                sel = (np.abs(x - i) < 0.5) & np.isfinite(y) & (statuses != "errored")
                if sel.any():
                    ax.plot([i - 0.28, i + 0.28], [y[sel].mean()] * 2, color="black", lw=1.5, alpha=0.7)
        else:
            x = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
            if kind == "log":
                ax.set_xscale("log")
            elif kind == "int":  # few distinct values: spread the points a little, tick whole numbers
                x = x + rng.uniform(-0.12, 0.12, len(x)) * max(1.0, (spec[1] - spec[0]) / 10)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        done = statuses == "completed"
        early = statuses == "stopped early"
        ax.scatter(x[done], y[done], s=30, color=COLOURS[0], alpha=0.8, zorder=3)
        if kind != "choice" and exp.space is not None:  # without the space file the bounds are unknown
            # drawn after the points: on an empty log axis matplotlib warns about singular limits
            for bound in spec:
                ax.axvline(float(bound), color="black", ls="--", lw=0.9, alpha=0.6)
        ax.scatter(x[early], y[early], s=34, marker="x", color=GREY, linewidths=1.6, zorder=2)
        failed = statuses == "errored"
        ax.scatter(x[failed], y[failed], s=34, marker="s", facecolor="none", edgecolor=ERROR_COLOUR, lw=1.4, zorder=2)
        finite = np.isfinite(y) & np.isfinite(x)
        if finite.any():
            b = int(np.flatnonzero(finite)[0])  # results are sorted best first
            ax.scatter([x[b]], [y[b]], s=170, marker="*", color=COLOURS[1], edgecolor="black", lw=0.6, zorder=4)
        ax.set_title(name + (" (log scale)" if kind == "log" else ""), fontsize=11)
        ax.set_xlabel(name)
        ax.set_ylabel(f"best {exp.metric}")
        ax.grid(alpha=0.3)
    legend = [
        Line2D([], [], color=COLOURS[0], marker="o", ls="none", label="trial that ran to the end"),
        Line2D([], [], color=GREY, marker="x", ls="none", mew=1.6, label="stopped early (ASHA)"),
        Line2D([], [], color=COLOURS[1], marker="*", ls="none", ms=13, mec="black", label="best trial"),
        Line2D([], [], color="black", ls="--", lw=0.9, label="search bounds"),
        Line2D([], [], color="black", lw=1.5, label="mean per choice"),
    ]
    if exp.space is None or kinds <= {"choice"}:
        legend = [h for h in legend if h.get_label() != "search bounds"]
    if "choice" not in kinds:
        legend = [h for h in legend if h.get_label() != "mean per choice"]
    if (statuses == "errored").any():
        legend.insert(2, Line2D([], [], color=ERROR_COLOUR, marker="s", ls="none", mfc="none", label="errored"))
    fig.legend(handles=legend, loc="outside lower center", ncol=3 if ncols == 1 else len(legend), fontsize=9)
    fig.suptitle(f"best {exp.metric} of each trial against each searched hyperparameter", fontsize=12)
    return fig


def importance_figure(values: dict[str, float], note: str):
    fig = _figure(figsize=(7.5, 1.0 + 0.55 * max(3, len(values))))
    ax = fig.add_subplot()
    names = list(values)[::-1]  # most important on top
    bars = ax.barh(names, [values[n] for n in names], color=COLOURS[0])
    ax.bar_label(bars, fmt="%.2f", padding=3, fontsize=9)
    ax.set_xlim(0, max(1.0, max(values.values()) * 1.15))
    ax.set_xlabel("importance (normalised, sums to 1)")
    ax.set_ylabel("hyperparameter")
    ax.set_title(f"hyperparameter importance (Optuna PED-ANOVA, {note})", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    return fig


def draw_confusion(cm: np.ndarray, classes, *, title: str = "confusion matrix", min_size=(0.0, 0.0)):
    """A confusion matrix (rows = true class) as a matplotlib Figure, counts written in the cells.

    Object API only (no pyplot): the search draws this for TensorBoard in a process that may have a
    display, and the figure is never shown on screen."""
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    size = (max(1.2 * len(classes) + 2.5, min_size[0]), max(1.1 * len(classes) + 2, min_size[1]))
    fig = Figure(figsize=size, layout="tight")
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = cm.max() if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > top / 2 else "black")
    return fig


def confusion_figure(test: TestMetrics):
    """The test confusion matrix of test_metrics.json."""
    title = f"test confusion matrix (trial {test.trial_id or '?'}): accuracy {test.accuracy:.3f}, n={test.test_count}"
    return draw_confusion(np.asarray(test.confusion_matrix), test.classes, title=title, min_size=(6.0, 5.0))


def reliability_figure(final: FinalRecord):
    """The deployed model on valid: accuracy per bin of top probability, before and after its temperature."""
    fig = _figure(figsize=(10, 4.4))
    axes = fig.subplots(1, 2, sharey=True)
    valid = final.valid
    for ax, key, label in ((axes[0], "before", "deployed"), (axes[1], "after", "deployed_calibrated")):
        bins = final.reliability[key]
        lo, hi = np.asarray(bins["lower"]), np.asarray(bins["upper"])
        count = np.asarray(bins["count"])
        acc = np.asarray([np.nan if a is None else a for a in bins["accuracy"]], dtype=float)
        conf = np.asarray([np.nan if c is None else c for c in bins["confidence"]], dtype=float)
        full = count > 0
        ax.bar(
            lo[full],
            acc[full],
            width=(hi - lo)[full],
            align="edge",
            color=COLOURS[0],
            alpha=0.8,
            edgecolor="white",
            label="accuracy in the bin",
        )
        ax.bar(
            lo[full],
            conf[full] - acc[full],
            bottom=acc[full],
            width=(hi - lo)[full],
            align="edge",
            color=COLOURS[1],
            alpha=0.25,
            label="gap to the mean confidence",
        )
        ax.plot([0, 1], [0, 1], color="black", ls="--", lw=1, label="perfect calibration")
        for x, h, n in zip(lo[full], acc[full], count[full]):
            ax.text(x + (hi - lo)[0] / 2, min(h, 0.93) + 0.02, str(int(n)), ha="center", fontsize=7)
        t = final.temperature if key == "after" else 1.0
        m = valid[label]
        ax.set_title(
            f"valid, {'after' if key == 'after' else 'before'} temperature (T = {t:.3g}): "
            f"ECE {m['ece']:.3f}, NLL {m['nll']:.3f}",
            fontsize=10,
        )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top probability (15 bins; numbers: images per bin)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="upper left")
    return fig


def coverage_figure(final: FinalRecord):
    """Valid accuracy among the images kept against the share kept, with the suggested threshold."""
    fig = _figure(figsize=(7, 4.6))
    ax = fig.add_subplot()
    curve, th = final.coverage, final.threshold
    ax.plot(
        curve["coverage"],
        curve["accuracy"],
        color=COLOURS[0],
        lw=2,
        drawstyle="steps-post",
        label="accuracy among the images kept",
    )
    ax.axhline(th["target_accuracy"], color="black", ls=":", lw=1, label=f"target {th['target_accuracy']:.0%}")
    if th.get("threshold") is not None:
        ax.plot(
            [th["coverage"]],
            [th["accuracy"]],
            "o",
            color=COLOURS[1],
            ms=8,
            label=f"--min-confidence {th['threshold']:.3g}: keeps {th['coverage']:.0%}",
        )
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("coverage (share of valid images with top probability >= P)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy against coverage on valid (calibrated probabilities)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return fig


def cost_figure(frontier: pd.DataFrame, metric: str):
    """Best metric per backbone against GFLOPs (log axis); the Pareto front joined and in colour."""
    fig = _figure(figsize=(8, 5))
    ax = fig.add_subplot()
    off = frontier[~frontier["pareto"]]
    front = frontier[frontier["pareto"]].sort_values("gflops")
    ax.scatter(off["gflops"], off["best"], color=GREY, label="dominated")
    ax.plot(front["gflops"], front["best"], "o-", color=COLOURS[0], label="Pareto front")
    for r in frontier.itertuples():
        ax.annotate(
            f"{r.backbone} {r.image_size}px", (r.gflops, r.best), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    ax.set_xscale("log")
    ax.set_xlabel("GFLOPs per image (torchvision's figure, scaled to the image size)")
    ax.set_ylabel(f"best {metric}")
    ax.set_title("accuracy against cost, one point per backbone")
    ax.legend(loc="best", fontsize=8)
    return fig
