"""The linear-probe baseline on a feature bank (cross-validated on the folds of :mod:`tune_rice.heads.cv`).

The probe is the field's standard yardstick for frozen features: multinomial logistic regression fitted
by full-batch L-BFGS on the un-augmented view of each training image, its L2 strength chosen on valid.
It costs seconds, so every search fits it before its trials and says whether the trials beat it.

The objective is scikit-learn's ``LogisticRegression(C=C)`` (lbfgs, multinomial), minimised by scipy's
L-BFGS (what scikit-learn calls):
``0.5 * ||W||^2 + C * sum_i CE_i``, intercept not penalised, on the features standardised exactly as a
head standardises them, so a fitted probe *is* a linear :class:`~tune_rice.features.model.Head` and can be
deployed like any trial's head.

No Ray here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .. import UserError
from ..features.bank import FeatureBank
from ..features.model import Head, build_head
from ..records import Direction
from .cv import pooled_view0

log = logging.getLogger(__name__)

# Inverse L2 strengths tried, strongest regularisation first (each fit warm-starts the next). On the
# standardised features of the generated sets the chosen C ranged 1e-3 .. 1; weaker ones cost the most
# solver iterations (nearly separable data) and never won.
DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


# ------------------------------------------------------------------------------------------ intervals
def wilson_interval(correct: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``correct / n`` (``correct`` may be fractional, e.g.
    accuracy * n); ``(nan, nan)`` when ``n`` is 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = min(max(correct / n, 0.0), 1.0)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def format_accuracy(acc: float, n: int) -> str:
    """``0.800 on 45 [0.66, 0.89]``: an accuracy with its size and 95% Wilson interval."""
    lo, hi = wilson_interval(acc * n, n)
    return f"{acc:.3f} on {n} [{lo:.2f}, {hi:.2f}]"


# ------------------------------------------------------------------------------------------ the fit
def standardize(head: Head, x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``x`` (N, D) standardised as ``head`` does it (float64 for the solver)."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return ((x - torch.as_tensor(head.mean)) / torch.as_tensor(head.std)).double()


# Below this many multiply-adds per pass (N * D * classes) one thread is faster than several: the work is
# too small to split, and on a busy machine spinning threads slowed such fits tenfold.
ONE_THREAD_BELOW = 50_000_000


def fit_logistic(
    z: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    *,
    C: float,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 500,
    tol: float = 1e-5,
    class_balanced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on ``z`` (N, D), labels ``y`` (N,): minimises
    ``0.5 * ||W||^2 + C * sum CE`` by full-batch L-BFGS (scipy's, as scikit-learn uses; the loss and
    gradient in torch); returns ``(W (C, D), b (C,))`` in float64. ``init`` warm-starts it (the fit at a
    neighbouring C); ``tol`` bounds the gradient of the mean loss. ``class_balanced``: each image's loss
    weighted ``n / (classes * n_class)``, scikit-learn's ``class_weight="balanced"``. Logs a warning when
    L-BFGS stops before converging."""
    from scipy.optimize import minimize

    x = torch.as_tensor(z, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.long)
    n, d = x.shape
    # Scaled by 1/(C n): the same minimiser, and gradients of order 1 for the solver's tolerance.
    l2 = 1.0 / (C * n)
    weight = None
    if class_balanced:  # the weighted mean: sum_i w_i CE_i / sum_i w_i, and sum_i w_i = n for these weights
        counts = torch.bincount(yt, minlength=n_classes).double()
        weight = torch.where(counts > 0, n / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))

    def f(theta):
        t = torch.from_numpy(theta).requires_grad_(True)
        w, b = t[: n_classes * d].view(n_classes, d), t[n_classes * d :]
        loss = F.cross_entropy(x @ w.T + b, yt, weight=weight) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return float(loss.detach()), t.grad.numpy()

    theta0 = (
        np.zeros(n_classes * (d + 1))
        if init is None
        else np.concatenate([np.asarray(init[0], dtype=np.float64).ravel(), np.asarray(init[1], dtype=np.float64)])
    )
    threads = torch.get_num_threads()
    if n * d * n_classes < ONE_THREAD_BELOW:
        torch.set_num_threads(1)
    try:
        res = minimize(f, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": tol})
    finally:
        torch.set_num_threads(threads)
    if not res.success:
        log.warning("linear probe at C=%g: L-BFGS stopped before converging (%s)", C, res.message)
    w, b = res.x[: n_classes * d].reshape(n_classes, d), res.x[n_classes * d :]
    return torch.from_numpy(w.copy()), torch.from_numpy(b.copy())


@dataclass
class ProbeResult:
    """A fitted probe: its linear head (standardisation included), the chosen C and how it was chosen."""

    head: Head
    C: float
    valid: dict  # acc, macro_f1, loss, count for the chosen C (out-of-fold when cross-validated)
    path: list[dict] = field(default_factory=list)  # one row per C tried: C, acc, macro_f1, loss
    seconds: float = 0.0
    folds: int = 0  # 0: C chosen on valid; K: by K-fold cross-validation on train+valid pooled
    oof_logits: np.ndarray | None = None  # (N, C) out-of-fold logits of the chosen C (cross-validated only)
    class_balanced: bool = False  # inverse-frequency class weights in the fit (tried for macro_f1, balanced_acc)
    edge: str | None = None  # "lowest"/"highest": the chosen C is at the end of the grid tried

    def to_dict(self) -> dict:
        return {
            "C": self.C,
            "valid": self.valid,
            "path": self.path,
            "seconds": self.seconds,
            "folds": self.folds,
            "class_balanced": self.class_balanced,
            "edge": self.edge,
        }


@dataclass
class Baseline:
    """The folds of a cross-validated search (None: off) and the linear probe of every bank."""

    folds: np.ndarray | None
    probes: dict[str, ProbeResult]
    banks: dict[str, FeatureBank]  # what the probes were fitted on (the search's banks, or view-0 ones)

    @property
    def k(self) -> int:
        return 0 if self.folds is None else int(self.folds.max()) + 1


def _linear_head(in_dim: int, n_classes: int, mean, std) -> Head:
    head = build_head("pooled", in_dim=in_dim, n_classes=n_classes, hidden=0, dropout=0.0)
    head.set_standardization(mean, std)
    return head.eval()


def _set_weights(head: Head, w: torch.Tensor, b: torch.Tensor) -> Head:
    linear = head.net[-1]
    assert isinstance(linear, torch.nn.Linear)  # a probe's head is linear (hidden 0)
    with torch.no_grad():
        linear.weight.copy_(w.float())
        linear.bias.copy_(b.float())
    return head


def _scores(logits: torch.Tensor, y: np.ndarray, n_classes: int) -> dict:
    from .engine import compute_metrics

    m = compute_metrics(y, logits.argmax(1).numpy(), n_classes)
    loss = float(F.cross_entropy(logits.double(), torch.as_tensor(y, dtype=torch.long)))
    return {
        "acc": m["acc"],
        "macro_f1": m["macro_f1"],
        "balanced_acc": m["balanced_acc"],
        "loss": loss,
        "count": m["count"],
    }


def _chosen(best: dict | None) -> tuple[float, dict]:
    """The C kept and its scores, from the best row of a C path (``{..., "C": C}``)."""
    if best is None:
        raise ValueError("no value of C to try")
    scores = dict(best)
    scores.pop("class_balanced", None)
    return float(scores.pop("C")), scores


def weightings(metric: str) -> tuple[bool, ...]:
    """Class weightings the probe tries: balanced too when the metric weighs every class alike."""
    return (False, True) if metric in ("macro_f1", "balanced_acc") else (False,)


def _edge(C: float, Cs: Sequence[float]) -> str | None:
    """``lowest``/``highest`` when the chosen C is at the end of the grid: a wider grid might do better."""
    if len(Cs) < 2:
        return None
    return "lowest" if C == min(Cs) else "highest" if C == max(Cs) else None


def _log_edge(result: ProbeResult, name: str) -> None:
    if result.edge:
        log.warning(
            "linear probe on %s: C=%g is the %s value tried; the best C may lie beyond it", name, result.C, result.edge
        )


def _better(a: dict, b: dict | None, metric: str) -> bool:
    """``a`` beats ``b`` on ``metric`` (acc / macro_f1 higher, loss lower); ties go to the lower loss, so
    among C values scoring the same on a small valid set the better-calibrated one wins."""
    if b is None:
        return True
    sign = Direction.MIN.sign if metric == "loss" else Direction.MAX.sign
    return (sign * a[metric], -a["loss"]) > (sign * b[metric], -b["loss"])


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    valid_x: np.ndarray,
    valid_y: np.ndarray,
    *,
    n_classes: int,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    metric: str = "acc",
    tol: float = 1e-5,
) -> ProbeResult:
    """Fit the probe on ``train_x`` (N, D) for each C, keep the C that scores best on ``valid_x`` by
    ``metric`` (``acc``, ``macro_f1`` or ``loss``). ``mean``/``std`` standardise the features (default:
    train's own), as :meth:`Head.set_standardization` does for a trained head; ``tol`` as for
    :func:`fit_logistic`."""
    t0 = time.perf_counter()
    train_x = np.asarray(train_x, dtype=np.float32)
    mean = train_x.mean(0) if mean is None else mean
    std = train_x.std(0) if std is None else std
    head = _linear_head(train_x.shape[1], n_classes, mean, std)
    z, zv = standardize(head, train_x), standardize(head, valid_x)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    best: dict | None = None
    fits: dict[tuple[float, bool], tuple[torch.Tensor, torch.Tensor]] = {}
    path: list[dict] = []
    for balanced in weightings(metric):
        init = None
        for C in sorted(Cs):
            init = fits[float(C), balanced] = fit_logistic(
                z, y, n_classes, C=C, init=init, tol=tol, class_balanced=balanced
            )
            scores = _scores((zv @ init[0].T + init[1]).float(), np.asarray(valid_y), n_classes)
            path.append({"C": float(C), "class_balanced": balanced, **scores})
            if _better(scores, best, metric):
                best = {**scores, "C": float(C), "class_balanced": balanced}
    assert best is not None
    balanced = bool(best["class_balanced"])
    C, valid = _chosen(best)
    _set_weights(head, *fits[C, balanced])
    return ProbeResult(
        head=head,
        C=C,
        valid=valid,
        path=path,
        seconds=time.perf_counter() - t0,
        class_balanced=balanced,
        edge=_edge(C, Cs),
    )


