"""The data audit, on the features a search already has: leaked near-copies and likely label errors.

**Leakage.** A valid or test image whose nearest train image is a near-copy of it (the same photo
flipped, cropped, moved, brightened or re-encoded) inflates the score it is part of. The grouping in
``prepare`` looks at pixels; this looks at the bank's un-augmented view (view 0): the cosine similarity of
the pooled features, centred on the train mean. What counts as "near-identical" differs between backbones
and weights, so the threshold is calibrated at run time on the user's own train images
(:func:`calibrate`): copies of a sample of them are made (:data:`COPY_KINDS`), their similarity to their
source is measured against each train image's similarity to its nearest *other* train image (another
group), and the threshold is set between the two (:func:`choose_threshold`).

**Label errors.** Confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating
Uncertainty in Dataset Labels", JAIR 70, 2021), with cleanlab's defaults (``find_label_issues``:
``filter_by="prune_by_noise_rate"``): per-class thresholds (the mean out-of-fold probability of the class
among images labelled with it), the calibrated confident joint of given and likely true labels, and for
each off-diagonal count of the joint that many images of the given class with the largest margin
``p(other) - p(given)``. The probabilities are the linear probe's, out of fold (K-fold CV on the bank's
train+valid images), so no image is scored by a model that saw its label. Ranked by the out-of-fold
probability of the given label, lowest first.

No Ray here: plain functions on numpy arrays, and the passes that need the backbone (:func:`calibrate`;
the test images' features come from the search's scoring pass when the backbone takes the scored model's
input, :func:`feature_network`, else from a pass of their own in :func:`audit_test`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .. import UserError
from ..features.bank import FeatureBank, FeatureSpec, SplitFeatures
from ..features.model import ResolvedWeights

log = logging.getLogger(__name__)

LEAKAGE_FILE = "leakage.csv"
LABEL_ISSUES_FILE = "label_issues.csv"
AUDIT_FILE = "audit.json"
LEAKAGE_COLUMNS = ("split", "path", "label", "train_path", "train_label", "similarity", "rank")
ISSUE_COLUMNS = ("path", "split", "given_label", "suggested_label", "label_quality", "suggested_prob")

# The copies planted to calibrate the threshold: the kinds near-copies come in (tune_rice.data.demo.copy_image).
COPY_KINDS = ("jpeg", "brightness", "crop", "shift", "flip")
CALIBRATION_SOURCES = 16  # train images copied (each once per kind: 80 copies)
NEIGHBOURS = 3  # train neighbours kept per valid/test image
DISTINCT_QUANTILE = 0.99  # the threshold stays above this share of distinct images' nearest similarity
COPY_QUANTILE = 0.05  # ... and is set midway to this quantile of the copies' when the two are apart
UNKNOWN_COPIES = 0.02  # at most this share of train images' nearest pairs is set aside as unknown copies
AUDIT_FOLDS = 5  # folds of the out-of-fold probabilities when the search itself does not cross-validate
DISTINCT_SAMPLE = 4000  # train images whose nearest other-group neighbour is measured (all, up to this)


# ------------------------------------------------------------------------------------------ neighbours
def centred_unit(x: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """Rows of ``x`` (N, D) minus ``mean`` (D,), scaled to unit length (float32)."""
    x = np.asarray(x, dtype=np.float32)
    if mean is not None:
        x = x - np.asarray(mean, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def nearest(
    query: np.ndarray,
    reference: np.ndarray,
    *,
    k: int = 1,
    query_groups: Sequence | None = None,
    reference_groups: Sequence | None = None,
    chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar rows of ``reference`` for each row of ``query`` (both unit rows, (N, D) and
    (M, D)): ``(similarity (N, k), index (N, k))``, most similar first. With groups, a reference row of
    the query's own group is never a neighbour (an image and its known copies)."""
    k = min(k, len(reference))
    sims = np.empty((len(query), k), dtype=np.float32)
    index = np.empty((len(query), k), dtype=np.int64)
    ref = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
    if query_groups is not None and reference_groups is not None:
        codes = {g: i for i, g in enumerate(dict.fromkeys([*reference_groups, *query_groups]))}
        qg = np.asarray([codes[g] for g in query_groups])
        rg = torch.from_numpy(np.asarray([codes[g] for g in reference_groups]))
    for start in range(0, len(query), chunk):
        q = torch.from_numpy(np.ascontiguousarray(query[start : start + chunk], dtype=np.float32))
        s = q @ ref.T  # (n, M)
        if query_groups is not None and reference_groups is not None:
            same = torch.from_numpy(qg[start : start + chunk])[:, None] == rg[None, :]
            s = s.masked_fill(same, -np.inf)
        top = torch.topk(s, k, dim=1)
        sims[start : start + len(q)] = top.values.numpy()
        index[start : start + len(q)] = top.indices.numpy()
    return sims, index


