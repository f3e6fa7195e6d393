"""The lead rule's error rates by simulation, its edge cases, and the scores and intervals against
scikit-learn and scipy."""

from __future__ import annotations

import numpy as np
import pytest

from tune_rice.heads import stats


def _right_wrong(pattern, c=3):
    """Logits (N, c) for targets 0: right (class 0 on top) where ``pattern`` is 1, wrong (class 1) where 0."""
    z = np.zeros((len(pattern), c))
    z[np.arange(len(pattern)), np.where(np.asarray(pattern) == 1, 0, 1)] = 2.0
    return z


def _logits(seed=0, n=200, c=5, skip=()):
    """Noisy logits of ``n`` images of ``c`` classes (classes in ``skip`` never occur as targets)."""
    rng = np.random.default_rng(seed)
    keep = [k for k in range(c) if k not in skip]
    y = rng.choice(keep, n)
    return np.eye(c)[y] * 1.5 + rng.normal(0, 1, (n, c)), y


# -------------------------------------------------------------------------------- the lead rule
def test_the_best_of_30_trials_leads_rarely_by_chance_and_a_real_advantage_mostly():
    """With no true difference the best of 30 trials leads at most 10% of the time (the one-standard-
    error rule it replaces: about half the time); every trial truly 5 points better on 300 valid images
    leads at least 80% of the time."""
    null = stats.simulate_lead(advantage=0.0, trials=30, images=300)
    real = stats.simulate_lead(advantage=0.05, trials=30, images=300)
    assert 0.08 < null["disagreement"] < 0.2  # trials and probe disagree on about 1 image in 8
    assert null["lead_rate"] <= 0.10 and null["one_se_rate"] > 0.3
    assert real["lead_rate"] >= 0.80


@pytest.mark.parametrize("n", [40, 95, 126, 300])
def test_a_split_of_b_images_to_none_is_decided_the_same_at_every_size(n):
    """b-0 splits: the exact one-sided sign test says 0.5 ** b; 4-0 (0.0625) never leads, 5-0 always does."""
    y = np.zeros(n, dtype=int)
    probe = _right_wrong([1] * (n // 2) + [0] * (n - n // 2))
    decisions = []
    for b in (1, 2, 4, 5):
        trial = _right_wrong([1] * (n // 2 + b) + [0] * (n - n // 2 - b))
        r = stats.lead_test([trial], probe, y, metric="acc", mode="max")
        assert r["p_value"] >= 0.5**b - 1e-12 and r["advantage"] == pytest.approx(b / n)
        decisions.append(r["clear"])
    assert decisions == [False, False, False, True]


def test_the_rule_counts_the_trials_it_does_not_see():
    logits, y = _logits(1)
    better = np.where(np.eye(5)[y] > 0, logits + 1.0, logits)  # right more often than the reference
    seen = stats.lead_test([better], logits, y, metric="acc", mode="max")
    unseen = stats.lead_test([better], logits, y, metric="acc", mode="max", trials_run=3)
    assert unseen["p_value"] == pytest.approx(min(1.0, max(3 * seen["p_value"], unseen["p_value"])))
    assert unseen["trials"] == 3 and unseen["compared"] == 1


def test_the_studentised_maximum_by_direct_computation():
    """reality_check against a loop over the draws written out."""
    rng = np.random.default_rng(3)
    obs = np.array([0.02, 0.05, -0.01])
    boot = obs + rng.normal(0, [0.01, 0.03, 0.02], (200, 3))
    c = boot - obs
    sd = c.std(0)
    t = obs[1] / sd[1]
    exceed = sum(max(c[b] / sd) >= t for b in range(200))
    assert stats.reality_check(obs, boot, lead=1) == pytest.approx((1 + exceed) / 201)


@pytest.mark.parametrize(
    "metric, mode", [("acc", "max"), ("macro_f1", "max"), ("balanced_acc", "max"), ("loss", "min")]
)
def test_lead_test_resamples_the_metric_itself(metric, mode):
    """The bootstrap of each metric is the metric of the reweighted images: one draw checked by hand."""
    (za, y), (zb, _) = _logits(2), _logits(3)
    terms = stats.score_terms(za, y, metric)
    w = next(stats.bootstrap_weights(len(y), draws=1, seed=7))[0]
    idx = np.repeat(np.arange(len(y)), w.astype(int))  # the resample the weights stand for
    direct = stats.score(za[idx], y[idx], metric)
    assert stats.resampled_scores(terms, metric, draws=1, seed=7)[0] == pytest.approx(direct)
    r = stats.lead_test([za], zb, y, metric=metric, mode=mode)
    sign = 1 if mode == "max" else -1
    assert r["advantage"] == pytest.approx(sign * (stats.score(za, y, metric) - stats.score(zb, y, metric)))


# ----------------------------------------------------------------------------------- the scores
def test_scores_match_scikit_learn_over_all_classes():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss

    logits, y = _logits(4, c=6, skip=(5,))  # class 5 never occurs: it counts 0 in macro-F1 where predicted
    logits[:3, 5] = 9.0  # ... and it is predicted three times
    pred = logits.argmax(1)
    labels = list(range(6))
    assert stats.score(logits, y, "acc") == pytest.approx(accuracy_score(y, pred))
    with pytest.warns(UserWarning):  # scikit-learn warns of the class predicted but absent
        ref = balanced_accuracy_score(y, pred)
    assert stats.score(logits, y, "balanced_acc") == pytest.approx(ref)
    ref_f1 = f1_score(y, pred, labels=labels, average="macro", zero_division=0)
    assert stats.score(logits, y, "macro_f1") == pytest.approx(ref_f1)
    p = np.exp(logits - logits.max(1, keepdims=True))
    assert stats.score(logits, y, "loss") == pytest.approx(log_loss(y, p / p.sum(1, keepdims=True), labels=labels))
    with pytest.raises(Exception, match="valid choices: acc, macro_f1, balanced_acc, loss"):
        stats.score(logits, y, "valid/top5")


# -------------------------------------------------------------------------------- test intervals
def test_mcnemar_is_the_exact_binomial_on_the_discordant_images():
    from scipy.stats import binomtest

    y = np.zeros(30, dtype=int)
    a = _right_wrong([1] * 20 + [0] * 10)
    b = _right_wrong([1] * 12 + [0] * 8 + [1] * 3 + [0] * 7)  # a only on 8 images, b only on 3
    r = stats.mcnemar(a, b, y)
    ra, rb = a.argmax(1) == y, b.argmax(1) == y
    assert r["a_only"] == int((ra & ~rb).sum()) == 8 and r["b_only"] == int((rb & ~ra).sum()) == 3
    assert r["p_value"] == pytest.approx(binomtest(8, 11, 0.5).pvalue)
    assert stats.mcnemar(a, a, y)["p_value"] == 1.0


def test_bootstrap_interval_holds_the_figure_and_narrows_with_more_images():
    small, ys = _logits(5, n=100)
    large, yl = _logits(5, n=1600)
    lo, hi = stats.bootstrap_interval(small, ys, "macro_f1")
    lo2, hi2 = stats.bootstrap_interval(large, yl, "macro_f1")
    assert lo < stats.score(small, ys, "macro_f1") < hi and lo2 < stats.score(large, yl, "macro_f1") < hi2
    assert 2.5 < (hi - lo) / (hi2 - lo2) < 5.5  # the width falls as 1/sqrt(n): 4 expected