def probe_bank(bank: FeatureBank, *, Cs: Sequence[float] = DEFAULT_CS, metric: str = "acc") -> ProbeResult:
    """The probe on ``bank``: trained on train's un-augmented view 0, C chosen on valid, standardised
    with the bank's statistics (the same as every trial's head)."""
    train, valid = bank.splits["train"], bank.splits["valid"]
    result = fit_probe(
        train.features[:, 0],
        train.targets,
        valid.features[:, 0],
        valid.targets,
        n_classes=len(bank.classes),
        mean=bank.mean,
        std=bank.std,
        Cs=Cs,
        metric=metric,
    )
    _log_edge(result, bank.spec.name)
    log.info(
        "linear probe on %s: C=%g, valid acc %s (%.1fs)",
        bank.spec.name,
        result.C,
        format_accuracy(result.valid["acc"], result.valid["count"]),
        result.seconds,
    )
    return result


def probe_bank_cv(
    bank: FeatureBank, folds: np.ndarray, *, Cs: Sequence[float] = DEFAULT_CS, metric: str = "acc"
) -> ProbeResult:
    """The probe with C chosen by K-fold cross-validation on train+valid pooled (``folds``: fold per
    pooled image, see :func:`pooled_view0`), then refitted on all of it: the deployed probe of a
    cross-validated search. Its ``valid`` scores are the out-of-fold predictions of the chosen C."""
    t0 = time.perf_counter()
    x, y = pooled_view0(bank)
    n_classes, k = len(bank.classes), int(folds.max()) + 1
    settings = [(float(C), b) for b in weightings(metric) for C in sorted(Cs)]  # (C, class_balanced)
    oof = {s: torch.zeros(len(y), n_classes) for s in settings}
    for f in range(k):
        tr, va = folds != f, folds == f
        head = _linear_head(x.shape[1], n_classes, x[tr].mean(0), x[tr].std(0))
        z, zv = standardize(head, x[tr]), standardize(head, x[va])
        for balanced in weightings(metric):
            init = None
            for C in sorted(Cs):
                init = fit_logistic(z, torch.as_tensor(y[tr]), n_classes, C=C, init=init, class_balanced=balanced)
                oof[float(C), balanced][torch.as_tensor(np.flatnonzero(va))] = (zv @ init[0].T + init[1]).float()
    best: dict | None = None
    path: list[dict] = []
    for C, balanced in settings:
        scores = _scores(oof[C, balanced], y, n_classes)
        path.append({"C": C, "class_balanced": balanced, **scores})
        if _better(scores, best, metric):
            best = {**scores, "C": C, "class_balanced": balanced}
    assert best is not None
    balanced = bool(best["class_balanced"])
    C, valid = _chosen(best)
    head = _linear_head(x.shape[1], n_classes, x.mean(0), x.std(0))
    w, b = fit_logistic(standardize(head, x), torch.as_tensor(y), n_classes, C=C, class_balanced=balanced)
    _set_weights(head, w, b)
    result = ProbeResult(
        head=head,
        C=C,
        valid=valid,
        path=path,
        seconds=time.perf_counter() - t0,
        folds=k,
        oof_logits=oof[C, balanced].double().numpy(),
        class_balanced=balanced,
        edge=_edge(C, Cs),
    )
    _log_edge(result, bank.spec.name)
    log.info(
        "linear probe on %s, %d-fold CV: C=%g, out-of-fold acc %s (%.1fs)",
        bank.spec.name,
        k,
        C,
        format_accuracy(valid["acc"], valid["count"]),
        result.seconds,
    )
    return result