# ------------------------------------------------------------------------------------------ calibration
@dataclass
class Calibration:
    """The leakage threshold of one backbone and weights, and what it was set from: the similarity of
    each planted copy to its source (``copies``, with its ``kinds``) and of train images to their
    nearest train image in another group (``distinct``)."""

    threshold: float
    copies: np.ndarray
    kinds: list[str]
    distinct: np.ndarray
    seconds: float = 0.0

    @property
    def recall(self) -> float:
        """Share of the planted copies at or above the threshold."""
        return float(np.mean(self.copies >= self.threshold)) if len(self.copies) else float("nan")

    @property
    def false_alarms(self) -> float:
        """Share of distinct train images whose nearest other-group image is at or above the threshold."""
        return float(np.mean(self.distinct >= self.threshold)) if len(self.distinct) else float("nan")

    def recall_by_kind(self) -> dict[str, float]:
        kinds = np.asarray(self.kinds)
        return {k: float(np.mean(self.copies[kinds == k] >= self.threshold)) for k in dict.fromkeys(self.kinds)}

    def to_dict(self) -> dict:
        q = [0.0, 0.05, 0.5, 0.95, 1.0]
        return {
            "threshold": self.threshold,
            "recall": self.recall,
            "false_alarms": self.false_alarms,
            "recall_by_kind": self.recall_by_kind(),
            "copies": len(self.copies),
            "distinct": len(self.distinct),
            "copy_quantiles": dict(zip(map(str, q), np.quantile(self.copies, q).round(4).tolist())),
            "distinct_quantiles": dict(zip(map(str, q), np.quantile(self.distinct, q).round(4).tolist())),
            "seconds": self.seconds,
        }


def choose_threshold(copies: np.ndarray, distinct: np.ndarray) -> float:
    """Above the ``DISTINCT_QUANTILE`` of the distinct images' nearest similarity (few false alarms);
    midway between it and the copies' ``COPY_QUANTILE`` when the two are apart. When they overlap (a
    backbone whose features do not tell copies from look-alikes), recall is what is lost, and the
    calibration record says so.

    Train may hold copies its grouping did not join (``--dedup off``, or missed): their pairs sit among
    the "distinct" ones and would lift the threshold to their own similarity. A distinct pair more similar
    than half the planted copies is taken for one of them and left out, up to ``UNKNOWN_COPIES`` of the
    pairs (beyond that the features do not separate copies from look-alikes, and the pairs stay)."""
    distinct = np.sort(np.asarray(distinct, dtype=np.float64))
    if len(copies) and len(distinct):
        likely = int((distinct >= np.median(copies)).sum())
        distinct = distinct[: len(distinct) - min(likely, int(np.ceil(UNKNOWN_COPIES * len(distinct))))]
    high = float(np.quantile(distinct, DISTINCT_QUANTILE)) if len(distinct) else 0.0
    low = float(np.quantile(copies, COPY_QUANTILE)) if len(copies) else 1.0
    return max(high, (high + low) / 2)


def planted_copies(images: Sequence[Image.Image], *, kinds: Sequence[str] = COPY_KINDS, seed: int = 0):
    """Copies of each image, one per kind: ``[(source index, kind, copy)]`` (decoded JPEGs, as a copy
    on disk would be read)."""
    from ..data.demo import copy_image

    rng = np.random.default_rng(seed)
    out = []
    for i, im in enumerate(images):
        for kind in kinds:
            data, _ = copy_image(im, kind, rng)
            with Image.open(io.BytesIO(data)) as opened:
                out.append((i, kind, opened.convert("RGB")))
    return out


