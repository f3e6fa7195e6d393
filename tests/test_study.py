"""The searcher's Optuna study kept in the experiment folder: read back with ``optuna.load_study``, it
matches results.csv trial by trial (states, per-epoch values, params), and the report uses it."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import local_ray
from helpers_study import assert_study_matches_results, head_step_hook, run_small_search

from tune_rice.experiment.study import load_study
from tune_rice.tools.report import importances, load_experiment

ray = pytest.importorskip("ray")

SPACE = """\
metric: valid/loss
max_epochs: 4
params:
  backbone: resnet18
  image_size: 32
  views: 1
  lr: {loguniform: [1.0e-3, 3.0e-2]}
  hidden: {choice: [0, 32]}
"""
CRASH_LR = 1.2e-2  # trials above it raise in their second epoch, every attempt


@pytest.fixture(scope="module")
def ray_crashing(tmp_path_factory):
    """A local Ray whose workers crash the trials with a large lr."""
    with local_ray(
        tmp_path_factory, runtime_env={"worker_process_setup_hook": head_step_hook(crash_lr_above=CRASH_LR)}
    ) as r:
        yield r


@pytest.mark.slow  # errored trials are retried twice, each retry a fresh worker
def test_study_is_kept_with_complete_pruned_and_failed_trials(ray_crashing, tmp_path):
    exp = run_small_search(tmp_path, SPACE, "kept", "--num-samples", 8, "--grace-period", 1, "--reduction-factor", 4)
    states = assert_study_matches_results(exp, "valid/loss", max_epochs=4)
    assert {"COMPLETE", "PRUNED", "FAIL"} <= set(states.values()), states
    df = pd.read_csv(exp / "results.csv")
    assert (df.loc[df["status"] == "ERROR", "config/lr"] > CRASH_LR).all()

    # the report's importances are computed on this study: every trial that ran an epoch without failing
    study = load_study(exp)
    ran = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED") and t.intermediate_values]
    values, note = importances(load_experiment(exp))
    assert values is not None and note == f"{len(ran)} trials", note
    assert set(values) == {"lr", "hidden"}