# ------------------------------------------------------------------------------------------ in a search
PROBE_KIND = "probe"
PROBE_PREFIX = "probe:"  # a probe's name as a candidate and its trial_id in results.csv: probe:<bank>


def probe_id(bank: str) -> str:
    return PROBE_PREFIX + bank


def is_probe_id(name) -> bool:
    """Whether a candidate name or trial_id (final.json, test_metrics.json, results.csv) is a linear probe's."""
    return str(name).startswith(PROBE_PREFIX)


def metric_key(metric: str) -> str:
    """``valid/acc`` -> ``acc``: the probe's score under a search space's metric name."""
    key = metric.split("/", 1)[-1]
    if key not in ("acc", "macro_f1", "balanced_acc", "loss"):
        raise UserError(f"the linear probe is scored by acc, macro_f1, balanced_acc or loss, not {metric!r}")
    return key


def probe_row(name: str, result: ProbeResult, bank: FeatureBank, metric: str) -> dict:
    """The probe's row in results.csv (``kind`` = probe): its valid scores where a trial has its best."""
    v = result.valid
    return {
        "kind": PROBE_KIND,
        "trial_id": probe_id(name),
        "status": "PROBE",
        f"best/{metric}": v[metric_key(metric)],
        "valid_count": v["count"],
        "best/valid/acc": v["acc"],
        "last/valid/acc": v["acc"],
        "last/valid/loss": v["loss"],
        "last/valid/macro_f1": v["macro_f1"],
        "cv_folds": result.folds,
        "seconds": result.seconds,
        "weights": bank.weights,
        "config/C": result.C,
        "config/backbone": bank.spec.backbone,
        "config/image_size": bank.spec.image_size,
        "config/head": bank.spec.feature_layer,
    }