Embed = Callable[[Sequence[Image.Image]], np.ndarray]


def image_embedder(spec: FeatureSpec, weights, *, device="auto", batch_size: int = 32) -> Embed:
    """PIL images -> the backbone's features (N, D) float32, through the un-augmented view of ``spec``
    (the transform of a bank's view 0)."""
    from ..data.images import build_transform
    from ..devices import resolve_device
    from ..features.model import build_backbone

    dev = resolve_device(device)
    backbone, _ = build_backbone(spec.backbone, weights=weights, seed=spec.seed, feature_layer=spec.feature_layer)
    backbone = backbone.to(dev)
    tf = build_transform(spec.preprocessing, train=False)

    @torch.inference_mode()
    def embed(images: Sequence[Image.Image]) -> np.ndarray:
        out = [
            backbone(torch.stack([tf(im) for im in images[i : i + batch_size]]).to(dev)).float().cpu().numpy()
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, backbone.out_dim), dtype=np.float32)

    return embed


def calibrate(
    train: np.ndarray,
    groups: Sequence,
    images: Callable[[Sequence[int]], list[Image.Image]],
    embed: Embed,
    *,
    mean: np.ndarray | None,
    sources: int = CALIBRATION_SOURCES,
    kinds: Sequence[str] = COPY_KINDS,
    seed: int = 0,
) -> Calibration:
    """The leakage threshold for one backbone, on the user's train images: ``train`` (N, D) their
    un-augmented features, ``groups`` their labels.csv groups, ``images(indices)`` decodes some of them,
    ``embed`` runs the backbone. Copies of ``sources`` of them (one per kind) are compared with their
    own features; every train image (up to ``DISTINCT_SAMPLE``) gives its nearest other-group similarity."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    n = len(train)
    picked = np.sort(rng.choice(n, size=min(sources, n), replace=False))
    copies = planted_copies(images(picked.tolist()), kinds=kinds, seed=seed)
    ref = centred_unit(train, mean)
    # a source's own features are its bank row: the same decode, transform and backbone as embed's
    cop = centred_unit(embed([c for _, _, c in copies]), mean)
    copy_sims = np.einsum("nd,nd->n", cop, ref[picked[[i for i, _, _ in copies]]])
    sample = np.sort(rng.choice(n, size=min(DISTINCT_SAMPLE, n), replace=False))
    g = list(groups)
    distinct, _ = nearest(ref[sample], ref, query_groups=[g[i] for i in sample], reference_groups=g)
    distinct = distinct[:, 0]
    distinct = distinct[np.isfinite(distinct)]  # an image whose group is all of train has no other
    threshold = choose_threshold(copy_sims, distinct)
    return Calibration(threshold, copy_sims, [k for _, k, _ in copies], distinct, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------ leakage
def find_leaks(
    query: np.ndarray,
    train: np.ndarray,
    *,
    threshold: float,
    split: str,
    query_paths: Sequence[str],
    query_labels: Sequence[str],
    train_paths: Sequence[str],
    train_labels: Sequence[str],
    k: int = NEIGHBOURS,
) -> pd.DataFrame:
    """leakage.csv's rows for ``split``: each query image's train neighbours (of its ``k`` nearest) at
    or above ``threshold``; ``query`` and ``train`` are unit rows (:func:`centred_unit`). Most similar
    first."""
    sims, index = nearest(query, train, k=k)
    rows = [
        {
            "split": split,
            "path": query_paths[q],
            "label": query_labels[q],
            "train_path": train_paths[index[q, r]],
            "train_label": train_labels[index[q, r]],
            "similarity": round(float(sims[q, r]), 5),
            "rank": r + 1,
        }
        for q, r in zip(*np.nonzero(sims >= threshold))
    ]
    frame = pd.DataFrame(rows, columns=list(LEAKAGE_COLUMNS))
    return frame.sort_values(["similarity", "path"], ascending=[False, True], kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------ label errors
def confident_thresholds(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per class, the mean probability of the class among the images labelled with it (2 for a class
    without images: nothing is confidently of it)."""
    k = probs.shape[1]
    t = np.array([probs[labels == c, c].mean() if np.any(labels == c) else 2.0 for c in range(k)])
    return np.clip(t, 2e-6, None)


