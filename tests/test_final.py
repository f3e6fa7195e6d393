"""The final model's numbers against direct computations: selection, temperature, calibration, coverage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tune_rice import UserError
from tune_rice.heads import calibration, final


def _candidates(seed=0, n=300, c=4, m=8):
    """``m`` noisy candidates' logits for ``n`` images of ``c`` classes: each sees the truth plus its own
    noise, so averaging helps, and the scales differ so that calibration is off."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    truth = np.eye(c)[y] * 2.0
    return [(truth + rng.normal(0, 1.6 + 0.1 * i, (n, c))) * (0.6 + 0.3 * i) for i in range(m)], y


# ------------------------------------------------------------------------------------------ metrics
def test_nll_and_brier_match_torch_and_the_definition():
    logits, y = _candidates(1)[0][0], _candidates(1)[1]
    ref = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(y)).item()
    assert calibration.nll(logits, y) == pytest.approx(ref, rel=1e-12)
    p = torch.softmax(torch.tensor(logits), 1).numpy()
    assert np.allclose(calibration.softmax(logits), p)
    by_hand = np.mean([sum((p[i, c] - (c == y[i])) ** 2 for c in range(p.shape[1])) for i in range(len(y))])
    assert calibration.brier(p, y) == pytest.approx(by_hand, rel=1e-12)


def test_ece_against_a_hand_computation():
    # Five images, 2 classes. Top probabilities 0.95, 0.95, 0.6, 0.6, 0.55; correct: yes, no, yes, yes, no.
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.4, 0.6], [0.4, 0.6], [0.55, 0.45]])
    y = np.array([0, 1, 1, 1, 1])
    # 15 bins of width 1/15: 0.95 is in bin 14 (14/15 = 0.933, 1], 0.6 in bin 8 (0.533, 0.6],
    # 0.55 in bin 8 too.
    # bin 14: 2 images, conf 0.95, acc 0.5 -> |0.5 - 0.95| = 0.45
    # bin 8: 3 images, conf (0.6 + 0.6 + 0.55) / 3 = 0.58333, acc 2/3 -> |0.66667 - 0.58333| = 0.08333
    expected = 2 / 5 * 0.45 + 3 / 5 * abs(2 / 3 - 1.75 / 3)
    assert calibration.ece(probs, y) == pytest.approx(expected, abs=1e-12)
    bins = calibration.reliability_bins(probs, y)
    assert bins["count"][14] == 2 and bins["count"][8] == 3 and sum(bins["count"]) == 5
    assert bins["accuracy"][8] == pytest.approx(2 / 3) and bins["accuracy"][0] is None
    # A bin's upper edge belongs to it: conf exactly 0.6 = 9/15 is in bin 8, not bin 9.
    assert bins["count"][9] == 0


def test_calibration_metrics_at_a_temperature_are_those_of_the_scaled_logits():
    (z, *_), y = _candidates(2)
    m = calibration.calibration_metrics(z, y, temperature=2.5)
    p = calibration.softmax(z / 2.5)
    assert m["nll"] == pytest.approx(calibration.nll(z / 2.5, y))
    assert m["ece"] == pytest.approx(calibration.ece(p, y)) and m["brier"] == pytest.approx(calibration.brier(p, y))
    assert m["acc"] == pytest.approx(np.mean(z.argmax(1) == y))  # a temperature never changes the argmax


# -------------------------------------------------------------------------------------- temperature
@pytest.mark.parametrize("seed", [0, 3])
def test_fitted_temperature_minimises_valid_nll_on_a_grid(seed):
    logits, y = _candidates(seed)
    for z in (logits[0], logits[-1], sum(logits)):  # under-confident, over-confident, a sum
        t = calibration.fit_temperature(z, y)
        grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
        losses = np.array([calibration.nll(z / g, y) for g in grid])
        assert calibration.nll(z / t, y) <= losses.min() + 1e-9
        # the grid's best is next to it (grid step in log T: 0.0015)
        assert abs(np.log(t) - np.log(grid[losses.argmin()])) < 0.003


