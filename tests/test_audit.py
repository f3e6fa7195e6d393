"""The data audit: confident learning against cleanlab's, planted label flips found, planted copies found
on a dataset prepared with ``--dedup off``, and the files and summary lines it writes."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest

from tune_rice.data import demo, prepare
from tune_rice.data.images import load_image, read_labels
from tune_rice.features.bank import FeatureBank, FeatureSpec, SplitFeatures, extract_banks
from tune_rice.features.model import resolve_weights
from tune_rice.heads import audit


def _noisy_probs(rng, n: int, k: int):
    truth = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k)) + np.eye(k)[truth] * rng.uniform(0.5, 4)
    probs = np.exp(logits)
    probs /= probs.sum(1, keepdims=True)
    given = truth.copy()
    flip = rng.random(n) < rng.uniform(0, 0.3)
    given[flip] = rng.integers(0, k, flip.sum())
    return given, probs


def test_confident_learning_flags_what_cleanlab_flags():
    from cleanlab.count import compute_confident_joint
    from cleanlab.filter import find_label_issues

    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(40):
        given, probs = _noisy_probs(rng, int(rng.integers(20, 300)), int(rng.integers(2, 7)))
        if len(np.unique(given)) < probs.shape[1]:
            continue
        np.testing.assert_array_equal(audit.confident_joint(given, probs), compute_confident_joint(given, probs))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cleanlab warns of classes with few examples
            expected = find_label_issues(given, probs, n_jobs=1)
        np.testing.assert_array_equal(audit.find_label_issues(given, probs), expected)
        compared += 1
    assert compared >= 25


def _bank(x: np.ndarray, y: np.ndarray, n_train: int, classes) -> FeatureBank:
    paths = [f"img_{i:04d}.png" for i in range(len(y))]
    splits = {
        "train": SplitFeatures(x[:n_train, None].astype(np.float16), y[:n_train], paths[:n_train]),
        "valid": SplitFeatures(x[n_train:, None].astype(np.float16), y[n_train:], paths[n_train:]),
    }
    return FeatureBank(
        spec=FeatureSpec(backbone="resnet18", image_size=32, views=1),
        weights="random:seed=0",
        pretrained=False,
        classes=tuple(classes),
        splits=splits,
        mean=x[:n_train].mean(0).astype(np.float32),
        std=x[:n_train].std(0).astype(np.float32),
    )


def test_planted_label_flips_are_found_out_of_fold():
    """5% of 400 labels flipped on features with overlapping classes: the out-of-fold probe's confident
    learning flags most flips and few others (precision and recall at the flagged count)."""
    rng = np.random.default_rng(1)
    k, n, d = 4, 400, 16
    truth = rng.integers(0, k, n)
    centres = rng.normal(0, 1, (k, d)) * 3.0
    x = centres[truth] + rng.normal(0, 1, (n, d))
    given = truth.copy()
    flipped = rng.choice(n, size=n // 20, replace=False)
    given[flipped] = (truth[flipped] + rng.integers(1, k, len(flipped))) % k
    bank = _bank(x, given, 300, ["a", "b", "c", "d"])
    groups = {p: p for s in bank.splits.values() for p in s.paths}
    issues, source = audit._label_issues(bank, groups, None, 1.0, seed=0)
    assert "out-of-fold" in source
    paths = bank.splits["train"].paths + bank.splits["valid"].paths
    planted = {paths[i] for i in flipped}
    found = set(issues["path"])
    precision, recall = len(found & planted) / len(found), len(found & planted) / len(planted)
    assert recall >= 0.8 and precision >= 0.6, (precision, recall)
    # ranked: the lowest out-of-fold probability of the given label first; the suggestion is the truth
    assert issues["label_quality"].is_monotonic_increasing
    truth_of = dict(zip(paths, np.asarray(bank.classes)[truth]))
    hit = issues[issues["path"].isin(planted)]
    assert (hit["suggested_label"] == hit["path"].map(truth_of)).mean() >= 0.9
    assert list(issues.columns) == list(audit.ISSUE_COLUMNS)


def test_threshold_sits_between_copies_and_distinct_images():
    copies = np.array([0.97, 0.98, 0.99, 0.995])
    distinct = np.linspace(0.2, 0.9, 100)
    t = audit.choose_threshold(copies, distinct)
    assert np.quantile(distinct, 0.99) < t < 0.97
    overlapping = audit.choose_threshold(np.linspace(0.5, 0.99, 50), np.linspace(0.1, 0.95, 200))
    assert overlapping >= 0.9  # few false alarms first; recall pays


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    """A demo set prepared with ``--dedup off``, then copies of 8 train images (flip, brightness, shift,
    re-encoding) added to valid and test: the table, each copy's source and kind."""
    root = tmp_path_factory.mktemp("audit") / "data"
    demo.generate_demo(root, per_class=10, size=96, seed=5, family="plain", workers=1)
    result = prepare.prepare_dataset(root, dedup_mode="off", progress=False)
    frame = pd.read_csv(result.labels_csv)
    train = frame[frame["split"] == "train"].reset_index(drop=True)
    rng = np.random.default_rng(0)
    planted, kinds = {}, {}
    rows = []
    for n, i in enumerate(rng.choice(len(train), 8, replace=False)):
        src = train.iloc[i]
        kind = ("jpeg", "brightness", "shift", "jpeg")[n % 4]
        data, _ = demo.copy_image(load_image(root / src["path"]), kind, rng)
        rel = f"{src['label']}/planted_{n}.jpg"
        (root / rel).write_bytes(data)
        rows.append({"path": rel, "label": src["label"], "split": ("valid", "test")[n % 2], "group": f"planted{n}"})
        planted[rel], kinds[rel] = src["path"], kind
    pd.concat([frame, pd.DataFrame(rows)], ignore_index=True).to_csv(result.labels_csv, index=False)
    return read_labels(result.labels_csv), planted, kinds