def _round_preserving_sum(row: np.ndarray) -> np.ndarray:
    """Round ``row`` to integers with the same (rounded) total: the largest remainders go up."""
    ints = row.round()
    total = round(float(row.sum()))
    while abs(ints.sum() - total) > 1e-6:
        step = 1 if total > ints.sum() else -1
        changes = min(int(abs(total - ints.sum())), len(row))
        for i in np.argsort(row - ints)[::-step][:changes]:
            ints[i] += step
    return ints.astype(int)


def confident_joint(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(K, K) counts: rows the given label, columns the label the probabilities confidently say,
    calibrated so that rows sum to the class counts and the whole to the number of images."""
    labels = np.asarray(labels)
    k = probs.shape[1]
    above = probs >= confident_thresholds(labels, probs) - 1e-6
    n_above = above.sum(1)
    guess = np.where(n_above > 1, probs.argmax(1), above.argmax(1))
    keep = n_above > 0
    by_guess = np.zeros((k, k), dtype=np.int64)  # rows: the confident guess; columns: the given label
    np.add.at(by_guess, (guess[keep], labels[keep]), 1)
    joint = by_guess.T  # (a transposed view, as cleanlab's: the float sums below then agree to the last bit)
    np.fill_diagonal(joint, joint.diagonal().clip(min=1))
    counts = np.bincount(labels, minlength=k)
    cal = (joint.T / np.clip(joint.sum(1), 1e-100, None) * counts).T
    cal = cal / np.clip(cal.sum(), 1e-100, None) * counts.sum()
    return np.stack([_round_preserving_sum(r) for r in cal])


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Boolean mask of likely label errors (confident learning, prune by noise rate, as cleanlab's
    ``find_label_issues`` with its defaults). ``probs`` (N, K) must be out-of-sample."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    prune = confident_joint(labels, probs).T.astype(np.float64)  # (guess, given)
    # At least one image of each class is kept: the diagonal is raised to 1, taken evenly from the rest.
    diag = np.diagonal(prune).copy()
    raised = np.maximum(diag, 1)
    others = np.maximum(np.count_nonzero(prune, axis=0) - 1.0, 1.0)
    prune = prune - (raised - diag) / others
    prune[prune < 0] = 0
    np.fill_diagonal(prune, raised)
    prune = prune.astype(int)
    mask = np.zeros(len(labels), dtype=bool)
    for c in range(probs.shape[1]):
        rows = np.flatnonzero(labels == c)
        if len(rows) <= 1:
            continue
        p = probs[rows]
        flagged = np.zeros(len(rows), dtype=bool)
        for j in range(probs.shape[1]):
            if j != c and prune[j, c] > 0:
                flagged[np.argsort(-(p[:, j] - p[:, c]))[: prune[j, c]]] = True
        mask[rows] = flagged
    nudged = probs.copy()
    nudged[np.arange(len(labels)), labels] += 1e-6
    mask[nudged.argmax(1) == labels] = False  # the model agrees with the given label
    return mask


def label_issue_table(
    labels: np.ndarray, probs: np.ndarray, *, paths: Sequence[str], splits: Sequence[str], classes: Sequence[str]
) -> pd.DataFrame:
    """label_issues.csv: the flagged images, the likeliest errors first (lowest probability of the given
    label), with the label the probabilities suggest."""
    labels = np.asarray(labels, dtype=np.int64)
    mask = find_label_issues(labels, probs)
    idx = np.flatnonzero(mask)
    quality = probs[np.arange(len(labels)), labels]
    idx = idx[np.argsort(quality[idx], kind="stable")].tolist()
    suggested = probs.argmax(1)
    return pd.DataFrame(
        {
            "path": [paths[i] for i in idx],
            "split": [splits[i] for i in idx],
            "given_label": [classes[labels[i]] for i in idx],
            "suggested_label": [classes[suggested[i]] for i in idx],
            "label_quality": np.round(quality[idx], 5),
            "suggested_prob": np.round(probs[idx, suggested[idx]], 5),
        },
        columns=list(ISSUE_COLUMNS),
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


# ------------------------------------------------------------------------------------------ in a search
@dataclass
class DataAudit:
    """What the audit found: the bank it used, the threshold's calibration, the leaks among valid (and
    test, once scored), the likely label errors, and the test accuracy without the leaked images."""

    bank: str
    backbone: str
    weights: str
    calibration: Calibration
    leaks: pd.DataFrame
    issues: pd.DataFrame
    checked: dict[str, int] = field(default_factory=dict)  # images looked at, per split
    label_source: str = ""
    label_checked: int = 0  # train+valid images the label audit looked at
    test: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    data_root: str = ""  # where the paths are (the report's gallery reads the images)
    # what the test pass needs: the bank's un-augmented view (train) and the backbone's resolved weights
    source: FeatureBank | None = field(default=None, repr=False)
    resolved: ResolvedWeights | None = field(default=None, repr=False)

    def record(self) -> dict:
        leaked = {s: int(self.leaks.loc[self.leaks["split"] == s, "path"].nunique()) for s in self.checked}
        return {
            "bank": self.bank,
            "backbone": self.backbone,
            "weights": self.weights,
            "calibration": self.calibration.to_dict(),
            "checked": self.checked,
            "leaked": leaked,
            "label_issues": len(self.issues),
            "label_checked": self.label_checked,
            "label_source": self.label_source,
            "test": self.test,
            "seconds": self.seconds,
            "data_root": self.data_root,
        }


def first_view(bank: FeatureBank) -> FeatureBank:
    """``bank`` with only its un-augmented view (view 0) of each split: what the audit reads."""
    splits = {
        s: SplitFeatures(np.ascontiguousarray(sf.features[:, :1]), sf.targets, sf.paths)
        for s, sf in bank.splits.items()
    }
    return dataclasses.replace(bank, splits=splits)


def audit_bank(baseline_banks: dict[str, FeatureBank]) -> str:
    """The bank the audit reads: the first with pooled features (cosine on a penultimate layer), else the first."""
    names = list(baseline_banks)
    return next((n for n in names if baseline_banks[n].spec.feature_layer == "pooled"), names[0])


def audit_before_trials(
    table,
    bank: FeatureBank,
    weights,
    *,
    oof_logits: np.ndarray | None = None,
    probe_C: float | None = None,
    seed: int = 0,
    device="auto",
    sources: int = CALIBRATION_SOURCES,
) -> DataAudit:
    """The audit of train and valid on ``bank``: the threshold calibrated on planted copies of train
    images, the valid images' train neighbours above it, and the likely label errors among train+valid
    from out-of-fold probe probabilities (``oof_logits`` of a cross-validated search, else a K-fold probe
    at ``probe_C`` fitted here)."""
    from ..data.images import load_image

    seconds = {}
    t0 = time.perf_counter()
    train, valid = bank.splits["train"], bank.splits["valid"]
    group_of = dict(zip(table.frame["path"], table.frame["group"]))
    embed = image_embedder(bank.spec, weights, device=device)
    train_x = train.features[:, 0].astype(np.float32)
    cal = calibrate(
        train_x,
        [group_of.get(p, p) for p in train.paths],
        lambda idx: [load_image(table.root / train.paths[i]) for i in idx],
        embed,
        mean=bank.mean,
        sources=sources,
        seed=seed,
    )
    seconds["calibrate"] = cal.seconds
    t = time.perf_counter()
    classes = list(bank.classes)
    leaks = find_leaks(
        centred_unit(valid.features[:, 0], bank.mean),
        centred_unit(train_x, bank.mean),
        threshold=cal.threshold,
        split="valid",
        query_paths=valid.paths,
        query_labels=[classes[c] for c in valid.targets],
        train_paths=train.paths,
        train_labels=[classes[c] for c in train.targets],
    )
    seconds["leakage"] = time.perf_counter() - t
    t = time.perf_counter()
    issues, source = _label_issues(bank, group_of, oof_logits, probe_C, seed)
    seconds["label_issues"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    audit = DataAudit(
        bank=bank.spec.name,
        backbone=bank.spec.backbone,
        weights=bank.weights,
        calibration=cal,
        leaks=leaks,
        issues=issues,
        checked={"valid": len(valid)},
        label_source=source,
        label_checked=0 if source.startswith("not searched") else len(train) + len(valid),
        seconds=seconds,
        data_root=str(table.root),
        source=first_view(bank),
        resolved=weights,
    )
    log.info(
        "data audit on %s: leakage threshold %.4f (planted copies found %.0f%%, distinct images above it %.1f%%); "
        "%d of %d valid images are near-copies of train images; %d likely label errors (%s)",
        bank.spec.name,
        cal.threshold,
        100 * cal.recall,
        100 * cal.false_alarms,
        leaks["path"].nunique(),
        len(valid),
        len(issues),
        source,
    )
    return audit


def _label_issues(
    bank: FeatureBank, group_of: dict, oof_logits: np.ndarray | None, probe_C: float | None, seed: int
) -> tuple[pd.DataFrame, str]:
    from .cv import bank_folds, pooled_view0
    from .probe import probe_bank_cv

    _, y = pooled_view0(bank)
    if oof_logits is None:
        try:
            folds = bank_folds(bank, group_of, AUDIT_FOLDS, seed=seed)
        except UserError as e:
            log.warning("likely label errors not searched: %s", e)
            return pd.DataFrame(columns=list(ISSUE_COLUMNS)), f"not searched: {e}"
        cs = (probe_C,) if probe_C is not None else (1.0,)
        oof_logits = probe_bank_cv(bank, folds, Cs=cs).oof_logits
        source = f"linear probe, {AUDIT_FOLDS}-fold out-of-fold probabilities, C={cs[0]:g}"
    else:
        source = "linear probe, the search's cross-validation folds, out-of-fold probabilities"
    paths = list(bank.splits["train"].paths) + list(bank.splits["valid"].paths)
    splits = ["train"] * len(bank.splits["train"]) + ["valid"] * len(bank.splits["valid"])
    probs = softmax(np.asarray(oof_logits))
    return label_issue_table(y, probs, paths=paths, splits=splits, classes=list(bank.classes)), source


def feature_network(audit: DataAudit | None, preprocessing) -> torch.nn.Module | None:
    """The audit's backbone (its bank's view 0) when it takes ``preprocessing`` (the scored model's
    input): then the test pass gives the test images' features from its own decode. None otherwise."""
    if audit is None or audit.source is None or audit.resolved is None:
        return None
    if audit.source.spec.preprocessing != preprocessing:
        return None
    from ..features.model import build_backbone

    spec = audit.source.spec
    return build_backbone(spec.backbone, weights=audit.resolved, seed=spec.seed, feature_layer=spec.feature_layer)[0]