def best_probe(probes: dict[str, ProbeResult], metric: str, mode: str) -> tuple[str, ProbeResult]:
    """The probe (one per bank) with the best valid ``metric``."""
    key = metric_key(metric)
    sign = Direction(mode).sign
    name = max(probes, key=lambda n: sign * probes[n].valid[key])
    return name, probes[name]


def search_beats_probe(lead: dict | None) -> bool:
    """The search's one verdict against the linear probe, from final.json's ``lead`` record
    (``final.lead_index``): its best trial beat the probe on valid by more than picking the best of its
    trials gives by chance. No record (no probe, or no trial to compare): False."""
    return bool((lead or {}).get("clear"))


def probe_verdict(lead: dict | None, *, metric: str) -> str:
    """One plain line: did the search beat the probe on valid, once the pick of its best trial is
    accounted for (``lead``: final.json's record; see :func:`search_beats_probe`)."""
    if not lead or "trial" not in lead:
        return f"the search was not compared with the linear probe on {metric} (no trial and probe on the same input)"
    shown = (
        f"the best trial's {lead['advantage']:+.4g} on {lead['count']} valid images has p = {lead['p_value']:.3g} "
        f"given it was the best of {lead['trials']} trials"
    )
    if search_beats_probe(lead):
        return f"the search beat the linear probe on {metric}: {shown} (<= {lead['alpha']:g})"
    return f"the search did NOT beat the linear probe on {metric}: {shown} (> {lead['alpha']:g}: within chance)"


def write_probe_tensorboard(folder, probes: dict[str, ProbeResult], *, max_epochs: int) -> None:
    """A ``probe`` run beside the trials: each bank's probe valid scores as a flat line over the trials'
    epochs (so it reads as the bar to clear), and its C path as text."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for name, result in probes.items():
        suffix = "" if len(probes) == 1 else f"/{name}"
        for step in sorted({1, max(1, int(max_epochs))}):
            for key in ("acc", "macro_f1", "loss"):
                writer.add_scalar(f"valid/{key}{suffix}", result.valid[key], step)
        rows = "\n".join(
            f"    C={r['C']:g}: acc {r['acc']:.4f}, macro_f1 {r['macro_f1']:.4f}, loss {r['loss']:.4f}"
            for r in result.path
        )
        how = f"{result.folds}-fold CV on train+valid" if result.folds else "valid"
        writer.add_text(f"probe{suffix}", f"linear probe on {name}, C={result.C:g} chosen on {how}\n\n{rows}", 0)
    writer.close()


def fit_probes(
    banks: dict[str, FeatureBank], *, metric: str, folds: np.ndarray | None = None
) -> dict[str, ProbeResult]:
    """The probe on every bank of a search: C chosen on valid, or with ``folds`` (one per pooled
    train+valid image, the same for every bank: they list the same images) by cross-validation and
    refitted on train+valid."""
    key = metric_key(metric)
    out = {}
    for name, bank in banks.items():
        out[name] = probe_bank_cv(bank, folds, metric=key) if folds is not None else probe_bank(bank, metric=key)
    return out
