"""The numbers behind the final model's choice, all numpy functions of logits ``(N, C)`` (or lists of
them, one per candidate) and integer targets ``(N,)``: no model, no images, no Ray, so the search can
decide its deployed model from the feature banks' valid predictions before the test split is read, and
tests can check every number by hand.

- :func:`select_ensemble`: greedy forward selection with replacement (Caruana et al., ICML 2004) over
  candidates' valid logits, starting from the single best; the ensemble's logits are the weighted mean
  of its members' logits, weights = how often each member was picked / picks.
- :func:`fit_temperature`: one scalar ``T`` minimising the valid NLL of ``softmax(logits / T)``
  (Guo et al., ICML 2017).
- :func:`calibration_metrics`: accuracy, ECE (15 equal-width bins of the top probability), NLL, Brier.
- :func:`coverage_curve` / :func:`suggest_threshold`: accuracy among the images whose top probability is
  at least P, against the share of images kept; the P that keeps a target accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from .. import UserError
from .engine import compute_metrics

ECE_BINS = 15
DEFAULT_ENSEMBLE = 5  # members at most
DEFAULT_ROUNDS = 25  # greedy picks (with replacement): weights in steps of 1/25, as AutoGluon's default
DEFAULT_TARGET_ACCURACY = 0.95
TEMPERATURE_BOUNDS = (0.05, 20.0)


# ------------------------------------------------------------------------------------ probabilities
def log_softmax(logits) -> np.ndarray:
    """Row-wise log-softmax in float64: (N, C) -> (N, C)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits) -> np.ndarray:
    return np.exp(log_softmax(logits))


def _targets(targets, n: int) -> np.ndarray:
    y = np.asarray(targets, dtype=np.int64)
    if y.shape != (n,):
        raise ValueError(f"targets of shape {y.shape} for {n} rows of logits")
    return y


def nll(logits, targets) -> float:
    """Mean negative log-likelihood of the targets (natural log)."""
    lp = log_softmax(logits)
    y = _targets(targets, len(lp))
    return float(-lp[np.arange(len(y)), y].mean())


def brier(probs, targets) -> float:
    """Multi-class Brier score: mean over images of ``sum_c (p_c - [c == y])^2`` (0 best, 2 worst)."""
    p = np.asarray(probs, dtype=np.float64)
    y = _targets(targets, len(p))
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def _bin_stats(probs, targets, bins: int):
    """(count, mean confidence, accuracy) per bin of top probability ``(i/bins, (i+1)/bins]``; NaN when empty."""
    p = np.asarray(probs, dtype=np.float64)
    y = _targets(targets, len(p))
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.searchsorted(edges[1:-1], conf, side="left")  # right-closed bins: conf == i/bins is in bin i-1
    count = np.bincount(idx, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=bins) / count
        acc = np.bincount(idx, weights=correct, minlength=bins) / count
    return edges, count, mean_conf, acc


def reliability_bins(probs, targets, bins: int = ECE_BINS) -> dict:
    """Per bin of top probability ``(i/bins, (i+1)/bins]``: image count, mean confidence, accuracy
    (None for empty bins): the data of a reliability diagram, as JSON-ready lists."""
    edges, count, conf, acc = _bin_stats(probs, targets, bins)

    def plain(a):
        return [None if np.isnan(v) else float(v) for v in a]

    return {
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "count": count.tolist(),
        "confidence": plain(conf),
        "accuracy": plain(acc),
    }


def ece(probs, targets, bins: int = ECE_BINS) -> float:
    """Expected calibration error: ``sum_b n_b / N * |acc_b - conf_b|`` over equal-width bins."""
    _, count, conf, acc = _bin_stats(probs, targets, bins)
    return float((count * np.abs(np.nan_to_num(acc - conf))).sum() / max(1, count.sum()))


def calibration_metrics(logits, targets, *, temperature: float = 1.0) -> dict:
    """acc, macro_f1, ECE (15 bins), NLL and Brier of ``softmax(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    y = _targets(targets, len(z))
    p = softmax(z)
    m = compute_metrics(y, p.argmax(axis=1), z.shape[1])
    return {
        "acc": m["acc"],
        "macro_f1": m["macro_f1"],
        "ece": ece(p, y),
        "nll": nll(z, y),
        "brier": brier(p, y),
        "count": int(len(y)),
    }


# ------------------------------------------------------------------------------------- temperature
def fit_temperature(logits, targets, *, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The ``T`` in ``bounds`` minimising the NLL of ``softmax(logits / T)`` on these (valid) logits.

    The NLL is convex in ``1/T`` (a log-sum-exp minus a linear term), so a bounded Brent search on
    ``1/T`` finds the global minimum. The bounds matter when valid is separated perfectly: the NLL then
    keeps falling as T -> 0, and T stops at its lower bound.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = _targets(targets, len(z))
    if len(z) == 0:
        raise UserError("cannot fit a temperature on an empty valid split")
    lo, hi = 1.0 / bounds[1], 1.0 / bounds[0]
    res = minimize_scalar(lambda beta: nll(z * beta, y), bounds=(lo, hi), method="bounded", options={"xatol": 1e-7})
    beta = float(res.x)
    # Brent stops within xatol of the optimum; an optimum at a bound is returned as the bound itself.
    for edge in (lo, hi):
        if nll(z * edge, y) <= nll(z * beta, y):
            beta = edge
    return 1.0 / beta


# --------------------------------------------------------------------------------------- selection
@dataclass
class Selection:
    """An ensemble chosen by :func:`select_ensemble`.

    ``members``: candidate indices in the order first picked (``members[0]`` is the start, the single
    best); ``weights``: their shares of the picks (sum 1); ``picks``: every pick in order, repeats
    included; ``history``: the valid NLL after each pick (``history[0]``: the start alone).
    """

    members: list[int]
    weights: list[float]
    picks: list[int]
    history: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def ensemble_logits(logits_list: Sequence[np.ndarray], members: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """``sum_i weights[i] * logits_list[members[i]]``: (N, C) float64."""
    out = np.zeros_like(np.asarray(logits_list[members[0]], dtype=np.float64))
    for m, w in zip(members, weights):
        out += float(w) * np.asarray(logits_list[m], dtype=np.float64)
    return out


def select_ensemble(
    logits_list: Sequence[np.ndarray],
    targets,
    *,
    k: int = DEFAULT_ENSEMBLE,
    rounds: int = DEFAULT_ROUNDS,
    start: int = 0,
) -> Selection:
    """Greedy forward selection with replacement over candidates' valid logits (Caruana et al. 2004).

    Starts from candidate ``start`` (the single best by the search metric, so the recipe's choice is the
    baseline every addition must beat), then makes up to ``rounds - 1`` more picks, each the candidate
    whose addition gives the lowest valid NLL of the mean logits of all picks so far; once ``k``
    distinct candidates are in, only they can be picked again. The prefix of picks with the lowest NLL
    is kept (a tie keeps the shorter one), so the result is never worse than the start on valid NLL.
    Ties between candidates go to the lower index (the better-ranked trial): same inputs, same ensemble.
    """
    if k < 1:
        raise UserError(f"--ensemble must be >= 1, got {k}")
    if not logits_list:
        raise UserError("no ensemble candidates")
    zs = [np.asarray(z, dtype=np.float64) for z in logits_list]
    shape = zs[0].shape
    for i, z in enumerate(zs):
        if z.shape != shape:
            raise ValueError(f"candidate {i}: valid logits of shape {z.shape}, candidate 0 has {shape}")
    y = _targets(targets, shape[0])
    picks = [int(start)]
    total = zs[start].copy()  # sum of the picked logits; the ensemble is total / len(picks)
    history = [nll(total, y)]
    if k > 1:
        for _ in range(max(0, int(rounds) - 1)):
            allowed = sorted(set(picks)) if len(set(picks)) >= k else range(len(zs))
            n = len(picks) + 1
            scores = [(nll((total + zs[c]) / n, y), c) for c in allowed]
            best_score, best_c = min(scores)  # ties: the lower index
            picks.append(best_c)
            total += zs[best_c]
            history.append(best_score)
    keep = int(np.argmin(history)) + 1  # argmin returns the first minimum: the shorter prefix on ties
    kept = picks[:keep]
    members = list(dict.fromkeys(kept))
    weights = [kept.count(m) / len(kept) for m in members]
    return Selection(members=members, weights=weights, picks=picks, history=history)


# ------------------------------------------------------------------------------------- confidence
def coverage_curve(probs, targets, *, max_points: int = 200) -> dict:
    """Accuracy against coverage: for thresholds P (the distinct top probabilities, highest first),
    the share of images with top probability >= P and the accuracy among them. At most ``max_points``
    points (evenly spaced in coverage) are returned; the last point is always coverage 1."""
    p = np.asarray(probs, dtype=np.float64)
    y = _targets(targets, len(p))
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    order = np.argsort(-conf, kind="stable")
    conf, correct = conf[order], correct[order]
    # The last index of each run of equal confidences: a threshold keeps all of a tie or none of it.
    ends = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True])
    kept = ends + 1
    acc = np.cumsum(correct)[ends] / kept
    thresholds, coverage = conf[ends], kept / len(conf)
    if len(ends) > max_points:
        pick = np.unique(np.r_[np.linspace(0, len(ends) - 1, max_points).round().astype(int), len(ends) - 1])
        thresholds, coverage, acc = thresholds[pick], coverage[pick], acc[pick]
    return {"threshold": thresholds.tolist(), "coverage": coverage.tolist(), "accuracy": acc.tolist()}


def suggest_threshold(probs, targets, *, target_accuracy: float = DEFAULT_TARGET_ACCURACY) -> dict:
    """The lowest threshold P (the most images kept) whose kept images reach ``target_accuracy``.

    Returns ``{"target_accuracy", "threshold", "coverage", "accuracy"}``; ``threshold`` is 0.0 when all
    images together already reach the target, and None (with coverage 0) when no threshold does.
    """
    if not 0.0 < target_accuracy <= 1.0:
        raise UserError(f"target accuracy must be in (0, 1], got {target_accuracy}")
    curve = coverage_curve(probs, targets, max_points=len(np.asarray(probs)) + 1)
    out = {"target_accuracy": float(target_accuracy), "threshold": None, "coverage": 0.0, "accuracy": None}
    ok = [i for i, a in enumerate(curve["accuracy"]) if a >= target_accuracy - 1e-12]
    if ok:
        i = max(ok, key=lambda j: curve["coverage"][j])
        out.update(
            threshold=0.0 if curve["coverage"][i] >= 1.0 else curve["threshold"][i],
            coverage=curve["coverage"][i],
            accuracy=curve["accuracy"][i],
        )
    return out


CROSSFIT_FOLDS = 5


def _crossfit_folds(n: int, folds: int, seed: int = 0) -> np.ndarray:
    """A fold index per image: a seeded shuffle dealt round-robin (``min(folds, n)`` folds)."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n) % max(1, min(folds, n))
    return out


def crossfit_calibration(logits, targets, *, folds: int = CROSSFIT_FOLDS) -> dict:
    """:func:`calibration_metrics` of valid logits each scaled by a temperature fitted on the other folds:
    what the temperature achieves on images it was not fitted on (the in-sample "after" figure is
    optimistic). Adds ``folds``."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    fold = _crossfit_folds(len(y), folds)
    scaled = np.empty_like(z)
    for f in np.unique(fold):
        out = fold == f
        scaled[out] = z[out] / fit_temperature(z[~out], y[~out]) if (~out).any() else z[out]
    return {**calibration_metrics(scaled, y), "folds": int(fold.max()) + 1}


def crossfit_threshold(logits, targets, *, target_accuracy: float, folds: int = CROSSFIT_FOLDS) -> dict:
    """What the confidence threshold achieves on images it was not chosen on: for each fold, the temperature
    and the threshold (:func:`suggest_threshold`) fitted on the other folds, applied to it. Returns the
    share of valid images kept and the accuracy among them, pooled over the folds."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    fold = _crossfit_folds(len(y), folds)
    kept = right = 0
    for f in np.unique(fold):
        out = fold == f
        if not (~out).any():
            continue
        t = fit_temperature(z[~out], y[~out])
        th = suggest_threshold(softmax(z[~out] / t), y[~out], target_accuracy=target_accuracy)["threshold"]
        if th is None:  # no threshold reached the target on the other folds: this fold keeps nothing
            continue
        p = softmax(z[out] / t)
        keep = p.max(1) >= th
        kept += int(keep.sum())
        right += int((p.argmax(1)[keep] == y[out][keep]).sum())
    return {
        "coverage": kept / max(1, len(y)),
        "accuracy": right / kept if kept else None,
        "folds": int(fold.max()) + 1,
    }