def test_temperature_stops_at_its_bound_when_valid_is_separated():
    y = np.array([0, 1, 0, 1])
    z = np.array([[3.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, 2.0]])  # all right: NLL falls as T -> 0
    assert calibration.fit_temperature(z, y) == pytest.approx(calibration.TEMPERATURE_BOUNDS[0])


# ----------------------------------------------------------------------------------------- selection
def test_ensemble_logits_are_the_weighted_mean_of_the_members():
    logits, _ = _candidates(0)
    got = calibration.ensemble_logits(logits, [3, 0, 5], [0.5, 0.3, 0.2])
    assert np.allclose(got, 0.5 * logits[3] + 0.3 * logits[0] + 0.2 * logits[5], rtol=0, atol=1e-12)


def test_greedy_selection_replays_by_direct_computation():
    logits, y = _candidates(0)
    sel = calibration.select_ensemble(logits, y, k=5, rounds=12)
    assert sel.picks[0] == 0 and len(sel.picks) == 12 and len(set(sel.picks)) <= 5
    # Replay: each pick is the argmin over the allowed candidates of the NLL of the mean of all picks.
    for step in range(1, len(sel.picks)):
        before = sel.picks[:step]
        allowed = sorted(set(before)) if len(set(before)) >= 5 else range(len(logits))
        scores = {c: calibration.nll(np.mean([logits[i] for i in before + [c]], axis=0), y) for c in allowed}
        assert sel.picks[step] == min(scores, key=lambda c: (scores[c], c))
        assert sel.history[step] == pytest.approx(scores[sel.picks[step]], abs=1e-12)
    # The kept prefix is the best one; members/weights are its pick counts.
    keep = int(np.argmin(sel.history)) + 1
    kept = sel.picks[:keep]
    assert sel.members == list(dict.fromkeys(kept))
    assert sel.weights == pytest.approx([kept.count(m) / keep for m in sel.members]) and sum(
        sel.weights
    ) == pytest.approx(1)
    ens = calibration.ensemble_logits(logits, sel.members, sel.weights)
    assert calibration.nll(ens, y) == pytest.approx(min(sel.history), abs=1e-12)
    assert calibration.nll(ens, y) < calibration.nll(logits[0], y)  # on this data averaging helps
    assert len(sel.members) >= 2
    # Deterministic: same inputs, same ensemble.
    assert calibration.select_ensemble(logits, y, k=5, rounds=12) == sel


def test_selection_with_k1_or_no_improvement_is_the_single_best():
    logits, y = _candidates(0)
    sel = calibration.select_ensemble(logits, y, k=1)
    assert sel.members == [0] and sel.weights == [1.0]
    # Candidate 0 is perfect and confident; the others are noise: nothing is added.
    rng = np.random.default_rng(0)
    good = np.eye(4)[y] * 8.0
    noise = [rng.normal(0, 1, good.shape) for _ in range(3)]
    sel = calibration.select_ensemble([good] + noise, y, k=5)
    assert sel.members == [0] and sel.weights == [1.0]


def test_selection_limits_distinct_members_to_k():
    logits, y = _candidates(5, m=10)
    for k in (2, 3):
        sel = calibration.select_ensemble(logits, y, k=k, rounds=30)
        assert len(set(sel.picks)) <= k


def test_bad_selection_inputs_are_clear():
    logits, y = _candidates(0)
    with pytest.raises(UserError, match="--ensemble must be >= 1"):
        calibration.select_ensemble(logits, y, k=0)
    with pytest.raises(ValueError, match="candidate 1"):
        calibration.select_ensemble([logits[0], logits[1][:, :3]], y)


# ------------------------------------------------------------------------------------------ coverage
def test_coverage_curve_and_threshold_by_hand():
    # top probabilities 0.9 (right), 0.8 (right), 0.8 (wrong), 0.6 (right), 0.5 (wrong)
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.4, 0.6], [0.5, 0.5]])
    y = np.array([0, 0, 0, 1, 1])
    curve = calibration.coverage_curve(probs, y)
    assert curve["threshold"] == pytest.approx([0.9, 0.8, 0.6, 0.5])
    assert curve["coverage"] == pytest.approx([0.2, 0.6, 0.8, 1.0])  # the tie at 0.8 is kept together
    assert curve["accuracy"] == pytest.approx([1.0, 2 / 3, 3 / 4, 3 / 5])
    assert calibration.suggest_threshold(probs, y, target_accuracy=0.7) == pytest.approx(
        {"target_accuracy": 0.7, "threshold": 0.6, "coverage": 0.8, "accuracy": 0.75}
    )
    assert calibration.suggest_threshold(probs, y, target_accuracy=0.6)["threshold"] == 0.0  # all kept already
    assert calibration.suggest_threshold(probs, y, target_accuracy=1.0)["threshold"] == pytest.approx(0.9)
    wrong = np.array([1, 1, 1, 0, 0])
    assert calibration.suggest_threshold(probs, wrong, target_accuracy=0.9)["threshold"] is None