def test_planted_copies_are_found_with_the_grouping_off(leaky, tmp_path):
    table, planted, kinds = leaky
    spec = FeatureSpec(backbone="resnet18", image_size=64, views=1)
    weights = resolve_weights("resnet18", "none")
    bank = extract_banks(
        table, [spec], weights={"resnet18": weights}, splits=("train", "valid"), cache_dir=tmp_path, progress=False
    )[spec.name]
    result = audit.audit_before_trials(table, bank, weights, sources=12, device="cpu")
    test = table.split("test")
    predictions = table.targets("test").copy()
    wrong = test.index[~test["path"].isin(planted)][:2]
    predictions[wrong] = (predictions[wrong] + 1) % len(table.classes)  # two clean test images predicted wrong
    audit.audit_test(result, table, predictions=predictions, device="cpu")

    pairs = set(zip(result.leaks["path"], result.leaks["train_path"]))
    found = [p for p in planted if (p, planted[p]) in pairs]  # flagged, with its own source
    # random init: every re-encoded copy and most others (a pretrained backbone finds more: BENCHMARKS 11)
    assert {p for p, kind in kinds.items() if kind == "jpeg"} <= set(found), result.calibration.to_dict()
    assert len(found) >= 5, (found, result.calibration.to_dict())
    clean = len(table.split("valid")) + len(test) - len(planted)
    assert len(set(result.leaks["path"]) - set(planted)) <= 0.1 * clean
    # the test pass: accuracy with and without the leaked test images (the two wrong ones are clean)
    rec = result.test
    n_test = len(test)
    assert rec["accuracy"] == pytest.approx((n_test - 2) / n_test)
    assert rec["count_without_leaked"] == n_test - rec["leaked"]
    leaked = test["path"].isin(result.leaks.query("split == 'test'")["path"]).to_numpy()
    assert rec["leaked"] == leaked.sum() >= sum(kinds[p] == "jpeg" for p in planted if p in set(test["path"]))
    correct = predictions == table.targets("test")
    assert rec["accuracy_without_leaked"] == pytest.approx(correct[~leaked].mean())

    audit.write_audit(tmp_path, result)
    files = audit.read_audit(tmp_path)
    assert files is not None and list(files.leaks.columns) == list(audit.LEAKAGE_COLUMNS)
    assert set(files.leaks["split"]) <= {"valid", "test"} and len(files.leaks) == len(result.leaks)
    assert files.record["checked"] == {"valid": len(table.split("valid")), "test": n_test}
    lines = audit.summary_lines(files.record, files.leaks, files.issues)
    assert lines[0].startswith("data audit") and "leakage.csv" in lines[0]
    assert sum(line.startswith("  e.g.") for line in lines) <= 4
    assert any("label_issues.csv" in line for line in lines)
    # the report's section: the counts, the random-init caveat, the gallery of the likeliest label errors
    out = tmp_path / "report"
    out.mkdir()
    md = "\n".join(audit.report_section(tmp_path, out))
    assert "## Data audit" in md and f"{rec['leaked']} of {n_test} test images" in md and "randomly initialised" in md
    assert (out / audit.GALLERY_FILE).is_file() == (len(files.issues) > 0)


def test_first_view_keeps_view_zero():
    x = np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4)
    bank = _bank(np.zeros((4, 4)), np.array([0, 1, 0, 1]), 2, ["a", "b"])
    bank = dataclasses.replace(bank, splits={"train": SplitFeatures(x, np.array([0, 1]), ["p", "q"])})
    view = audit.first_view(bank)
    np.testing.assert_array_equal(view.splits["train"].features, x[:, :1])


def test_unknown_copies_in_train_do_not_lift_the_threshold():
    """Two train pairs that are copies nobody grouped (similarity 0.999) among 200 distinct images: the
    threshold stays where the distinct images put it, not at the unknown copies' similarity."""
    copies = np.linspace(0.95, 0.999, 50)
    distinct = np.concatenate([np.linspace(0.3, 0.8, 198), [0.999, 0.999]])
    assert audit.choose_threshold(copies, distinct) < 0.95
    # but a backbone that cannot tell look-alikes from copies keeps the threshold high
    look_alikes = np.concatenate([np.linspace(0.3, 0.8, 180), np.full(20, 0.99)])
    assert audit.choose_threshold(copies, look_alikes) >= 0.99
