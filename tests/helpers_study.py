"""Checks shared by the tests of the kept Optuna study (``runs/<name>/optuna_journal.log``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_separable_dataset

from tune_rice.experiment.study import TRIAL_ID_ATTR, load_study
from tune_rice.search import run as search


def head_step_hook(*, sleep_s: float = 0.0, crash_lr_above: float | None = None):
    """A Ray worker setup hook (it runs in every worker of the job): each epoch of a head first sleeps
    ``sleep_s``, and a trial whose lr is above ``crash_lr_above`` raises in its second epoch, every attempt."""

    def hook():
        import time

        from tune_rice.heads.engine import HeadRun

        step = HeadRun.step

        def wrapped(self):
            if crash_lr_above is not None and self.cfg.lr > crash_lr_above and self.epoch == 1:
                raise RuntimeError(f"test crash: lr {self.cfg.lr:g} > {crash_lr_above:g}")
            time.sleep(sleep_s)
            return step(self)

        HeadRun.step = wrapped

    return hook


def run_small_search(tmp_path: Path, space: str, name: str, *extra) -> Path:
    """A search of the separable test set (16 images a class, 32 px, random-init backbone) with the
    search space text ``space`` and the extra arguments; its experiment folder, once it ended with 0."""
    labels = make_separable_dataset(tmp_path / "data", per_class=16, size=32)
    (tmp_path / "space.yaml").write_text(space)
    storage = tmp_path / "runs"
    args = ["--data", labels, "--search-space", tmp_path / "space.yaml", "--weights", "none"]
    args += ["--storage-path", storage, "--name", name, "--no-report", *extra]
    assert search.main([str(a) for a in args]) == 0
    return storage / name


def assert_study_matches_results(exp: Path, metric: str, max_epochs: int) -> dict[str, str]:
    """The study read back with ``optuna.load_study`` holds every trial of results.csv with the state
    its row implies and each epoch's value from its progress.csv; returns trial id -> Optuna state."""
    study = load_study(exp)
    assert study is not None, f"no Optuna study in {exp}"
    df = pd.read_csv(exp / "results.csv")
    if "kind" in df:  # the linear probes' rows are not trials
        df = df[df["kind"] != "probe"]
    by_id = {t.user_attrs.get(TRIAL_ID_ATTR): t for t in study.trials}
    assert set(df["trial_id"]) <= set(by_id), (set(df["trial_id"]), set(by_id))
    states = {}
    for _, row in df.iterrows():
        t = by_id[row["trial_id"]]
        states[row["trial_id"]] = t.state.name
        if row["status"] == "ERROR":
            assert t.state.name == "FAIL", row["trial_id"]
            continue
        # result.json, not progress.csv: Tune shifts a resumed trial's progress.csv columns. An epoch run
        # again after a restore repeats its values, so the last record of each epoch is the same as the first.
        lines = (Path(row["trial_dir"]) / "result.json").read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        history = {int(r["training_iteration"]): float(r[metric]) for r in records if metric in r}
        assert t.intermediate_values == pytest.approx(history), row["trial_id"]
        assert t.state.name == ("COMPLETE" if int(row["epochs"]) == max_epochs else "PRUNED"), row["trial_id"]
        assert t.value == pytest.approx(history[max(history)])
        for name, value in t.params.items():  # the params Optuna proposed are the ones the trial ran
            ran = row[f"config/{name}"]
            same = str(ran) == str(value) or (isinstance(value, (int, float)) and float(ran) == pytest.approx(value))
            assert same, (row["trial_id"], name, ran, value)
    return states