def test_coverage_curve_is_thinned_but_keeps_full_coverage():
    logits, y = _candidates(0, n=1000)
    curve = calibration.coverage_curve(calibration.softmax(logits[0]), y, max_points=50)
    assert len(curve["coverage"]) <= 50 and curve["coverage"][-1] == 1.0
    assert curve["accuracy"][-1] == pytest.approx(np.mean(logits[0].argmax(1) == y))


# -------------------------------------------------------------------------------------------- decide
def test_decide_deploys_the_ensemble_only_when_valid_says_so():
    logits, y = _candidates(0)
    names = [f"t{i}" for i in range(len(logits))]
    choice = final.decide(names, logits, y, k=5)
    calibrated = [z / t for z, t in zip(logits, choice.candidate_temperatures)]  # each at its own temperature
    ens = calibration.ensemble_logits(calibrated, choice.selection.members, choice.selection.weights)
    better = np.mean(ens.argmax(1) == y) > np.mean(logits[0].argmax(1) == y)  # a tie keeps the smaller model
    assert choice.deployed == ("ensemble" if better else "single")
    deployed = ens if better else logits[0]
    assert choice.temperature == pytest.approx(calibration.fit_temperature(deployed, y))
    assert choice.valid["deployed_calibrated"]["nll"] <= choice.valid["deployed"]["nll"] + 1e-12
    assert choice.valid["single"]["acc"] == pytest.approx(np.mean(logits[0].argmax(1) == y))
    d = choice.to_dict()
    assert d["selection"]["members"] == [names[i] for i in choice.selection.members]
    assert d["members"] == (d["selection"]["members"] if better else ["t0"])

    again = final.FinalChoice.from_dict(json.loads(json.dumps(d)))
    assert again == choice  # final.json holds the whole choice: a resumed search reads it back

    # --ensemble 1: the single best, calibrated.
    one = final.decide(names, logits, y, k=1)
    assert one.deployed == "single" and one.members == ["t0"] and one.weights == [1.0]
    assert one.temperature == pytest.approx(calibration.fit_temperature(logits[0], y))


def test_selection_is_made_on_each_candidates_calibrated_logits():
    logits, y = _candidates(0)
    choice = final.decide([f"t{i}" for i in range(len(logits))], logits, y, k=5)
    temps = [calibration.fit_temperature(z, y) for z in logits]
    assert choice.candidate_temperatures == pytest.approx(temps) and choice.single_temperature == temps[0]
    again = calibration.select_ensemble([z / t for z, t in zip(logits, temps)], y, k=5)
    assert again == choice.selection
    ens = calibration.ensemble_logits([z / t for z, t in zip(logits, temps)], again.members, again.weights)
    assert choice.ensemble_temperature == pytest.approx(calibration.fit_temperature(ens, y))
    assert choice.valid["ensemble"]["nll"] == pytest.approx(calibration.nll(ens, y))
    names = [choice.candidates[i] for i in again.members]
    assert choice.mix(names, again.weights) == pytest.approx(
        [w / temps[i] for i, w in zip(again.members, again.weights)]
    )


