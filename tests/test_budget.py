"""``--time-budget``: no trial starts after it, the running ones stop, and the search still ends with
its outputs (the best trial scored once on test, the study closed, the summary saying why)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import local_ray, make_separable_dataset

from tune_rice import UserError, search
from tune_rice.study import load_study

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
# Each epoch sleeps this long (a worker setup hook), so that 20 trials of 4 epochs on 2 CPUs need 600 s
# or more, far longer than the 120 s budget: the budget, not the trials, ends the search; and a worker
# starts (imports torch) well within it even on a busy machine, so some epochs do run.
EPOCH_SECONDS = 15.0


def _slow_hook(seconds: float):
    def hook():  # runs in every Ray worker: each epoch of a trial takes ``seconds`` more
        import time

        from tune_rice.engine import HeadRun

        step = HeadRun.step

        def slow(self):
            time.sleep(seconds)
            return step(self)

        HeadRun.step = slow

    return hook


@pytest.fixture(scope="module")
def ray_slow_epochs(tmp_path_factory):
    with local_ray(tmp_path_factory, runtime_env={"worker_process_setup_hook": _slow_hook(EPOCH_SECONDS)}) as r:
        yield r


@pytest.mark.slow
def test_time_budget_cuts_the_search_and_keeps_its_outputs(ray_slow_epochs, tmp_path, capsys):
    labels = make_separable_dataset(tmp_path / "data", per_class=16, size=32)
    (tmp_path / "space.yaml").write_text(SPACE)
    storage = tmp_path / "runs"
    rc = search.main(list(map(str, ["--data", labels, "--search-space", tmp_path / "space.yaml", "--weights", "none",
                                    "--storage-path", storage, "--name", "b", "--num-samples", 20,
                                    "--time-budget", "120s", "--no-report"])))
    assert rc == 0
    exp = storage / "b"
    df = pd.read_csv(exp / "results.csv")
    assert 1 <= len(df) < 20 and (df["epochs"] >= 1).all(), df[["trial_id", "epochs"]]
    test = json.loads((exp / "test_metrics.json").read_text())  # the best so far, scored once
    assert test["trial_id"] in set(df["trial_id"]) and (exp / "best" / "model.pt").is_file()
    summary = (exp / "summary.txt").read_text()
    assert f"the time budget (120s) cut the search" in summary and f"{len(df)} of 20 trials ran" in summary
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
