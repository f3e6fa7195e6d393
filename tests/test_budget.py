"""``--time-budget``: no trial starts after it, the running ones stop, and the search still ends with
its outputs (the best trial scored once on test, the study closed, the summary saying why)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import local_ray
from helpers_study import head_step_hook, run_small_search

from tune_rice.experiment.study import load_study
from tune_rice.search import run as search

ray = pytest.importorskip("ray")

SPACE = """\
metric: valid/acc
max_epochs: 4
params:
  backbone: resnet18
  image_size: 32
  views: 1
  lr: {loguniform: [1.0e-3, 3.0e-2]}
"""
# Each epoch sleeps this long (a worker setup hook), so that the trials are still running when the budget
# runs out and Tune has to stop them.
EPOCH_SECONDS = 2.0
BUDGET = "2h"


@pytest.fixture(scope="module")
def ray_slow_epochs(tmp_path_factory):
    with local_ray(
        tmp_path_factory, runtime_env={"worker_process_setup_hook": head_step_hook(sleep_s=EPOCH_SECONDS)}
    ) as r:
        yield r


@pytest.fixture
def budget_runs_out_at_the_first_epoch(monkeypatch):
    """Tune's budget clock (its TimeoutStopper, in this process), made to run out as soon as a trial has
    reported its second epoch (so that Tune has registered the first one's checkpoint): an event, where a
    real clock would race the workers' start on a busy machine. Returns the budgets in seconds that Tune
    was given."""
    from ray.tune.stopper.timeout import TimeoutStopper

    budgets: list[float] = []
    results: list[str] = []

    def on_result(self, trial_id, result):  # Tune shows the stopper every result
        results.append(trial_id)
        return False

    def stop_all(self):
        budgets.append(self._timeout_seconds)
        return len(results) > len(set(results))

    monkeypatch.setattr(TimeoutStopper, "__call__", on_result)
    monkeypatch.setattr(TimeoutStopper, "stop_all", stop_all)
    return budgets


@pytest.mark.slow
def test_time_budget_cuts_the_search_and_keeps_its_outputs(
    ray_slow_epochs, budget_runs_out_at_the_first_epoch, tmp_path, capsys
):
    exp = run_small_search(tmp_path, SPACE, "b", "--num-samples", 20, "--time-budget", BUDGET)
    assert set(budget_runs_out_at_the_first_epoch) == {search.parse_duration(BUDGET, what="--time-budget")}
    rows = pd.read_csv(exp / "results.csv")
    df = rows[rows["kind"] == "trial"]  # the linear probe's rows follow the trials'
    assert 1 <= len(df) < 20 and (df["epochs"] >= 1).all(), df[["trial_id", "epochs"]]
    test = json.loads((exp / "test_metrics.json").read_text())  # the best so far (or the probe), scored once
    assert test["trial_id"] in set(rows["trial_id"]) and (exp / "best" / "model.pt").is_file()
    summary = (exp / "summary.txt").read_text()
    assert f"the time budget ({BUDGET}) cut the search" in summary and f"{len(df)} of 20 trials ran" in summary
    assert summary in capsys.readouterr().out
    # the study has no trial left RUNNING: the cut ones are PRUNED, each with the epochs it ran
    study = load_study(exp)
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    ran = [t for t in study.trials if t.intermediate_values]
    assert len(ran) == len(df)


@pytest.mark.parametrize("text, seconds", [("2h", 7200), ("90m", 5400), ("40s", 40), ("75", 75), ("1.5h", 5400)])
def test_durations(text, seconds):
    assert search.parse_duration(text, what="--time-budget") == seconds


@pytest.mark.parametrize("text", ["soon", "0", "-5m", "2d", "inf"])
def test_a_bad_budget_is_one_line(text, tmp_path, capsys):
    rc = search.main([f"--time-budget={text}", "--storage-path", str(tmp_path / "runs"), "--name", "x"])
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--time-budget" in err[0] and text in err[0], err
    assert not (tmp_path / "runs").exists()