def test_cross_fitted_temperature_and_threshold_by_direct_computation():
    (z, *_), y = _candidates(3, n=120)
    fold = calibration._crossfit_folds(len(y), 5)
    assert sorted(np.bincount(fold)) == [24] * 5
    scaled = np.empty_like(z)
    kept = right = 0
    for f in range(5):
        t = calibration.fit_temperature(z[fold != f], y[fold != f])
        scaled[fold == f] = z[fold == f] / t
        th = calibration.suggest_threshold(calibration.softmax(z[fold != f] / t), y[fold != f], target_accuracy=0.8)[
            "threshold"
        ]
        p = calibration.softmax(z[fold == f] / t)
        keep = p.max(1) >= th
        kept += keep.sum()
        right += (p.argmax(1)[keep] == y[fold == f][keep]).sum()
    assert calibration.crossfit_calibration(z, y)["ece"] == pytest.approx(
        calibration.ece(calibration.softmax(scaled), y)
    )
    got = calibration.crossfit_threshold(z, y, target_accuracy=0.8)
    assert got["coverage"] == pytest.approx(kept / len(y)) and got["accuracy"] == pytest.approx(right / kept)
    # on test: the share kept at the valid threshold and the accuracy among them
    on_test = final.threshold_on_test(calibration.softmax(z), y, {"threshold": 0.6, "target_accuracy": 0.8})
    keep = calibration.softmax(z).max(1) >= 0.6
    assert on_test["coverage"] == pytest.approx(keep.mean()) and on_test["kept"] == keep.sum()
    assert on_test["accuracy"] == pytest.approx((z.argmax(1)[keep] == y[keep]).mean())


def test_decide_keeps_the_single_best_when_the_ensemble_loses_accuracy():
    # Candidate 1 (each at its own temperature) lowers the NLL but flips two right answers.
    y = np.array([1, 0, 1, 1, 1, 0, 0, 1])
    z0 = np.array([[0.8, -0.3], [2.1, 0.9], [1.5, 2.1], [1.1, 1.5], [-0.3, 0.7], [0.8, 0.2], [0.3, -0.7], [1.4, -0.4]])
    z1 = np.array(
        [[2.2, 4.1], [-2.0, 2.8], [-0.2, 2.9], [-1.1, 2.6], [-1.4, -2.6], [3.5, -1.7], [-2.5, 0.1], [-0.6, 2.4]]
    )
    choice = final.decide(["a", "b"], [z0, z1], y, k=2, rounds=2)
    assert choice.selection.members == [0, 1]  # the selection took b (lower NLL) ...
    assert choice.valid["ensemble"]["acc"] < choice.valid["single"]["acc"]
    assert choice.deployed == "single" and choice.members == ["a"]  # ... but valid accuracy says no
    from tune_rice.search.summary import final_lines

    by_f1 = final.decide(["a", "b"], [z0, z1], y, k=2, rounds=2, metric="valid/macro_f1")
    v = by_f1.valid
    assert by_f1.deployed == "single" and final_lines(by_f1.to_dict())[0].startswith(
        f"FINAL: the single best trial (an ensemble of 2 was not deployed on valid: macro_f1 "
        f"{v['ensemble']['macro_f1']:.4f} vs {v['single']['macro_f1']:.4f})"
    )


# ------------------------------------------------------------------- the best trial against the probe
def _right_wrong(pattern, c=3):
    """Logits (N, c) for targets 0: right (class 0 on top) where ``pattern`` is 1, wrong (class 1) where 0."""
    z = np.zeros((len(pattern), c))
    z[np.arange(len(pattern)), np.where(np.asarray(pattern) == 1, 0, 1)] = 2.0
    return z


def _fake_candidates(names, baseline=()):
    from tune_rice.features.model import build_head
    from tune_rice.heads import engine

    spec = engine.TrialConfig(backbone="resnet18", image_size=32).feature_spec()
    head = build_head("pooled", in_dim=4, n_classes=3, hidden=0, dropout=0.0)
    return [final.Candidate(n, spec, head, baseline=n in baseline) for n in names]


@pytest.mark.parametrize("lead_by, leader", [(2, "probe:b"), (9, "t0")])
def test_the_probe_leads_unless_the_best_trial_beats_it_beyond_the_pick(lead_by, leader):
    """The best trial right on ``lead_by`` images the probe gets wrong (and never the other way): 2-0 is
    what picking the best gives by chance (the exact sign test alone says p = 0.25), 9-0 is not."""
    n = 40
    y = np.zeros(n, dtype=int)
    probe = _right_wrong([1] * 20 + [0] * 20)
    best = _right_wrong([1] * (20 + lead_by) + [0] * (20 - lead_by))
    other = _right_wrong([1] * 19 + [0] * 21)
    pool = _fake_candidates(["t0", "t1", "probe:b"], baseline=["probe:b"])
    choice = final.choose_final(pool, [best, other, probe], y, k=3, metric="valid/acc", trials_run=6)
    assert choice.candidates[0] == leader and choice.lead["leader"] == leader
    assert choice.lead["trial"] == "t0" and choice.lead["probe"] == "probe:b" and choice.lead["count"] == n
    assert choice.lead["advantage"] == pytest.approx(lead_by / n)
    assert choice.lead["compared"] == 2 and choice.lead["trials"] == 6
    # the record is stats.lead_test's on the two trials, with the 6 the search ran counted
    from tune_rice.heads import stats

    again = stats.lead_test([best, other], probe, y, metric="valid/acc", mode="max", trials_run=6)
    assert choice.lead["p_value"] == pytest.approx(again["p_value"]) and choice.lead["clear"] == (leader == "t0")
    assert sorted(choice.candidates) == ["probe:b", "t0", "t1"]
    assert final.FinalChoice.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice
    text = " ".join(final.lead_lines(choice.to_dict()))
    assert ("what picking the best gives by chance" in text) == (leader == "probe:b")
    assert "given the best of 6 trials was picked" in text
    # the report names who was deployed and why the probe led
    import pandas as pd

    from tune_rice.heads.probe import probe_verdict, search_beats_probe
    from tune_rice.records import FinalRecord
    from tune_rice.tools.report import Experiment, final_lines

    record = FinalRecord.from_dict(choice.to_dict())
    md = "\n".join(
        final_lines(
            Experiment(Path("."), pd.DataFrame(), "valid/acc", "max", None, None, final=record),
            record,
        )
    )
    deployed = "the linear probe's head" if leader == "probe:b" else "the single best trial's head"
    assert f"Deployed: {deployed}" in md and ("the simpler probe led the final model" in md) == (leader == "probe:b")
    # one verdict: the probe line of the summary and the report reads the same record
    assert search_beats_probe(choice.lead) == (leader == "t0")
    verdict = probe_verdict(choice.lead, metric="valid/acc")
    assert verdict.startswith("the search beat" if leader == "t0" else "the search did NOT beat")
    if leader == "probe:b":  # the trials join the probe only if that beats the probe beyond the pick too
        assert choice.deployed == ("ensemble" if choice.lead.get("ensemble", {}).get("clear") else "single")
        assert choice.deployed == "single" and choice.members == ["probe:b"]


def test_no_probe_in_the_pool_leaves_the_best_trial_leading():
    logits, y = _candidates(0, m=3)
    pool = _fake_candidates(["t0", "t1", "t2"])
    choice = final.choose_final(pool, logits, y, k=3)
    assert choice.candidates == ["t0", "t1", "t2"] and choice.lead == {}
    assert final.lead_lines(choice.to_dict()) == []


# ------------------------------------------------------------------- from banks to the deployed model
def _scans_dataset(root):
    """Demo greyscale scans (4 classes), split by index within each class (no prepare: small and fixed)."""
    import pandas as pd

    from tune_rice.data import demo

    folder = demo.generate_demo(root, per_class=10, size=64, family="scans", workers=1)
    rows = []
    for label in demo.CLASSES:
        files = sorted(p.relative_to(folder).as_posix() for p in (folder / label).glob("*.jpg"))
        for i, rel in enumerate(files):
            split = ("train", "train", "valid", "test")[i % 4]
            rows.append({"path": rel, "label": label, "split": split, "group": rel})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv"


def _tiny_config(**values):
    """A trial on random-init resnet18 features at 32 px, one view (seconds on a CPU)."""
    from tune_rice.heads import engine

    return engine.TrialConfig(backbone="resnet18", image_size=32, views=1, aug_policy="none", **values)


def _bank(labels, cfg, tmp_path):
    """``cfg``'s feature bank of ``labels``: random init, on the CPU, cached under ``tmp_path``."""
    from tune_rice.features import bank as features

    return features.extract_bank(
        labels,
        cfg.feature_spec(),
        weights="none",
        cache_dir=tmp_path / "cache",
        device="cpu",
        num_workers=0,
        progress=False,
    )


@pytest.fixture(params=["colour", "scans"])
def tiny_candidates(request, tmp_path):
    """Six heads trained a few epochs on one resnet18 bank (random init, 32 px), as trials would."""
    from conftest import make_separable_dataset

    from tune_rice.data import images as data
    from tune_rice.features import bank as features
    from tune_rice.heads import engine

    labels = (
        make_separable_dataset(tmp_path / "data") if request.param == "colour" else _scans_dataset(tmp_path / "scans")
    )
    cfg = _tiny_config(epochs=4, seed=0)
    bank = _bank(labels, cfg, tmp_path)
    candidates = []
    for i, (hidden, lr) in enumerate([(32, 3e-3), (0, 1e-2), (64, 1e-3), (16, 3e-2), (0, 1e-3), (32, 1e-2)]):
        run = engine.HeadRun(
            engine.TrialConfig(**{**cfg.to_dict(), "hidden": hidden, "lr": lr, "seed": i}), bank=bank, device="cpu"
        )
        scores = [run.step()["valid/acc"] for _ in range(cfg.epochs)]
        candidates.append(final.Candidate(f"t{i}", cfg.feature_spec(), run.head.eval(), max(scores)))
    candidates.sort(key=lambda c: -c.score)
    table = data.read_labels(labels)
    return candidates, {bank.spec.name: bank}, table, features.resolve_weights("resnet18", "none")


def test_the_deployed_model_on_images_is_the_choice_made_on_bank_logits(tiny_candidates):
    from tune_rice.data.images import build_transform, load_image
    from tune_rice.heads.engine import split_logits

    candidates, banks, table, weights = tiny_candidates
    # A cross-validated trial's fold heads are one candidate: their logits averaged.
    candidates = candidates + [final.Candidate("cv", candidates[0].spec, [c.heads[0] for c in candidates[1:3]], 0.0)]
    pool = final.candidate_pool(candidates)
    logits, y_valid = final.valid_logits_from_banks(pool, banks)
    choice = final.choose_final(pool, logits, y_valid, k=3, rounds=6)
    assert choice.candidates == [c.name for c in candidates] and choice.members[0] == candidates[0].name
    # The valid logits the choice was made on are each head on the bank (no image decoded); without
    # banks (--feature-cache off) they come from one decode of the valid images, to the bank's float16.
    from_images, y_images = final.valid_logits_from_images(
        pool, table, {"resnet18": weights}, device="cpu", num_workers=0
    )
    assert np.array_equal(y_images, y_valid)
    for a, b in zip(logits, from_images):
        assert np.allclose(a, b, atol=2e-2, rtol=1e-2), np.abs(a - b).max()
    assert np.allclose(logits[-1], (logits[1] + logits[2]) / 2)  # pool order = candidates order here
    members = [choice.candidates.index(m) for m in choice.members]
    mix = choice.mix(choice.members, choice.weights) if choice.deployed == "ensemble" else choice.weights
    want = calibration.ensemble_logits(logits, members, mix) / choice.temperature  # (N, C)
    # ... and the deployed model, run on the decoded valid images, gives the same calibrated logits
    # (the bank holds float16 features, hence the tolerance).
    model, resolved, _ = final.build_final_model(choice, pool, {"resnet18": weights})
    assert len(resolved) == 1  # every head here reads one backbone: held once
    selected, _, groups = final.build_final_model(choice, pool, {"resnet18": weights}, selection=True)
    tf = build_transform(32, train=False)
    x = torch.stack([tf(load_image(p)) for p in table.paths("valid")])
    with torch.no_grad():
        got = model(x).double().numpy()
    assert np.allclose(got, want, atol=2e-2, rtol=1e-2), np.abs(got - want).max()

    # The test record from one decode of the test split: the deployed model, the single best and the
    # selected ensemble, each against the model run directly.
    z, y = split_logits(final.MemberLogits(selected, groups), table, "test", 32, "cpu", num_workers=0)
    assert z.shape == (len(table.split("test")), len(choice.selection.members), len(table.classes))
    record = final.record_test_scores(z.numpy(), y.numpy(), table.classes, choice)
    xt = torch.stack([tf(load_image(p)) for p in table.paths("test")])
    yt = table.targets("test")
    with torch.no_grad():
        deployed, ensemble = model(xt), selected(xt)
        single = candidates[0].heads[0](model.backbone(xt) if choice.deployed == "single" else model.backbones[0](xt))
    assert record["accuracy"] == pytest.approx(float((deployed.argmax(1).numpy() == yt).mean()))
    assert record["calibration"]["after"]["nll"] == pytest.approx(
        calibration.nll(deployed.double().numpy(), yt), abs=1e-4
    )
    assert record["single_best"]["accuracy"] == pytest.approx(float((single.argmax(1).numpy() == yt).mean()))
    assert record["single_best"]["deployed"] == (choice.deployed == "single")
    assert record["members"] == choice.members and record["temperature"] == choice.temperature
    if len(choice.selection.members) > 1:
        assert record["ensemble"]["accuracy"] == pytest.approx(float((ensemble.argmax(1).numpy() == yt).mean()))
        assert record["ensemble"]["calibration"]["after"]["nll"] == pytest.approx(
            calibration.nll(ensemble.double().numpy(), yt), abs=1e-4
        )
        assert record["ensemble"]["deployed"] == (choice.deployed == "ensemble")


def test_candidates_from_checkpoint_states_plain_and_cross_validated(separable, tmp_path):
    from tune_rice.heads import engine
    from tune_rice.heads.cv import CVHeadRun

    cfg = _tiny_config(epochs=2, hidden=16)
    bank = _bank(separable, cfg, tmp_path)
    run = engine.HeadRun(cfg, bank=bank, device="cpu")
    run.step()
    plain = final.candidate_from_state("t0", run.state_dict(), cfg, score=0.5)
    assert len(plain.heads) == 1 and plain.oof_logits is None and plain.spec == cfg.feature_spec()
    assert np.array_equal(final.head_valid_logits(plain.heads, bank), final.head_valid_logits(run.head.eval(), bank))

    folds = np.arange(len(bank.splits["train"]) + len(bank.splits["valid"])) % 3
    cv = CVHeadRun(cfg, bank=bank, folds=folds, device="cpu")
    cv.step()
    fold = final.candidate_from_state("cv0", cv.state_dict(), cfg)
    assert len(fold.heads) == 3
    x = torch.from_numpy(bank.splits["valid"].features[:, 0].astype(np.float32))
    with torch.no_grad():
        stacked = cv.stack.eval()(x.expand(3, *x.shape))  # (K, N, C): each fold head on the valid features
        for k, head in enumerate(fold.heads):
            assert torch.allclose(head(x), stacked[k], atol=1e-5)
    assert np.array_equal(fold.oof_logits, cv.last_logits.double().numpy())
    # The choice among cross-validated candidates is made on their out-of-fold logits, pooled targets.
    logits, y = final.valid_logits_from_banks([fold], {bank.spec.name: bank})
    assert np.array_equal(logits[0], fold.oof_logits) and len(y) == len(folds)
    assert np.array_equal(y, np.concatenate([bank.splits["train"].targets, bank.splits["valid"].targets]))
    with pytest.raises(UserError, match="cannot mix"):
        final.valid_logits_from_banks([plain, fold], {bank.spec.name: bank})