def audit_test(
    audit: DataAudit,
    table,
    *,
    predictions: np.ndarray | None,
    features: np.ndarray | None = None,
    device="auto",
) -> DataAudit:
    """The test images' train neighbours above the calibrated threshold, and the deployed model's test
    accuracy without the leaked ones (``predictions``: its class per test image, in labels.csv order).
    ``features``: the test images' view-0 features from the scoring pass (:func:`feature_network`);
    without them, one more pass of the audit's backbone over the test images."""
    t0 = time.perf_counter()
    bank = audit.source
    if bank is None:
        raise ValueError("this audit holds no bank to compare the test images with")
    test = table.split("test")
    spec = dataclasses.replace(bank.spec, views=1)
    if features is not None:
        test_x = np.asarray(features, dtype=np.float32)
    else:
        test_x = _test_features(table, spec, audit.resolved, len(test), device)
    train = bank.splits["train"]
    classes = list(bank.classes)
    leaks = find_leaks(
        centred_unit(test_x, bank.mean),
        centred_unit(train.features[:, 0], bank.mean),
        threshold=audit.calibration.threshold,
        split="test",
        query_paths=list(test["path"]),
        query_labels=list(test["label"]),
        train_paths=train.paths,
        train_labels=[classes[c] for c in train.targets],
    )
    audit.leaks = pd.concat([audit.leaks[audit.leaks["split"] != "test"], leaks], ignore_index=True)
    audit.checked["test"] = len(test)
    leaked = set(leaks["path"])
    record: dict = {"leaked": len(leaked), "count": len(test)}
    if predictions is not None:
        keep = ~test["path"].isin(leaked).to_numpy()
        correct = np.asarray(predictions) == table.targets("test")
        record["accuracy"] = float(correct.mean())
        record["accuracy_without_leaked"] = float(correct[keep].mean()) if keep.any() else float("nan")
        record["count_without_leaked"] = int(keep.sum())
    audit.test = record
    audit.seconds["test"] = time.perf_counter() - t0
    return audit


