"""Statistics of choices and scores on a finite split: the lead rule that accounts for picking the best,
and the intervals of test figures.

No Ray, no torch: logits ``(N, C)`` (or per-image terms) and integer targets ``(N,)`` in, numbers out.

**The lead rule** (:func:`lead_test`). The search's best trial is the best of many trials on the same
valid images, so its lead over the linear probe there is biased upward by the pick itself (the winner's
curse): with no real difference, the best of 30 trials beats the probe by more than one paired standard
error most of the time. The rule asks instead how often picking the best of the trials would give a lead
this large when no trial is better than the probe: White's reality check for data snooping (White,
Econometrica 2000) with studentised differences (Hansen, JBES 2005). Each trial's advantage over the
probe is resampled with the same bootstrap draws of the images (Poisson weights), centred on its observed
value, divided by its bootstrap standard deviation, and the maximum over the trials is taken: the spread of
what the pick produces by chance, with the trials' correlation kept. The best trial leads when its own
studentised advantage is beyond all but ``alpha`` of those maxima. Trials the rule does not see (only the
top ones keep a checkpoint) are counted by a union bound: the p-value is multiplied by
``ceil(trials run / trials seen)``. Where few images tell the two apart, the bootstrap is too kind; the
p-value is never below the exact one-sided sign test (McNemar's) of the best trial alone against the
probe, so a split of b images to 0 is decided the same way at every size of valid: b >= 5 leads at
``alpha`` 0.05, as the exact test says. Ties count against the lead. :func:`simulate_lead` measures the rule's error rates; tests/test_stats.py holds it to them.

**Intervals on test**: :func:`bootstrap_interval` (a percentile interval of any metric, e.g. macro-F1),
:func:`mcnemar` (the exact paired comparison of two models on the same images); the Wilson interval of an
accuracy is :func:`tune_rice.heads.probe.wilson_interval`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .. import UserError
from ..records import Direction

DRAWS = 1000  # bootstrap draws: the p-value's resolution is 1/1001
ALPHA = 0.05  # the chance that a search with no real advantage over the probe is said to beat it
SEED = 0  # the draws are seeded: the same logits give the same verdict
METRICS = ("acc", "macro_f1", "balanced_acc", "loss")  # what each split's figures are scored by
MAX_WEIGHTS = 4_000_000  # bootstrap weights held at once (draws x images): larger sets go in chunks


# -------------------------------------------------------------------------------- scores from sums
def metric_name(metric: str) -> str:
    """``valid/acc`` -> ``acc``, checked against :data:`METRICS`."""
    key = metric.split("/", 1)[-1]
    if key not in METRICS:
        raise UserError(f"unknown metric {metric!r}; valid choices: {', '.join(METRICS)}")
    return key


def score_terms(logits, targets, metric: str) -> np.ndarray:
    """Per-image terms whose (weighted) sums give ``metric`` (see :func:`scores_from_sums`): (N, q).

    acc: right or wrong (q = 1); loss: the NLL (q = 1); balanced_acc: per class, right and true (q = 2C);
    macro_f1: per class, right, true and predicted (q = 3C)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    key = metric_name(metric)
    if key == "loss":
        zmax = z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z - zmax).sum(axis=1)) + zmax[:, 0]
        return (lse - z[np.arange(len(y)), y])[:, None]
    pred = z.argmax(axis=1)
    if key == "acc":
        return (pred == y).astype(np.float64)[:, None]
    eye = np.eye(z.shape[1])
    true, predicted = eye[y], eye[pred]
    right = true * predicted
    return np.concatenate([right, true] if key == "balanced_acc" else [right, true, predicted], axis=1)


def scores_from_sums(sums: np.ndarray, total, metric: str) -> np.ndarray:
    """``metric`` from (weighted) sums of :func:`score_terms` ``(..., q)`` over ``total`` images ``(...)``.

    macro_f1 is the mean over all classes of ``2 TP / (true + predicted)`` (0 for a class neither present
    nor predicted), as scikit-learn's ``f1_score(average="macro", labels=all classes)``; balanced_acc the
    mean recall over the classes present, as its ``balanced_accuracy_score``."""
    s = np.asarray(sums, dtype=np.float64)
    key = metric_name(metric)
    if key in ("acc", "loss"):
        return s[..., 0] / np.maximum(total, 1e-300)
    c = s.shape[-1] // (2 if key == "balanced_acc" else 3)
    right, true = s[..., :c], s[..., c : 2 * c]
    if key == "balanced_acc":
        present = true > 0
        recall = np.divide(right, true, out=np.zeros_like(right), where=present)
        return recall.sum(-1) / np.maximum(present.sum(-1), 1)
    denom = true + s[..., 2 * c :]
    f1 = np.divide(2 * right, denom, out=np.zeros_like(right), where=denom > 0)
    return f1.mean(-1)


def score(logits, targets, metric: str) -> float:
    """``metric`` of ``logits`` (N, C) against ``targets`` (N,)."""
    terms = score_terms(logits, targets, metric)
    return float(scores_from_sums(terms.sum(0), len(terms), metric))


# ---------------------------------------------------------------------------------- the bootstrap
def bootstrap_weights(n: int, *, draws: int = DRAWS, seed: int = SEED):
    """Poisson(1) weights of ``n`` images for ``draws`` resamples, in chunks of rows ``(b, n)`` float64:
    one seeded stream, so the same ``n``, ``draws`` and ``seed`` give the same weights."""
    rng = np.random.default_rng(seed)
    step = max(1, MAX_WEIGHTS // max(1, n))
    for start in range(0, draws, step):
        yield rng.poisson(1.0, (min(step, draws - start), n)).astype(np.float64)


def resampled_scores(terms: np.ndarray, metric: str, *, draws: int = DRAWS, seed: int = SEED) -> np.ndarray:
    """``metric`` under each bootstrap draw of the images: ``terms`` ``(..., N, q)`` -> ``(..., draws)``.
    Leading dimensions (models, simulated repetitions) share the draws, so their differences are paired."""
    t = np.asarray(terms, dtype=np.float64)
    out = []
    for w in bootstrap_weights(t.shape[-2], draws=draws, seed=seed):
        sums = np.matmul(w, t)  # (..., b, q)
        out.append(scores_from_sums(sums, w.sum(1), metric))
    return np.concatenate(out, axis=-1)


def reality_check(observed: np.ndarray, boot: np.ndarray, *, lead: int = 0) -> np.ndarray:
    """The p-value of the lead of model ``lead`` given the best of K was picked (White 2000, studentised as
    Hansen 2005): ``observed`` advantages ``(..., K)`` (> 0: better than the reference), ``boot`` the same
    under each bootstrap draw ``(..., B, K)``. Ties count as exceedances: ``(1 + #{max* >= t}) / (B + 1)``."""
    obs = np.asarray(observed, dtype=np.float64)
    centred = np.asarray(boot, dtype=np.float64) - obs[..., None, :]  # (..., B, K)
    sd = centred.std(axis=-2)
    sd = np.where(sd > 0, sd, 1.0)  # a model that never differs from the reference: centred is all 0
    t = obs[..., lead] / sd[..., lead]
    tmax = (centred / sd[..., None, :]).max(axis=-1)  # (..., B)
    tol = 1e-9 * np.maximum(1.0, np.abs(t))
    exceed = (tmax >= (t - tol)[..., None]).sum(axis=-1)
    return (1.0 + exceed) / (centred.shape[-2] + 1.0)


def selection_pvalue(
    trial_terms: np.ndarray,
    reference_terms: np.ndarray,
    metric: str,
    *,
    sign: float = 1.0,
    lead: int = 0,
    trials_run: int | None = None,
    draws: int = DRAWS,
    seed: int = SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """The lead rule's core: K trials' terms ``(..., K, N, q)`` against a reference's ``(..., N, q)``
    (``sign`` -1 when lower is better). Returns (the observed advantage of trial ``lead``, its p-value with
    ``ceil(trials_run / K)`` for the trials not seen), each ``(...)``."""
    trial = np.asarray(trial_terms, dtype=np.float64)
    ref = np.asarray(reference_terms, dtype=np.float64)[..., None, :, :]
    k, n = trial.shape[-3], trial.shape[-2]
    observed = sign * (scores_from_sums(trial.sum(-2), n, metric) - scores_from_sums(ref.sum(-2), n, metric))
    boot = sign * (
        resampled_scores(trial, metric, draws=draws, seed=seed) - resampled_scores(ref, metric, draws=draws, seed=seed)
    )
    p = reality_check(observed, np.swapaxes(boot, -1, -2), lead=lead)
    unseen = math.ceil(max(trials_run or k, k) / k)
    p = np.minimum(1.0, p * unseen)
    if metric_name(metric) != "loss":  # few discordant images: the exact sign test is the floor
        p = np.maximum(p, sign_test(_right(trial[..., lead, :, :], metric), _right(ref[..., 0, :, :], metric)))
    return observed[..., lead], p


def _right(terms: np.ndarray, metric: str) -> np.ndarray:
    """Whether each image is classified right, from :func:`score_terms` ``(..., N, q)`` -> ``(..., N)``."""
    q = terms.shape[-1]
    key = metric_name(metric)
    if key == "acc":
        return terms[..., 0]
    return terms[..., : q // (2 if key == "balanced_acc" else 3)].sum(-1)


def sign_test(a_right: np.ndarray, b_right: np.ndarray) -> np.ndarray:
    """One-sided exact sign test (McNemar's) that ``a`` is right more often than ``b`` on the same images
    ``(..., N)``: ``P(Binomial(discordant, 1/2) >= a_only)``; 1 when they never disagree."""
    from scipy.stats import binom

    a, b = np.asarray(a_right) > 0.5, np.asarray(b_right) > 0.5
    a_only, b_only = (a & ~b).sum(-1), (b & ~a).sum(-1)
    return np.where(a_only + b_only > 0, binom.sf(a_only - 1, a_only + b_only, 0.5), 1.0)


def lead_test(
    trials: Sequence[np.ndarray],
    reference,
    targets,
    *,
    metric: str,
    mode: str,
    lead: int = 0,
    trials_run: int | None = None,
    alpha: float = ALPHA,
    draws: int = DRAWS,
    seed: int = SEED,
) -> dict:
    """Does trial ``lead`` beat ``reference`` (the linear probe) on these images by more than picking the
    best of ``trials`` (each logits (N, C)) gives by chance? ``trials_run``: how many trials the search ran
    (default: those given). Returns the record final.json keeps (``clear``: it does)."""
    if not trials:
        raise ValueError("no trial to compare")
    y = np.asarray(targets, dtype=np.int64)
    terms = np.stack([score_terms(z, y, metric) for z in trials])
    ref = score_terms(reference, y, metric)
    sign = Direction(mode).sign
    advantage, p = selection_pvalue(
        terms, ref, metric, sign=sign, lead=lead, trials_run=trials_run, draws=draws, seed=seed
    )
    return {
        "rule": "reality check",
        "advantage": float(advantage),
        "p_value": float(p),
        "alpha": float(alpha),
        "compared": len(trials),
        "trials": int(max(trials_run or len(trials), len(trials))),
        "count": len(y),
        "clear": bool(p <= alpha),
    }


# ------------------------------------------------------------------------------------ simulation
def simulate_lead(
    *,
    advantage: float,
    trials: int = 30,
    images: int = 300,
    accuracy: float = 0.8,
    shared: float = 0.3,
    own: float = 0.3,
    only_one: bool = False,
    repeats: int = 400,
    draws: int = 500,
    alpha: float = ALPHA,
    seed: int = 1,
) -> dict:
    """How often :func:`lead_test`'s rule lets the best of ``trials`` lead a probe of ``accuracy`` on
    ``images`` valid images, when every trial (``only_one``: just one) is truly ``advantage`` more accurate.

    Each model is right on an image when ``mu + u + e > 0``: ``u`` (the image's easiness, shared by all),
    ``shared * v`` (shared by the trials only: they are heads on the same features) and ``own * e`` (each
    model's own); the probe's own noise has the variance of both, so with ``advantage`` 0 every model has
    the same accuracy. Returns the share of repetitions where the best trial led, under this rule and
    under the one-standard-error rule it replaced, and the mean share of images where a trial and the probe
    disagree. Vectorised: the repetitions share the rule's bootstrap draws, as one search's calls would."""
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    scale = math.sqrt(1 + shared**2 + own**2)
    mu_probe = norm.ppf(accuracy) * scale
    mu = np.full(trials, norm.ppf(accuracy + advantage) * scale)
    if only_one:
        mu[1:] = mu_probe
    u = rng.standard_normal((repeats, 1, images))
    v = rng.standard_normal((repeats, 1, images))
    right = mu[:, None] + u + shared * v + own * rng.standard_normal((repeats, trials, images)) > 0  # (R, K, N)
    probe = mu_probe + u[:, 0] + math.hypot(shared, own) * rng.standard_normal((repeats, images)) > 0  # (R, N)
    acc = right.mean(-1)
    order = np.argsort(-acc, axis=1, kind="stable")  # the best trial first, as the search ranks them
    right = np.take_along_axis(right, order[..., None], axis=1).astype(np.float64)
    _, p = selection_pvalue(right[..., None], probe[..., None].astype(np.float64), "acc", draws=draws)
    d = right[:, 0] - probe  # the best trial against the probe, per image
    se = d.std(-1, ddof=1) / math.sqrt(images)
    return {
        "lead_rate": float((p <= alpha).mean()),
        "one_se_rate": float((d.mean(-1) > se).mean()),
        "disagreement": float(np.abs(right - probe[:, None]).mean()),
        "advantage": advantage,
        "trials": trials,
        "images": images,
        "accuracy": accuracy,
        "shared": shared,
        "own": own,
        "only_one": only_one,
        "repeats": repeats,
        "draws": draws,
        "alpha": alpha,
    }


# ---------------------------------------------------------------------------------- test intervals
def bootstrap_interval(
    logits, targets, metric: str, *, level: float = 0.95, draws: int = DRAWS, seed: int = SEED
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric`` (e.g. macro-F1, which has no closed form) over the images."""
    boot = resampled_scores(score_terms(logits, targets, metric), metric, draws=draws, seed=seed)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mcnemar(a_logits, b_logits, targets) -> dict:
    """The exact McNemar test of two models on the same images: ``a_only`` images only ``a`` gets right,
    ``b_only`` only ``b``; the two-sided p-value of the binomial sign test on those discordant images."""
    from scipy.stats import binomtest

    y = np.asarray(targets, dtype=np.int64)
    ra = np.asarray(a_logits).argmax(1) == y
    rb = np.asarray(b_logits).argmax(1) == y
    a_only, b_only = int((ra & ~rb).sum()), int((rb & ~ra).sum())
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": float(p), "count": len(y)}