def test_make_final_model_and_its_record_rebuild_the_same_model(tiny_candidates):
    candidates, banks, table, weights = tiny_candidates
    # the last trial's head stands in for a linear probe: the test pass scores it beside the deployed model
    probe = final.Candidate("probe:b", candidates[0].spec, candidates[-1].heads, candidates[-1].score, baseline=True)
    candidates = [*candidates[:-1], probe]
    fm = final.make_final_model(candidates, weights={"resnet18": weights}, banks=banks, k=3, trials_run=8)
    assert fm.choice.lead["probe"] == "probe:b" and fm.choice.lead["trials"] == 8
    assert set(fm.seconds) == {"valid_logits", "select_and_calibrate", "build"}
    record = json.loads(json.dumps(fm.record()))
    assert [c["name"] for c in record["candidate_info"]] == record["candidates"]
    # A resumed search reads the choice back: same members, weights, temperature, same model.
    again = final.make_final_model(
        list(reversed(candidates)), weights={"resnet18": weights}, banks=banks, recorded=record
    )
    assert again.choice == fm.choice and [c.name for c in again.pool] == [c.name for c in fm.pool]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.model(x), fm.model(x)) and torch.equal(again.selected(x), fm.selected(x))
    scores = final.score_final(fm, table, device="cpu")
    assert scores["test_count"] == len(table.split("test")) and scores["deployed"] == fm.choice.deployed
    # the members' weights have their own key: "weights" in test_metrics.json is the backbone identity
    assert scores["member_weights"] == fm.choice.weights and "weights" not in scores
    # test figures carry intervals: Wilson for the accuracy, a bootstrap for macro-F1
    from tune_rice.data.images import build_transform, load_image
    from tune_rice.features.model import Classifier
    from tune_rice.heads.probe import wilson_interval

    n = scores["test_count"]
    assert scores["accuracy_interval"] == pytest.approx(list(wilson_interval(round(scores["accuracy"] * n), n)))
    assert scores["macro_f1_interval"][0] <= scores["macro_f1"] <= scores["macro_f1_interval"][1]
    # ... and the deployed model against the probe (or, when the probe is deployed, the best trial) it was
    # chosen over, on the same test images: reported, with the exact McNemar counts
    other = "trial" if fm.choice.deployed == "single" and fm.choice.candidates[0] == "probe:b" else "probe"
    assert list(scores["compared"]) == [other]
    got = scores["compared"][other]
    head = probe.heads[0] if other == "probe" else candidates[0].heads[0]
    backbone = fm.model.backbone if isinstance(fm.model, Classifier) else fm.model.backbones[0]
    xt = torch.stack([build_transform(32, train=False)(load_image(p)) for p in table.paths("test")])
    with torch.no_grad():
        right = head(backbone(xt)).argmax(1).numpy() == table.targets("test")
        deployed_right = fm.model(xt).argmax(1).numpy() == table.targets("test")
    assert got["trial_id"] == fm.choice.lead[other] and got["accuracy"] == pytest.approx(right.mean())
    assert got["mcnemar"]["deployed_only"] == int((deployed_right & ~right).sum())
    assert got["mcnemar"]["other_only"] == int((right & ~deployed_right).sum())


def test_probes_join_the_candidates_behind_the_single_best(separable, tmp_path):
    from tune_rice.features import bank as features
    from tune_rice.heads import probe

    cfg = _tiny_config(epochs=2, hidden=16)
    bank = _bank(separable, cfg, tmp_path)
    banks = {bank.spec.name: bank}
    probes = probe.fit_probes(banks, metric="valid/acc")
    (cand,) = final.probe_candidates(probes, banks, metric="valid/acc")
    assert cand.name == f"probe:{bank.spec.name}" and cand.score == probes[bank.spec.name].valid["acc"]
    # its valid logits from the bank are the probe head's, as the probe scored them
    logits = final.head_valid_logits(cand.heads, bank)
    assert np.mean(logits.argmax(1) == bank.splits["valid"].targets) == pytest.approx(cand.score)
    trials = [final.Candidate(n, bank.spec, cand.heads, s) for n, s in (("best", 0.5), ("t1", 0.9), ("t2", 0.2))]
    merged = final.merge_candidates(trials, [cand], mode="max")
    assert merged[0].name == "best"  # the search's own best trial starts the selection, whatever the probe
    assert [c.name for c in merged[1:]] == [c.name for c in sorted(merged[1:], key=lambda c: -c.score)]
    # The trials here are the probe's own head: a best trial that ties the probe on every valid image
    # does not clearly beat it, so the probe leads and is deployed alone.
    fm = final.make_final_model(
        merged, weights={"resnet18": features.resolve_weights("resnet18", "none")}, banks=banks, k=3
    )
    assert fm.single_best.name == cand.name and fm.choice.candidates[0] == cand.name
    assert fm.choice.deployed == "single" and fm.choice.members == [cand.name]
    assert fm.choice.lead == {**fm.choice.lead, "trial": "best", "leader": cand.name, "advantage": 0.0}
    assert fm.record()["candidate_info"][0]["name"] == cand.name