def _test_features(table, spec: FeatureSpec, weights, n: int, device) -> np.ndarray:
    """The test images' view-0 features (n, D) from a pass of their own (when the scoring pass could
    not give them: the audit's backbone takes another input than the scored model)."""
    from ..devices import default_num_workers
    from ..features.bank import extract_pass_shard

    feats = extract_pass_shard(
        table,
        [spec],
        {spec: weights},
        "test",
        0,
        n,
        device=device,
        num_workers=default_num_workers(4, batches=n // 64),  # none for less than a batch
    )
    return next(iter(feats.values()))[:, 0].astype(np.float32)


# ------------------------------------------------------------------------------------------ files
def write_audit(folder: Path, audit: DataAudit) -> None:
    """leakage.csv, label_issues.csv and audit.json in the experiment folder."""
    folder = Path(folder)
    audit.leaks.to_csv(folder / LEAKAGE_FILE, index=False)
    audit.issues.to_csv(folder / LABEL_ISSUES_FILE, index=False)
    (folder / AUDIT_FILE).write_text(json.dumps(audit.record(), indent=1))


@dataclass
class AuditFiles:
    """The audit as the files hold it (what the report reads)."""

    record: dict
    leaks: pd.DataFrame
    issues: pd.DataFrame


def read_audit(folder: Path) -> AuditFiles | None:
    """The audit files of an experiment folder, or None when it has none (an older experiment)."""
    folder = Path(folder)
    if not (folder / AUDIT_FILE).is_file():
        return None
    leaks = (
        pd.read_csv(folder / LEAKAGE_FILE)
        if (folder / LEAKAGE_FILE).is_file()
        else pd.DataFrame(columns=list(LEAKAGE_COLUMNS))
    )
    issues = (
        pd.read_csv(folder / LABEL_ISSUES_FILE)
        if (folder / LABEL_ISSUES_FILE).is_file()
        else pd.DataFrame(columns=list(ISSUE_COLUMNS))
    )
    return AuditFiles(json.loads((folder / AUDIT_FILE).read_text()), leaks, issues)


# ------------------------------------------------------------------------------------------ summary
def summary_lines(record: dict, leaks: pd.DataFrame, issues: pd.DataFrame) -> list[str]:
    """The console summary's lines: leaked images per split with two examples, the test accuracy without
    them, the count of likely label errors with two examples."""
    cal = record["calibration"]
    checked = record.get("checked", {})
    counts = ", ".join(f"{record['leaked'].get(s, 0)} of {n} {s}" for s, n in checked.items())
    lines = [
        f"data audit ({record['backbone']} features): {counts} images have a near-copy in train "
        f"(cosine >= {cal['threshold']:.3f}, calibrated on planted copies: {100 * cal['recall']:.0f}% of them "
        f"found, {100 * cal['false_alarms']:.1f}% of distinct images above it); list in {LEAKAGE_FILE}"
    ]
    for _, r in leaks.drop_duplicates("path").head(2).iterrows():
        lines.append(f"  e.g. {r['split']} {r['path']} ~ train {r['train_path']} (cosine {r['similarity']:.3f})")
    test = record.get("test") or {}
    if "accuracy_without_leaked" in test and test.get("leaked"):
        lines.append(
            f"  test accuracy without the {test['leaked']} leaked test image{'' if test['leaked'] == 1 else 's'}: "
            f"{test['accuracy_without_leaked']:.4f} on {test['count_without_leaked']} (all: {test['accuracy']:.4f})"
        )
    lines.append(
        f"likely label errors: {record['label_issues']} of {record.get('label_checked', '?')} train+valid images "
        f"(confident learning on out-of-fold probe probabilities); ranked in {LABEL_ISSUES_FILE}"
    )
    for _, r in issues.head(2).iterrows():
        lines.append(
            f"  e.g. {r['path']}: labelled {r['given_label']}, looks like {r['suggested_label']} "
            f"(p(given) {r['label_quality']:.3f})"
        )
    return lines


# ------------------------------------------------------------------------------------------ report
GALLERY_FILE = "label_issues.png"
GALLERY_SIZE = 12  # the likeliest label errors drawn in the report
REPORT_ROWS = 10


def report_section(exp_dir: Path, out: Path) -> list[str]:
    """The report's "Data audit" markdown (and ``label_issues.png`` in ``out``): the leaks with the
    threshold's calibration, the test accuracy without the leaked images, and the likeliest label errors
    as a gallery. One line when the experiment has no audit."""
    (out / GALLERY_FILE).unlink(missing_ok=True)
    md = ["## Data audit", ""]
    files = read_audit(exp_dir)
    if files is None:
        return md + [f"No {AUDIT_FILE} in the experiment: the data audit did not run.", ""]
    rec, leaks, issues = files.record, files.leaks, files.issues
    cal = rec["calibration"]
    checked = ", ".join(f"{rec['leaked'].get(s, 0)} of {n} {s} images" for s, n in rec["checked"].items())
    md += [
        f"**Near-copies of train images** ({rec['backbone']} features, `{LEAKAGE_FILE}`): {checked}. "
        f"A pair counts when the cosine similarity of the un-augmented features (centred on the train mean) "
        f"is at least {cal['threshold']:.4f}: set on {cal['copies']} copies of train images planted at run "
        f"time ({', '.join(cal['recall_by_kind'])}), of which {100 * cal['recall']:.0f}% reach it, against "
        f"{cal['distinct']} train images' nearest image of another group, {100 * cal['false_alarms']:.1f}% of "
        "which reach it.",
        "",
    ]
    if str(rec.get("weights", "")).startswith("random:"):
        md += [
            "The backbone is randomly initialised: its features find re-encoded copies and little else, and the "
            "label errors below are mostly images the probe gets wrong (BENCHMARKS.md, section 11).",
            "",
        ]
    test = rec.get("test") or {}
    if "accuracy_without_leaked" in test:
        md += [
            f"Test accuracy of the deployed model: {test['accuracy']:.4f} on {test['count']} images; without the "
            f"{test['leaked']} leaked ones {test['accuracy_without_leaked']:.4f} on {test['count_without_leaked']}.",
            "",
        ]
    if len(leaks):
        shown = leaks.drop_duplicates("path").head(REPORT_ROWS)[["split", "path", "train_path", "similarity"]]
        md += [_table(shown), ""]
    md += [
        f"**Likely label errors** (`{LABEL_ISSUES_FILE}`): {rec['label_issues']} of {rec.get('label_checked', '?')} "
        "train and valid images, by "
        f"confident learning on out-of-fold probabilities ({rec.get('label_source', '')}), the lowest "
        "probability of the given label first. Check them by eye: some are ambiguous images, not errors.",
        "",
    ]
    if len(issues):
        root = Path(rec.get("data_root") or ".")
        try:
            gallery_figure(issues.head(GALLERY_SIZE), root).savefig(out / GALLERY_FILE)
            md += [f"![the likeliest label errors]({GALLERY_FILE})", ""]
        except Exception as e:  # noqa: BLE001 - an unreadable image costs the gallery, not the report
            log.warning("label-error gallery not drawn (%s: %s)", type(e).__name__, e)
            md += [f"(the gallery could not be drawn: {type(e).__name__}: {e})", ""]
        md += [_table(issues.head(REPORT_ROWS)), ""]
    return md


def _table(frame: pd.DataFrame) -> str:
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = [
        "| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else f"`{v}`" for v in r) + " |"
        for r in frame.itertuples(index=False)
    ]
    return "\n".join([head, rule, *rows])


def gallery_figure(issues: pd.DataFrame, root: Path):
    """The images of ``issues`` in a grid, each titled with its given and suggested label."""
    from matplotlib.figure import Figure

    from ..data.images import load_image

    cols = min(6, len(issues))
    rows = -(-len(issues) // cols)
    fig = Figure(figsize=(2.0 * cols, 2.3 * rows), layout="constrained", dpi=110)
    for i, r in enumerate(issues.itertuples(index=False)):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = load_image(root / r.path)
        image.thumbnail((160, 160))
        ax.imshow(image)
        ax.set_title(f"labelled {r.given_label}\nlooks {r.suggested_label} (p {r.suggested_prob:.2f})", fontsize=8)
        ax.set_xlabel(Path(r.path).name, fontsize=6)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig
