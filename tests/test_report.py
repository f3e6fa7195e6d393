"""report: plots and report.md from what a search wrote (a hand-made experiment, and a real one when slow)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tune_rice import UserError
from tune_rice.tools import report

# Shared session fixtures (fake_experiment, real_search): registered once as a plugin so every module
# gets the same trained model and the same real search.
pytest_plugins = ["helpers_artifacts"]

FIGURES = ("curves.png", "params.png", "importance.png", "confusion.png")


def _assert_pngs(folder, names=FIGURES):
    for name in names:
        with Image.open(folder / name) as im:
            im.verify()  # a complete, valid PNG
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 300, (name, im.size)


@pytest.fixture(scope="module")
def fake(tmp_path_factory, fake_experiment):
    exp = fake_experiment(tmp_path_factory.mktemp("report"), n_trials=24, n_errored=2)
    return exp, report.write_report(exp)


def test_report_writes_markdown_and_figures(fake):
    exp, md_path = fake
    assert md_path == exp / "report" / "report.md"
    _assert_pngs(md_path.parent)
    md = md_path.read_text()
    for name in FIGURES:
        assert f"]({name})" in md
    assert "24: 11 ran to the end, 11 stopped early by ASHA, 2 errored" in md
    assert "2 of 24 trials errored (8%)" in md and "not finite" in md
    assert "11 of 24 trials were stopped early by ASHA" in md
    assert "**The backbone was randomly initialised (random:seed=0)" in md
    assert "accuracy 0.8000" in md


def test_edge_of_space_is_flagged_on_the_log_scale_only_where_it_can_widen(fake):
    exp, md_path = fake
    flags = md_path.read_text().split("## Flags")[1].split("##")[0]
    assert "`lr` = 0.095" in flags and "upper bound 0.1" in flags and "log scale" in flags
    assert "**widen the space**" in flags
    # 0.095 is 95% of the way to 0.1 linearly too, but e.g. 0.06 would not be: check the log measure directly.
    exp_obj = report.load_experiment(exp)
    exp_obj.results.loc[0, "config/lr"] = 0.06  # log position 0.93: not at the edge
    assert not any("`lr`" in f for f in report.edge_flags(exp_obj))
    exp_obj.results.loc[0, "config/lr"] = 1.2e-4  # log position 0.03: at the lower edge
    assert any("`lr`" in f and "lower bound" in f for f in report.edge_flags(exp_obj))
    exp_obj.results.loc[0, "config/dropout"] = 0.0  # dropout cannot go below 0: not a space problem
    assert not any("`dropout`" in f for f in report.edge_flags(exp_obj))


def test_top_trials_table_and_importance(fake):
    exp, md_path = fake
    md = md_path.read_text()
    table = md.split("## Top trials")[1].split("##")[0].strip().splitlines()
    assert table[0].startswith("| rank | trial | valid/acc | best epoch | epochs | status | lr | dropout | hidden")
    assert len(table) == 2 + report.TOP_TABLE
    values, note = report.importances(report.load_experiment(exp))
    assert set(values) == {"lr", "dropout", "hidden", "optimizer", "warmup_epochs"}
    assert sum(values.values()) == pytest.approx(1.0)
    assert max(values, key=values.get) == "lr"  # the fake's metric is mostly a function of lr
    assert "24 trials" in note


@pytest.mark.filterwarnings("error")  # nothing reaches the console as a Python warning
def test_importance_on_ties_at_the_top_is_not_computed_and_says_why(tmp_path, fake_experiment):
    exp = fake_experiment(tmp_path, n_trials=6, n_errored=0)
    frame = report.load_experiment(exp)
    # what a tiny search gives: one trial a little better, the rest tied
    frame.results[frame.key] = [0.6667, 0.3333, 0.3333, 0.3333, 0.3333, 0.3333]
    values, note = report.importances(frame)
    assert values is None and "cannot be told apart" in note and "2 distinct" in note


def test_pretrained_weights_and_a_missing_space_file(tmp_path, fake_experiment):
    exp = fake_experiment(tmp_path, n_trials=6, n_errored=0, weights="imagenet:ResNet34_Weights.IMAGENET1K_V1")
    (tmp_path / "fake_space.yaml").unlink()  # an experiment copied without its space file
    md = report.write_report(exp).read_text()
    assert "**The backbone was randomly" not in md and "imagenet:ResNet34_Weights.IMAGENET1K_V1" in md
    assert "0 of 6 trials errored" in md
    assert (exp / "report" / "curves.png").is_file() and (exp / "report" / "params.png").is_file()


def test_not_an_experiment(tmp_path, capsys):
    with pytest.raises(UserError, match="no results.csv"):
        report.write_report(tmp_path)
    assert report.main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.slow
def test_report_on_a_real_search(real_search, capsys):
    out = real_search / "report"
    assert (out / "report.md").is_file()  # the search wrote it at its end
    before = (out / "report.md").read_text()
    assert report.main([str(real_search)]) == 0
    assert (out / "report.md").read_text() == before  # and the CLI writes the same from the files alone
    _assert_pngs(out, ("curves.png", "params.png", "confusion.png"))
    md = (out / "report.md").read_text()
    test = json.loads((real_search / "test_metrics.json").read_text())
    assert f"accuracy {test['accuracy']:.4f}" in md
    assert "**The backbone was randomly initialised" in md
    exp = report.load_experiment(real_search)
    assert len(exp.histories) == len(exp.results) == 4  # every trial's progress.csv was found
    assert exp.metric == "valid/acc" and exp.searched == ["lr", "hidden"]


def test_final_model_section_shows_members_figures_and_the_suggested_threshold(tmp_path, fake_experiment):
    import numpy as np

    from tune_rice.heads import final

    exp = fake_experiment(tmp_path, n_trials=8, n_errored=0)
    df = __import__("pandas").read_csv(exp / "results.csv", dtype={"trial_id": str})
    names = list(df["trial_id"][:6])
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    logits = [(np.eye(5)[y] * 2 + rng.normal(0, 1.5, (200, 5))) * 2.5 for _ in names]  # over-confident
    choice = final.decide(names, logits, y, k=4)
    assert choice.deployed == "ensemble"
    record = {
        **choice.to_dict(),
        "k": 4,
        "candidate_info": [
            {"name": n, "score": float(s), "backbone": "resnet18", "head": "pooled", "hidden": 64}
            for n, s in zip(names, df["best/valid/acc"][:6])
        ],
    }
    (exp / "final.json").write_text(json.dumps(record))
    z = np.stack([lg[:50] for lg in logits], 1)[:, choice.selection.members]
    test = {
        **json.loads((exp / "test_metrics.json").read_text()),
        **final.record_test_scores(z, y[:50], report.load_experiment(exp).test.classes, choice),
    }
    (exp / "test_metrics.json").write_text(json.dumps(test))

    md = report.write_report(exp).read_text()
    _assert_pngs(exp / "report", FIGURES + ("reliability.png", "coverage.png"))
    section = md.split("## Final model")[1].split("\n## ")[0]
    assert f"an ensemble of {len(choice.members)} heads" in section and "among 6 candidates" in section
    for m, w in zip(choice.members, choice.weights):
        assert f"| {m} | {w:.4g} |" in section
    v, n, t = choice.valid, len(choice.members), choice.temperature
    assert (
        f"| ensemble of {n} (deployed) | valid (in-sample) | 1 | {v['ensemble']['acc']:.4g} | "
        f"{v['ensemble']['macro_f1']:.4g} |" in section
    )
    cf = v["deployed_crossfit"]  # the temperature on images it was not fitted on
    assert (
        f"| ensemble of {n} (deployed) | valid (cross-fitted) | fitted on the other folds | {cf['acc']:.4g} |"
        in section
    )
    after = test["calibration"]["after"]
    assert (
        f"| ensemble of {n} (deployed) | test | {t:.3g} | {after['acc']:.4g} | {after['macro_f1']:.4g} | "
        f"{after['ece']:.4g} | {after['nll']:.4g} | {after['brier']:.4g} |" in section
    )
    single = test["single_best"]["calibration"]["after"]
    assert f"| single best | test | {choice.single_temperature:.3g} | {single['acc']:.4g} |" in section
    th = choice.threshold
    assert (
        th["threshold"]
        and (
            f"--min-confidence {th['threshold']:.3g} keeps {th['coverage']:.0%} of valid at {th['accuracy']:.1%} "
            f"accuracy in-sample (target 95%); chosen on the other folds of valid it kept {th['crossfit']['coverage']:.0%}"
        )
        in section
    )
    on_test = test["threshold"]  # what it did on test, against its target
    assert f"--min-confidence {th['threshold']:.3g} on test: keeps {on_test['coverage']:.0%} at" in section
    assert v["deployed_calibrated"]["ece"] < v["deployed"]["ece"]  # the temperature helped here, as drawn
    assert f"the deployed ensemble of {len(choice.members)} heads" in md
    assert "](reliability.png)" in md and "](coverage.png)" in md
