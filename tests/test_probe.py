"""The linear probe against a direct fit, the fold split against its constraints, and cross-validated
heads (batched) against heads trained one at a time. Feature banks are synthetic or from two generated
image families (no Ray)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_engine import synthetic_bank

from tune_rice import UserError
from tune_rice.features.model import build_head
from tune_rice.heads.cv import CVHeadRun, HeadStack, bank_folds, fold_heads, fold_split, pooled_view0, resolve_folds
from tune_rice.heads.engine import TrialConfig, make_criterion, make_optimizer
from tune_rice.heads.probe import fit_logistic, fit_probe, probe_bank, probe_bank_cv, standardize, wilson_interval


# ------------------------------------------------------------------------------------------ the probe
def test_logistic_fit_matches_scikit_learn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    bank = synthetic_bank(n_train=90, n_valid=30, d=12)
    x, y = bank.splits["train"].features[:, 0].astype(np.float32), bank.splits["train"].targets
    result = fit_probe(x, y, x[:10], y[:10], n_classes=3, Cs=(0.05,), tol=1e-9)
    z = standardize(result.head, x).numpy()
    ref = sklearn.LogisticRegression(C=0.05, tol=1e-10, max_iter=10_000).fit(z, y)
    with torch.no_grad():
        ours = torch.softmax(result.head(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(z), atol=2e-4)
    np.testing.assert_allclose(result.head.net[-1].weight.detach().numpy(), ref.coef_, atol=2e-3)


def test_class_balanced_probe_matches_scikit_learn_and_is_tried_for_macro_f1():
    sklearn = pytest.importorskip("sklearn.linear_model")
    bank = synthetic_bank(n_train=90, n_valid=30, d=12)
    x, y = bank.splits["train"].features[:, 0].astype(np.float32), bank.splits["train"].targets
    keep = (y != 2) | (np.arange(len(y)) % 4 == 0)  # class 2 is a quarter as frequent
    x, y = x[keep], y[keep]
    result = fit_probe(x, y, x[:10], y[:10], n_classes=3, Cs=(0.05,), tol=1e-9, metric="macro_f1")
    assert {r["class_balanced"] for r in result.path} == {False, True}
    from tune_rice.heads.probe import fit_logistic

    z = standardize(result.head, x)
    w, b = fit_logistic(z, torch.as_tensor(y), 3, C=0.05, tol=1e-9, class_balanced=True)
    ref = sklearn.LogisticRegression(C=0.05, tol=1e-10, max_iter=10_000, class_weight="balanced").fit(z.numpy(), y)
    np.testing.assert_allclose(w.numpy(), ref.coef_, atol=2e-3)
    # acc tries the plain fit only; a C at the end of the grid is flagged
    plain = fit_probe(x, y, x[:10], y[:10], n_classes=3, Cs=(1e-3, 1e-2), metric="acc")
    assert {r["class_balanced"] for r in plain.path} == {False} and plain.edge in ("lowest", "highest")
    assert fit_probe(x, y, x[:10], y[:10], n_classes=3, Cs=(0.05,)).edge is None


def test_probe_keeps_the_c_that_scores_best_on_valid():
    bank = synthetic_bank(n_train=60, n_valid=60, d=24)
    result = probe_bank(bank, Cs=(1e-4, 1e-2, 1.0, 100.0))
    accs = {row["C"]: row["acc"] for row in result.path}
    assert result.C in accs and result.valid["acc"] == max(accs.values())
    assert result.valid["count"] == 60
    # the head it returns is the fit at that C, standardised with the bank's statistics
    valid = bank.splits["valid"]
    with torch.no_grad():
        pred = result.head(torch.from_numpy(valid.features[:, 0].astype(np.float32))).argmax(1).numpy()
    assert (pred == valid.targets).mean() == pytest.approx(result.valid["acc"])
    np.testing.assert_allclose(result.head.mean.numpy(), bank.mean, rtol=1e-6)
    assert result.valid["acc"] > 0.8  # well-separated blobs


def test_probe_cv_refits_on_everything():
    bank = synthetic_bank(n_train=60, n_valid=30, d=8)
    folds = (np.arange(90) // 3) % 3  # every class in every fold
    result = probe_bank_cv(bank, folds, Cs=(0.01, 1.0))
    assert result.folds == 3 and result.valid["count"] == 90
    x, y = pooled_view0(bank)
    z = standardize(result.head, x)
    w, b = fit_logistic(z, torch.as_tensor(y), 3, C=result.C)
    np.testing.assert_allclose(result.head.net[-1].weight.detach().numpy(), w.float().numpy(), atol=1e-5)
    # macro_f1: class-balanced weights tried too, the refit uses the weighting chosen out of fold
    f1 = probe_bank_cv(bank, folds, Cs=(0.01, 1.0), metric="macro_f1")
    assert [(r["C"], r["class_balanced"]) for r in f1.path] == [(0.01, False), (1.0, False), (0.01, True), (1.0, True)]
    w, b = fit_logistic(z, torch.as_tensor(y), 3, C=f1.C, class_balanced=f1.class_balanced)
    np.testing.assert_allclose(f1.head.net[-1].weight.detach().numpy(), w.float().numpy(), atol=1e-5)


def test_wilson_interval_by_hand():
    lo, hi = wilson_interval(36, 45)  # 0.80 on 45 images
    assert lo == pytest.approx(0.6611, abs=1e-3) and hi == pytest.approx(0.8909, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------ folds
def test_fold_split_keeps_groups_together_and_classes_balanced():
    rng = np.random.default_rng(0)
    labels, groups = [], []
    for c, n_groups in (("a", 40), ("b", 25), ("c", 12)):
        for g in range(n_groups):
            size = int(rng.choice([1, 1, 1, 2, 3]))
            labels += [c] * size
            groups += [f"{c}{g}"] * size
    labels, groups = np.array(labels), np.array(groups)
    folds = fold_split(labels, groups, 5, seed=0)
    assert set(folds) == set(range(5))
    for g in np.unique(groups):
        assert len(set(folds[groups == g])) == 1, g
    for c in "abc":
        counts = np.bincount(folds[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 3, (c, counts)  # within one largest group
    assert np.array_equal(folds, fold_split(labels, groups, 5, seed=0))
    assert not np.array_equal(folds, fold_split(labels, groups, 5, seed=1))


def test_fold_split_refuses_too_few_groups_and_bad_values():
    with pytest.raises(UserError, match="distinct image groups"):
        fold_split(["a", "a", "b"], ["g", "g", "h"], 3)
    with pytest.raises(UserError, match="at least 2"):
        fold_split(["a", "b"], ["g", "h"], 1)
    assert resolve_folds("auto", 45) == 5 and resolve_folds("auto", 400) == 0
    assert resolve_folds("off", 10) == 0 and resolve_folds("3", 10) == 3
    with pytest.raises(UserError, match="--cv"):
        resolve_folds("x", 10)


# ------------------------------------------------------------------------------------------ batched heads
@pytest.mark.parametrize("kind, hidden", [("pooled", 16), ("pooled", 0), ("seed", 8)])
def test_head_stack_step_equals_separate_steps(kind, hidden):
    torch.manual_seed(0)
    cfg = TrialConfig(optimizer="adamw", lr=1e-2, weight_decay=1e-2, grad_clip=0.5, dropout=0.0)
    heads = [build_head(kind, in_dim=6, n_classes=3, hidden=hidden) for _ in range(3)]
    for i, h in enumerate(heads):
        h.set_standardization(np.full(6, 0.1 * i), np.full(6, 1.0 + i))
    alone = [copy.deepcopy(h) for h in heads]
    stack = HeadStack(heads)
    x, y = torch.randn(3, 5, 6) * 3, torch.randint(3, (3, 5))
    crit = make_criterion(cfg, np.ones(3), "cpu")
    opt = make_optimizer(stack.parameters(), cfg)
    for _ in range(3):
        logits = stack(x)
        loss = torch.stack([crit(logits[k], y[k]) for k in range(3)]).sum()
        opt.zero_grad()
        loss.backward()
        stack.clip_grad_norm_(cfg.grad_clip)
        opt.step()
    for k, h in enumerate(alone):
        o = make_optimizer(h.parameters(), cfg)
        for _ in range(3):
            loss = crit(h(x[k]), y[k])
            o.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(h.parameters()), cfg.grad_clip)
            o.step()
        got = stack.head(k, copy.deepcopy(h))
        for (name, a), b in zip(h.state_dict().items(), got.state_dict().values()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_cv_run_learns_and_reports_out_of_fold_scores():
    bank = synthetic_bank(n_train=60, n_valid=30, d=16)
    folds = (np.arange(90) // 3) % 3  # every class in every fold
    cfg = TrialConfig(hidden=16, lr=1e-2, epochs=4, batch_size=16, dropout=0.1)
    run = CVHeadRun(cfg, bank=bank, folds=folds, device="cpu")
    out = [run.step() for _ in range(4)]
    last = out[-1]
    assert last["valid_count"] == 90 and last["cv_folds"] == 3
    assert last["valid/acc"] > 0.8
    assert last["valid/acc_min"] <= last["valid/acc"] <= last["valid/acc_max"]
    # out-of-fold: fold f's images scored by head f alone
    x, y = pooled_view0(bank)
    head1 = run.fold_head(1)
    with torch.no_grad():
        pred = head1(torch.from_numpy(x[folds == 1])).argmax(1)
    assert torch.equal(run.out_of_fold_logits()[torch.from_numpy(folds == 1)].argmax(1), pred)
    # each head is standardised with its own training images
    np.testing.assert_allclose(head1.mean.numpy(), x[folds != 1].mean(0), rtol=1e-5)


def test_cv_run_resume_matches_an_uninterrupted_run():
    bank = synthetic_bank(n_train=40, n_valid=20, d=8)
    folds = (np.arange(60) // 3) % 3
    cfg = TrialConfig(hidden=8, epochs=4, batch_size=8, dropout=0.3)
    full = CVHeadRun(cfg, bank=bank, folds=folds, device="cpu")
    expected = [full.step() for _ in range(4)]
    first = CVHeadRun(cfg, bank=bank, folds=folds, device="cpu")
    first.step(), first.step()
    state = copy.deepcopy(first.state_dict())
    again = CVHeadRun(cfg, bank=bank, folds=folds, device="cpu")
    again.load_state_dict(state)
    assert [again.step() for _ in range(2)] == expected[2:]
    # the checkpoint's fold heads, as the search rebuilds them for the deployed model
    heads = fold_heads(again.state_dict(), cfg, n_classes=3)
    assert len(heads) == 3
    for f, head in enumerate(heads):
        for a, b in zip(head.state_dict().values(), again.fold_head(f).state_dict().values()):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ image families
@pytest.mark.parametrize("family", ["field", "scans"])
def test_probe_and_folds_on_generated_images(tmp_path, family):
    """Two demo families of different character (colour field photos, greyscale drawings)."""
    from tune_rice.data.demo import generate_demo
    from tune_rice.data.images import read_labels
    from tune_rice.data.prepare import prepare_dataset
    from tune_rice.features.bank import FeatureSpec, extract_bank

    folder = generate_demo(tmp_path / family, per_class=12, size=64, family=family, workers=1)
    csv = prepare_dataset(folder, valid_frac=0.25, test_frac=0.15, progress=False, workers=1).labels_csv
    bank = extract_bank(
        csv, FeatureSpec(backbone="resnet18", image_size=32, views=2), weights="none", num_workers=0, progress=False
    )
    result = probe_bank(bank)
    n_valid = len(bank.splits["valid"])
    assert result.valid["count"] == n_valid
    # the chosen C scores on valid what the head it returns predicts
    with torch.no_grad():
        pred = result.head(torch.from_numpy(bank.splits["valid"].features[:, 0].astype(np.float32))).argmax(1)
    assert (pred.numpy() == bank.splits["valid"].targets).mean() == pytest.approx(result.valid["acc"])
    table = read_labels(csv)
    group_of = dict(zip(table.frame["path"], table.frame["group"]))
    folds = bank_folds(bank, group_of, 3)
    paths = bank.splits["train"].paths + bank.splits["valid"].paths
    for g in set(group_of[p] for p in paths):
        assert len({folds[i] for i, p in enumerate(paths) if group_of[p] == g}) == 1
    assert len(set(folds)) == 3
    cv = probe_bank_cv(bank, folds)
    assert cv.valid["count"] == len(paths) and 0 <= cv.valid["acc"] <= 1


# ------------------------------------------------------------------------------------------ report
@pytest.mark.parametrize("probe_value, beaten", [(0.70, True), (0.80, False)])
def test_report_puts_the_probe_beside_the_best_trial(tmp_path, probe_value, beaten):
    """The report's verdict is final.json's lead record (the one verdict), not a comparison of its own."""
    import json

    import pandas as pd

    from tune_rice.heads import stats
    from tune_rice.tools.report import load_experiment, write_report

    rows = [
        {
            "kind": "trial",
            "trial_id": "t1",
            "status": "TERMINATED",
            "best/valid/acc": 0.75,
            "best_epoch": 3,
            "epochs": 4,
            "valid_count": 40,
            "config/lr": 0.01,
        },
        {
            "kind": "trial",
            "trial_id": "t2",
            "status": "TERMINATED",
            "best/valid/acc": 0.6,
            "best_epoch": 2,
            "epochs": 4,
            "valid_count": 40,
            "config/lr": 0.1,
        },
        {
            "kind": "probe",
            "trial_id": "probe:bank",
            "status": "PROBE",
            "best/valid/acc": probe_value,
            "valid_count": 40,
            "cv_folds": 0,
            "config/C": 0.1,
        },
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "results.csv", index=False)
    y = np.zeros(40, dtype=int)  # the best trial right on 30 of 40 valid images; the probe on 22 or 32
    trial, probe = np.tile([0.0, 1.0], (40, 1)), np.tile([0.0, 1.0], (40, 1))  # class 1 on top: wrong
    trial[:30] = probe[: 22 if beaten else 32] = [1.0, 0.0]
    lead = stats.lead_test([trial], probe, y, metric="valid/acc", mode="max", trials_run=2)
    lead.update(trial="t1", probe="probe:bank", leader="t1" if lead["clear"] else "probe:bank")
    (tmp_path / "final.json").write_text(json.dumps({"lead": lead}))
    exp = load_experiment(tmp_path)
    assert list(exp.results["trial_id"]) == ["t1", "t2"] and list(exp.probes["trial_id"]) == ["probe:bank"]
    text = write_report(tmp_path).read_text()
    assert "trials: 2:" in text
    assert f"linear probe baseline (`probe:bank`, C=0.1, C chosen on valid): valid/acc {probe_value:.4f}" in text
    assert "valid acc 0.750 on 40 [0.60, 0.86]" in text  # the best trial's size and interval
    assert ("the search beat the linear probe on valid/acc: the best trial's +0.2 on 40 valid images" in text) == beaten
    assert ("did NOT beat the linear probe on valid/acc: the best trial's -0.05" in text) == (not beaten)
    assert f"p = {lead['p_value']:.3g} given it was the best of 2 trials" in text
