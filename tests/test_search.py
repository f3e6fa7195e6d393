"""The search end to end on a tiny dataset: one local Ray shared by the module, CPU only.

Trials run in Ray worker processes. A worker setup hook (installed with the module's ``ray.init``)
records every image a worker decodes, so the tests can prove that trials never read the test split,
and that with the feature cache on they decode no image at all.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import error_line, local_ray, make_separable_dataset, search_argv
from helpers_study import assert_study_matches_results
from search_driver import kill_mid_search, terminated, trial_states
from torch.utils.tensorboard import SummaryWriter

from tune_rice.data.images import build_transform, load_image, read_labels
from tune_rice.experiment.study import load_study
from tune_rice.features.model import load_artifact
from tune_rice.heads import audit
from tune_rice.search import run as search
from tune_rice.search import tune_glue

ray = pytest.importorskip("ray")

SPACE = """\
metric: {metric}
max_epochs: {epochs}
params:
  backbone: resnet18
  image_size: 32
  views: {views}
  lr: {{loguniform: [1.0e-3, 3.0e-2]}}
  hidden: {{choice: [0, 32]}}
"""


def _worker_hook(trace: str, control: str):
    """Runs in every Ray worker of this module's job.

    Logs ``pid path`` for each decoded image to ``trace``; and while the JSON file ``control`` says
    ``{"crash_lr_above": x}``, a trial with a larger lr raises in its second epoch (every attempt).
    """

    def hook():
        import json
        from pathlib import Path

        import tune_rice.data.images as data
        from tune_rice.heads.engine import HeadRun

        load_image, step = data.load_image, HeadRun.step

        def traced(path, **kwargs):
            with open(trace, "a") as f:
                f.write(f"{os.getpid()} {path}\n")
            return load_image(path, **kwargs)

        def crashing(self):
            settings = json.loads(Path(control).read_text()) if Path(control).exists() else {}
            limit = settings.get("crash_lr_above")
            if limit is not None and self.cfg.lr > limit and self.epoch == 1:
                raise RuntimeError(f"test crash: lr {self.cfg.lr:g} > {limit:g}")
            return step(self)

        data.load_image = traced
        HeadRun.step = crashing

    return hook


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    """One local Ray for the module (``tune_glue.init_ray`` leaves an initialised Ray alone)."""
    hooks = tmp_path_factory.mktemp("hooks")
    trace, control = hooks / "reads.txt", hooks / "control.json"
    with local_ray(tmp_path_factory, runtime_env={"worker_process_setup_hook": _worker_hook(str(trace), str(control))}):
        yield {"trace": trace, "control": control, "address": ray.get_runtime_context().gcs_address}


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    """24 train / 12 valid / 12 test images, 32 px, 3 classes."""
    return make_separable_dataset(tmp_path_factory.mktemp("search") / "data", per_class=16, size=32)


def _space(folder: Path, *, metric="valid/acc", epochs=3, views=2, name="space.yaml") -> Path:
    path = folder / name
    path.write_text(SPACE.format(metric=metric, epochs=epochs, views=views))
    return path


def _reads(trace: Path) -> list[tuple[int, Path]]:
    if not trace.exists():
        return []
    return [(int(pid), Path(p)) for pid, p in (line.split(" ", 1) for line in trace.read_text().splitlines())]


def _hparams(folder: Path) -> dict:
    """The hyperparameters of the HParams summary in ``folder``'s event files, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(folder))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _optuna_trials(exp_dir: Path, metric: str, mode: str, max_t: int) -> dict:
    """Tune trial id -> Optuna FrozenTrial, from the searcher state Tune saved in the experiment."""
    searcher = tune_glue.optuna_search_cls()(metric=metric, mode=mode, max_t=max_t)
    searcher.restore_from_dir(str(exp_dir))
    frozen = searcher._ot_study.get_trials(deepcopy=False)
    return {tid: frozen[t.number] for tid, t in searcher._ot_trials.items()}


def _history(trial_dir: str, metric: str) -> dict[int, float]:
    progress = pd.read_csv(Path(trial_dir) / "progress.csv")
    return dict(zip(progress["training_iteration"].astype(int), progress[metric].astype(float)))


# ------------------------------------------------------------------------------------------ smoke
@pytest.mark.slow
def test_search_end_to_end(ray_local, labels, tmp_path, capsys, monkeypatch):
    produced = {}

    def run_and_keep(args):
        produced.update(run_search(args))
        return produced

    run_search = search.run_search
    monkeypatch.setattr(search, "run_search", run_and_keep)
    ray_local["trace"].unlink(missing_ok=True)
    storage = tmp_path / "runs"
    rc = search.main(search_argv(labels, _space(tmp_path), storage, "smoke", "--num-samples", 3, "--seed", 1))
    out = capsys.readouterr().out
    assert rc == 0
    exp = storage / "smoke"
    table = read_labels(labels)

    # results.csv: one row per trial, every trial trained on the CPU and reported its metrics
    df = pd.read_csv(exp / "results.csv").query("kind == 'trial'")
    assert len(df) == 3 and df["trial_id"].is_unique
    assert set(df["status"]) == {"TERMINATED"}
    assert (df["device"] == "cpu").all() and (df["weights"] == "random:seed=1").all()
    assert df["config/lr"].between(1e-3, 3e-2).all() and set(df["config/hidden"]) <= {0, 32}
    assert (df["epochs"] <= 3).all() and (df["epochs"] >= 2).all()  # ASHA may stop one at its grace period

    # the best model: self-contained, loads both ways, classifies test images as test_metrics says
    # the deployed model: the best trial, or the linear probe when the best trial's lead over it on valid is
    # what picking the best of 3 trials gives by chance (final.json's lead: the one verdict)
    test = json.loads((exp / "test_metrics.json").read_text())
    rows = pd.read_csv(exp / "results.csv")
    assert (rows["kind"] == "probe").sum() == 1
    assert test["trial_id"] in set(rows["trial_id"])
    assert test["weights"] == "random:seed=1" and len(test["member_weights"]) == len(test["members"])
    lead = json.loads((exp / "final.json").read_text())["lead"]
    assert lead["trials"] == 3 and test["trial_id"] == lead["leader"] == (
        lead["trial"] if lead["clear"] else lead["probe"]
    )
    trial_rows = rows[rows["kind"] == "trial"]
    assert (
        trial_rows.loc[trial_rows["trial_id"] == lead["trial"], "best/valid/acc"].item()
        == trial_rows["best/valid/acc"].max()
    )
    cm = np.asarray(test["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == test["test_count"] == len(table.split("test"))
    assert test["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert set(test["per_class"]) == set(table.classes) and 0 <= test["macro_f1"] <= 1
    payload = torch.load(exp / "best" / "model.pt", map_location="cpu", weights_only=True)
    assert payload["classes"] == list(table.classes)
    assert payload["metrics"]["trial_id"] == test["trial_id"]
    assert payload["config"]["image_size"] == 32 and payload["config"]["backbone"] == "resnet18"
    model, meta = load_artifact(exp / "best" / "model.pt")
    transform = build_transform(meta["preprocessing"]["image_size"], train=False)
    x = torch.stack([transform(load_image(p)) for p in table.paths("test")])  # (12, 3, 32, 32)
    with torch.inference_mode():
        predicted = model(x).argmax(1).numpy()
    accuracy = float((predicted == table.targets("test")).mean())
    assert accuracy == pytest.approx(test["accuracy"])
    assert accuracy > 1 / 3  # above chance, with a random backbone on colour-coded classes

    # TensorBoard: every trial is a run whose scalars are all under train/ and valid/ (no ray/tune/
    # copies, no lone `lr` card before them), with an HParams summary of the searched parameters
    for _, row in df.iterrows():
        scalars = _scalars(Path(row["trial_dir"]))
        steps = [s for s, _ in scalars["valid/acc"]]
        assert steps == list(range(1, int(row["epochs"]) + 1)), row["trial_id"]
        assert max(v for _, v in scalars["valid/acc"]) == pytest.approx(row["best/valid/acc"])
        assert {"train/loss", "train/lr", "valid/loss"} <= set(scalars), row["trial_id"]
        assert all(tag.startswith(("train/", "valid/")) for tag in scalars), sorted(scalars)
        assert _hparams(Path(row["trial_dir"])) == {
            "lr": pytest.approx(row["config/lr"]),
            "hidden": row["config/hidden"],
        }, row["trial_id"]
    test_scalars = _scalars(exp / "test")
    assert test_scalars["test/acc"] == [(0, pytest.approx(test["accuracy"]))]
    assert test_scalars["test/ece"] == [(0, pytest.approx(test["calibration"]["after"]["ece"]))]

    # the final model: chosen on valid among the trials' best checkpoints and the linear probe, recorded,
    # calibrated, and the single best scored in the same test pass
    record = json.loads((exp / "final.json").read_text())
    assert record["candidates"][0] == test["trial_id"] and set(record["candidates"]) <= set(rows["trial_id"])
    assert any(c.startswith("probe:") for c in record["candidates"])
    assert test["deployed"] == record["deployed"] and test["members"] == record["members"]
    assert meta["temperature"] == pytest.approx(record["temperature"]) == test["temperature"]
    assert meta["calibration"]["fitted_on"] == "valid" and len(meta["members"]) >= len(record["members"])
    assert test["single_best"]["trial_id"] == test["trial_id"]
    assert test["single_best"]["deployed"] == (record["deployed"] == "single")
    xv = torch.stack([transform(load_image(p)) for p in table.paths("valid")])
    with torch.inference_mode():
        valid_pred = model(xv).argmax(1).numpy()
    # the deployed model on the decoded valid images agrees with the choice made on the banks' float16
    # features (at most one image of 12 may flip at a near tie)
    assert abs(float((valid_pred == table.targets("valid")).mean()) - record["valid"]["deployed"]["acc"]) <= 1 / 12

    # the data audit: leaks among valid and test, likely label errors, and the test accuracy recomputed from
    # the deployed model's per-image predictions (which test_metrics.json does not keep)
    leaks = pd.read_csv(exp / audit.LEAKAGE_FILE)
    assert list(leaks.columns) == list(audit.LEAKAGE_COLUMNS) and set(leaks["split"]) <= {"valid", "test"}
    assert list(pd.read_csv(exp / audit.LABEL_ISSUES_FILE).columns) == list(audit.ISSUE_COLUMNS)
    audited = json.loads((exp / audit.AUDIT_FILE).read_text())
    assert audited["checked"] == {"valid": 12, "test": 12} and "predictions" not in test
    assert audited["test"]["accuracy"] == pytest.approx(test["accuracy"])
    assert "data audit (resnet18 features)" in out and "likely label errors: " in out

    # the console summary
    assert "TEST" in out and "3 trials:" in out and str(exp) in out and "FINAL: " in out
    # Ray's status table names the experiment folder, not its own staging folder under /tmp/ray
    assert f"Results: {exp}\n" in out and "Result logdir" not in out
    assert (exp / "summary.txt").read_text().strip() in out

    # the banks handed to the trials: train and valid only, no test image among them
    test_paths = set(table.split("test")["path"])
    banks = produced["banks"]
    assert banks and all(set(b.splits) == {"train", "valid"} for b in banks.values())
    for bank in banks.values():
        for split, features in bank.splits.items():
            assert set(features.paths) == set(table.split(split)["path"])
            assert not set(features.paths) & test_paths
    assert _reads(ray_local["trace"]) == []  # with the feature cache on, trials decode no image

    # every search tries a linear head first: the probe's model under the trials' optimiser
    frozen = _optuna_trials(exp, "valid/acc", "max", 3)
    assert min(frozen.values(), key=lambda t: t.number).params["hidden"] == 0


# ------------------------------------------------------------------------------------------ pruning
@pytest.mark.slow
def test_asha_stops_are_recorded_as_pruned_in_optuna(ray_local, labels, tmp_path):
    # valid/loss never ties (valid/acc often does on tiny data), and rf=4 stops all but the top quarter
    space = _space(tmp_path, metric="valid/loss", epochs=4, views=1)
    storage = tmp_path / "runs"
    rc = search.main(
        search_argv(labels, space, storage, "asha", "--num-samples", 6, "--grace-period", 1, "--reduction-factor", 4)
    )
    assert rc == 0
    exp = storage / "asha"
    df = pd.read_csv(exp / "results.csv").query("kind == 'trial'")
    assert len(df) == 6
    stopped = df[df["stopped_early"]]
    assert len(stopped) >= 1, df[["trial_id", "epochs", "best/valid/loss"]]
    assert (stopped["epochs"] < 4).all() and (df.loc[~df["stopped_early"], "epochs"] == 4).all()

    trials = _optuna_trials(exp, "valid/loss", "min", max_t=4)
    assert set(trials) == set(df["trial_id"])
    for _, row in df.iterrows():
        frozen = trials[row["trial_id"]]
        history = _history(row["trial_dir"], "valid/loss")
        assert len(history) == row["epochs"]
        # every epoch's value, the one that made ASHA stop the trial included
        assert frozen.intermediate_values == pytest.approx(history), row["trial_id"]
        assert frozen.value == pytest.approx(history[max(history)])
        expected = "PRUNED" if row["stopped_early"] else "COMPLETE"
        assert frozen.state.name == expected, row["trial_id"]


def test_tensorboard_callback_writes_each_epoch_once_across_restarts(tmp_path):
    """A trial restored from a checkpoint runs its last epochs again: by a retry in the same driver, or
    under a new driver after --resume, in a new Ray session whose staging folder for the trial is new and
    empty (the earlier event files are then only on the storage path). TensorBoard gets every epoch once."""
    import pyarrow.fs

    storage = tmp_path / "storage" / "trial_x"

    class FakeTrial:  # what TrialScalars uses of a Tune trial
        def __init__(self, staging: Path):
            self.local_path, self.path = str(staging), str(storage)
            self.storage = type("Storage", (), {"storage_filesystem": pyarrow.fs.LocalFileSystem()})()
            self.config = {"lr": 0.1}

        def init_local_path(self):
            Path(self.local_path).mkdir(parents=True, exist_ok=True)

    def epochs(cb, trial, steps):
        for step in steps:
            cb.log_trial_result(step, trial, {"epoch": step, "valid/acc": step / 10, "lr": 0.1, "node": "n"})

    def sync(trial):  # what Tune does for a trial folder: staging -> storage
        shutil.copytree(trial.local_path, storage, dirs_exist_ok=True)

    trial = FakeTrial(tmp_path / "session1" / "trial_x")
    first = tune_glue.tensorboard_callback_cls()()
    first.log_trial_start(trial)
    epochs(first, trial, [1, 2, 3, 4])
    # An event file is named by the second it was opened, then a per-process counter compared as text
    # ("10" < "9"), and TensorBoard reads a folder's files in name order. Real restarts are seconds
    # apart; so are the writers here, or their files could be read out of order.
    time.sleep(1.05)
    first.log_trial_start(trial)  # retried after a crash, restored from epoch 2's checkpoint
    epochs(first, trial, [3, 4, 5])
    first.log_trial_end(trial)
    # Ray's own copies share the folder; they do not count as ours
    time.sleep(1.05)
    ray_writer = SummaryWriter(trial.local_path)
    ray_writer.add_scalar("ray/tune/valid/acc", 0.9, global_step=50)
    ray_writer.close()
    sync(trial)
    assert tune_glue.last_logged_step(trial.local_path) == 5

    again = FakeTrial(tmp_path / "session2" / "trial_x")  # --resume: a new driver in a new Ray session
    assert tune_glue.last_logged_step(again.local_path, again.storage.storage_filesystem, again.path) == 5
    time.sleep(1.05)
    resumed = tune_glue.tensorboard_callback_cls()()
    resumed.log_trial_start(again)
    epochs(resumed, again, [4, 5, 6])
    resumed.log_trial_end(again)
    sync(again)
    scalars = _scalars(storage)
    assert scalars["valid/acc"] == [(s, pytest.approx(s / 10)) for s in range(1, 7)]
    assert [s for s, _ in scalars["train/lr"]] == list(range(1, 7)) and "node" not in scalars


def test_searcher_records_complete_pruned_and_failed_trials(tmp_path):
    """The Optuna searcher driven as Tune drives it, without Ray running."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    metric = "valid/acc"
    space = OptunaSearch.convert_search_space({"lr": tune.loguniform(1e-3, 3e-2), "hidden": tune.choice([0, 32])})
    searcher = tune_glue.optuna_search_cls()(space=space, metric=metric, mode="max", seed=0, max_t=4)
    for tid in ("done", "stopped", "crashed", "crashed_late", "removed"):
        config = searcher.suggest(tid)
        assert 1e-3 <= config["lr"] <= 3e-2 and config["hidden"] in (0, 32)

    def result(step, value):
        return {metric: value, "training_iteration": step}

    for step, value in enumerate([0.5, 0.6, 0.7], start=1):
        searcher.on_trial_result("done", result(step, value))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns on a step reported twice
        searcher.on_trial_result("done", result(3, 0.7))  # epoch 3 again, after a restore from epoch 2
    searcher.on_trial_complete("done", result(4, 0.8))  # ASHA stops at max_t: no on_trial_result first
    searcher.on_trial_result("stopped", result(1, 0.3))
    searcher.on_trial_complete("stopped", result(2, 0.35))  # stopped by ASHA at its second rung
    searcher.on_trial_result("crashed", result(1, 0.4))
    searcher.on_trial_complete("crashed", error=True)  # what Tune passes for an errored trial
    searcher.on_trial_complete("crashed_late", result(2, 0.9), error=True)
    searcher.on_trial_complete("removed")  # ended while pending: no result
    searcher.on_trial_complete("done", result(4, 0.1))  # a second completion is ignored

    def states(s):
        frozen = s._ot_study.get_trials(deepcopy=False)
        return {tid: frozen[t.number] for tid, t in s._ot_trials.items()}

    trials = states(searcher)
    assert trials["done"].state.name == "COMPLETE" and trials["done"].value == 0.8
    assert trials["done"].intermediate_values == {1: 0.5, 2: 0.6, 3: 0.7, 4: 0.8}
    assert trials["stopped"].state.name == "PRUNED"
    assert trials["stopped"].intermediate_values == {1: 0.3, 2: 0.35} and trials["stopped"].value == 0.35
    assert trials["crashed"].state.name == "FAIL" and trials["crashed"].value is None
    assert trials["crashed_late"].state.name == "FAIL"
    assert trials["removed"].state.name == "PRUNED" and trials["removed"].value is None

    # the state survives Tune's save / restore, and the restored searcher keeps proposing
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = tune_glue.optuna_search_cls()(metric=metric, mode="max", max_t=4)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert {t: f.state for t, f in states(restored).items()} == {t: f.state for t, f in trials.items()}
    assert restored.suggest("next")["hidden"] in (0, 32)


@pytest.mark.slow
def test_crashing_trials_are_retried_then_reported_as_errors(ray_local, labels, tmp_path, capsys):
    control = ray_local["control"]
    control.write_text(json.dumps({"crash_lr_above": 5e-3}))
    storage = tmp_path / "runs"
    try:
        rc = search.main(
            search_argv(labels, _space(tmp_path), storage, "crash", "--num-samples", 4, "--grace-period", 3)
        )
    finally:
        control.unlink()
    out = capsys.readouterr().out
    assert rc == 0  # the search goes on, and its best surviving trial is scored
    exp = storage / "crash"
    df = pd.read_csv(exp / "results.csv").query("kind == 'trial'")
    crashed = df["config/lr"] > 5e-3
    assert crashed.any() and (~crashed).any(), df[["trial_id", "config/lr"]]  # seed 0 samples both sides
    assert (df.loc[crashed, "status"] == "ERROR").all() and (df.loc[~crashed, "status"] == "TERMINATED").all()
    assert df.loc[crashed, "error"].str.contains("test crash").all()
    assert (df.loc[~crashed, "epochs"] == 3).all()
    assert f"{int(crashed.sum())} errored" in out
    trials = _optuna_trials(exp, "valid/acc", "max", max_t=3)
    for _, row in df.iterrows():
        assert trials[row["trial_id"]].state.name == ("FAIL" if row["status"] == "ERROR" else "COMPLETE")
    states = trial_states(exp)
    for _, row in df.iterrows():  # FailureConfig(max_failures=2): a crashing trial ran 3 times
        assert states[row["trial_id"]] == (row["status"], 3 if row["status"] == "ERROR" else 0)
    # tied on valid/acc with the crashed trials' first epoch, a clean trial is the one scored on test (or
    # the linear probe, when no trial beat it by more than picking the best gives by chance on valid)
    test = json.loads((exp / "test_metrics.json").read_text())
    assert test["trial_id"] in set(df.loc[~crashed, "trial_id"]) or test["trial_id"].startswith("probe:")


# ------------------------------------------------------------------------------------------ test split
@pytest.mark.slow
def test_trials_never_read_the_test_split_with_the_feature_cache_off(ray_local, labels, tmp_path):
    trace = ray_local["trace"]
    trace.unlink(missing_ok=True)
    storage = tmp_path / "runs"
    rc = search.main(
        search_argv(labels, _space(tmp_path, epochs=2, views=1), storage, "inline", "--num-samples", 2, "--bank", "off")
    )
    assert rc == 0
    table = read_labels(labels)
    reads = _reads(trace)
    assert reads, "the trace hook recorded nothing: the inline path decoded no image?"
    assert os.getpid() not in {pid for pid, _ in reads}  # only trial workers are traced
    read_paths = {p for _, p in reads}
    assert read_paths == set(table.paths("train")) | set(table.paths("valid"))
    assert not read_paths & set(table.paths("test"))
    test = json.loads((storage / "inline" / "test_metrics.json").read_text())
    assert test["test_count"] == len(table.split("test"))  # scored once, by the driver, after the search
    df = pd.read_csv(storage / "inline" / "results.csv").query("kind == 'trial'")
    assert len(df) == 2 and (df["device"] == "cpu").all()


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.slow
def test_resume_after_the_driver_is_killed(ray_local, labels, tmp_path):
    storage = tmp_path / "runs"
    exp = storage / "r"
    argv = search_argv(
        labels,
        _space(tmp_path),
        storage,
        "r",
        "--num-samples",
        4,
        "--max-concurrent",
        1,
        "--address",
        ray_local["address"],
    )
    # Trials on a bank take well under a second: the third trial is held after its first epoch until the
    # driver is killed, so the kill lands mid-search however fast or loaded the machine is.
    kill_mid_search(
        argv, work=tmp_path, trial=2, after_epoch=1, ready=lambda: len(terminated(exp)) >= 2, what="2 finished trials"
    )
    finished = terminated(exp)
    kept = {tid: (exp / f"trial_{tid}" / "result.json").read_bytes() for tid in finished}
    assert not (exp / "results.csv").exists()

    rc = search.main(["--resume", "--name", "r", "--storage-path", str(storage)])  # the rest is restored
    assert rc == 0
    df = pd.read_csv(exp / "results.csv").query("kind == 'trial'")
    assert len(df) == 4 and df["trial_id"].is_unique
    assert set(df["status"]) == {"TERMINATED"}
    assert finished <= set(df["trial_id"])
    for tid, before in kept.items():  # finished trials were not run again
        assert (exp / f"trial_{tid}" / "result.json").read_bytes() == before, tid
    # the Optuna study survived the kill: one trial each, with every epoch's value and its end state
    states = assert_study_matches_results(exp, "valid/acc", max_epochs=3)
    assert len(load_study(exp).trials) == 4 and set(states.values()) <= {"COMPLETE", "PRUNED"}
    test = json.loads((exp / "test_metrics.json").read_text())
    scored = set(df["trial_id"]) | set(pd.read_csv(exp / "results.csv").query("kind == 'probe'")["trial_id"])
    assert test["trial_id"] in scored and test["test_count"] == len(read_labels(labels).split("test"))
    assert load_artifact(exp / "best" / "model.pt")[1]["metrics"]["trial_id"] == test["trial_id"]


@pytest.mark.slow
def test_data_root_reaches_the_trials_that_read_images(ray_local, labels, tmp_path):
    """A Kaggle-style CSV of image ids (no extension) and labels kept outside the images' folder, with
    --data-root: the search prepares labels.csv beside the CSV, its paths relative to the root, and the
    root reaches the trials that decode the images themselves (--bank off)."""
    meta = tmp_path / "meta" / "train.csv"
    meta.parent.mkdir()
    frame = pd.read_csv(labels)
    pd.DataFrame({"image_id": frame["path"].str.removesuffix(".png"), "Disease": frame["label"]}).to_csv(
        meta, index=False
    )
    storage = tmp_path / "runs"
    argv = search_argv(
        meta,
        _space(tmp_path, epochs=1, views=1),
        storage,
        "root",
        "--num-samples",
        1,
        "--bank",
        "off",
        "--grace-period",
        1,
        "--data-root",
        labels.parent,
    )
    assert search.main(argv) == 0
    prepared = read_labels(meta.with_name("train.labels.csv"), root=labels.parent)
    assert sorted(prepared.frame["path"]) == sorted(frame["path"])
    test = json.loads((storage / "root" / "test_metrics.json").read_text())
    assert test["test_count"] == len(prepared.split("test"))
    saved = json.loads((storage / "root" / "search_args.json").read_text())
    assert saved["data_root"] == str(labels.parent.resolve()) and saved["data"] == str(meta.resolve())
    assert saved["labels"] == str(prepared.csv_path)


@pytest.mark.slow
def test_an_unreadable_test_image_keeps_the_best_model(ray_local, tmp_path, capsys, monkeypatch):
    """A test image broken after labels.csv was written: one clear error, the winner is still saved, and a
    resume refuses to score the test split again. Resumed from before the test read, the search scores
    the final model it had chosen: it does not choose again."""
    csv = make_separable_dataset(tmp_path / "data", per_class=12, size=32)
    table = read_labels(csv)
    broken = table.paths("test")[0]
    good = broken.read_bytes()
    broken.write_bytes(good[:40])  # a truncated PNG
    storage = tmp_path / "runs"
    rc = search.main(search_argv(csv, _space(tmp_path), storage, "broken", "--num-samples", 3))
    err = error_line(capsys.readouterr().err)
    assert rc == 2
    assert "scoring the test split failed" in err and broken.name in err
    exp = storage / "broken"
    model, meta = load_artifact(exp / "best" / "model.pt")
    assert meta["classes"] == list(table.classes) and "test_accuracy" not in meta["metrics"]
    assert not (exp / "test_metrics.json").exists()
    record = (exp / "final.json").read_text()
    # the test split was opened once: a resume does not score it again, and says how to score deliberately
    assert search.main(["--resume", "--name", "broken", "--storage-path", str(storage)]) == 2
    err = error_line(capsys.readouterr().err)
    assert "began scoring the test split" in err and "python -m tune_rice evaluate" in err, err
    assert not (exp / "test_metrics.json").exists()

    # A search killed after its final model was saved, before the test read began, has no mark (removed
    # here to stand for that moment): fixed and resumed, it scores the final model it had chosen.
    (exp / "test_started.json").unlink()
    broken.write_bytes(good)
    monkeypatch.setattr(search.final, "choose_final", lambda *a, **k: pytest.fail("chose the final model twice"))
    assert search.main(["--resume", "--name", "broken", "--storage-path", str(storage)]) == 0
    capsys.readouterr()
    assert (exp / "final.json").read_text() == record  # the recorded choice, read back unchanged
    again, meta = load_artifact(exp / "best" / "model.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(again(x), model(x))
    test = json.loads((exp / "test_metrics.json").read_text())
    assert test["members"] == json.loads(record)["members"] and meta["metrics"]["test_accuracy"] == test["accuracy"]


@pytest.mark.slow
def test_uri_storage_keeps_everything_there_and_guards_the_name(ray_local, labels, tmp_path, monkeypatch, capsys):
    """``--storage-path`` as a URI (s3://, gs://; file:// here, through the same pyarrow file systems): the
    outputs reach it, and a later job in a fresh working directory (``ray job submit`` gives each job its
    own) sees the experiment there: the same --name is refused, --resume of a finished one too."""
    remote = tmp_path / "bucket"
    uri = f"file://{remote}/tune-rice"
    first, second = tmp_path / "job1", tmp_path / "job2"
    first.mkdir()
    second.mkdir()
    monkeypatch.chdir(first)
    assert search.main(search_argv(labels, _space(tmp_path), uri, "u", "--num-samples", 2)) == 0
    out = capsys.readouterr().out
    exp = remote / "tune-rice" / "u"
    assert f"Results: {uri}/u\n" in out
    for name in (
        "results.csv",
        "test_metrics.json",
        "summary.txt",
        "timings.json",
        "search_args.json",
        "best/model.pt",
        "best/config.yaml",
    ):
        assert (exp / name).is_file(), name
    assert (first / "runs" / "u" / "best" / "model.pt").is_file()  # and the driver's local copy
    df = pd.read_csv(exp / "results.csv").query("kind == 'trial'")
    assert len(df) == 2 and all((exp / f"trial_{t}" / "result.json").is_file() for t in df["trial_id"])
    assert json.loads((exp / "test_metrics.json").read_text()) == json.loads(
        (first / "runs" / "u" / "test_metrics.json").read_text()
    )
    model, meta = load_artifact(exp / "best" / "model.pt")
    assert meta["classes"] == list(read_labels(labels).classes)

    monkeypatch.chdir(second)  # a new job: nothing local
    before = {p: p.stat().st_mtime_ns for p in exp.rglob("*") if p.is_file()}
    assert search.main(search_argv(labels, _space(tmp_path), uri, "u", "--num-samples", 2)) == 2
    err = capsys.readouterr().err
    assert f"{uri}/u already exists" in err and "--resume" in err
    assert search.main(["--resume", "--name", "u", "--storage-path", uri]) == 2
    captured = capsys.readouterr()
    assert "already finished" in captured.err and (exp / "summary.txt").read_text().strip() in captured.out
    assert {p: p.stat().st_mtime_ns for p in exp.rglob("*") if p.is_file()} == before  # nothing rewritten
    assert not (second / "runs").exists() or not any((second / "runs").rglob("*.pt"))


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "case",
    [
        "num_samples",
        "missing_data",
        "bad_space",
        "existing",
        "resume_unknown",
        "grace_period",
        "reduction_factor",
        "labels_elsewhere",
        "bad_uri",
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, labels, tmp_path, capsys):
    storage = tmp_path / "runs"
    space = _space(tmp_path)
    name, words = "x", []
    if case == "num_samples":
        argv, words = search_argv(labels, space, storage, name, "--num-samples", 0), ["--num-samples", ">= 1"]
    elif case == "missing_data":
        argv = search_argv(tmp_path / "no-such-folder", space, storage, name)
        words = [str(tmp_path / "no-such-folder"), "no such file"]
    elif case == "bad_space":
        space.write_text(space.read_text().replace("loguniform", "lognormal"))
        argv, words = search_argv(labels, space, storage, name), [str(space), "params.lr", "lognormal"]
    elif case == "existing":
        (storage / name / "trial_x").mkdir(parents=True)
        (storage / name / "results.csv").write_text("precious\n")
        argv, words = search_argv(labels, space, storage, name), ["already exists", "--resume"]
    elif case == "resume_unknown":
        argv, words = ["--resume", "--name", "nope", "--storage-path", str(storage)], ["nope", "--resume"]
        name = "nope"
    elif case == "labels_elsewhere":  # `prepare DATA --out meta/labels.csv` and no --data-root
        (tmp_path / "meta").mkdir()
        (tmp_path / "meta" / "labels.csv").write_bytes(labels.read_bytes())
        argv = search_argv(tmp_path / "meta" / "labels.csv", space, storage, name)
        words = ["48 of 48 listed images are not under", str(tmp_path / "meta"), "--data-root DATA_DIR"]
    elif case == "bad_uri":  # a scheme pyarrow has no file system for
        argv, words = (
            search_argv(labels, space, "foo://bucket/runs", name),
            ["--storage-path: cannot open foo://bucket/runs"],
        )
    elif case == "grace_period":
        argv, words = search_argv(labels, space, storage, name, "--grace-period", 5), ["--grace-period 5", "3 epochs"]
    else:
        argv, words = search_argv(labels, space, storage, name, "--reduction-factor", 1), ["--reduction-factor"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc = search.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if case == "existing":
        assert (storage / name / "results.csv").read_text() == "precious\n"


def test_a_search_without_data_says_first_that_it_runs_the_demo_set(tmp_path, capsys):
    (tmp_path / "runs" / "taken" / "results.csv").parent.mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "results.csv").write_text("precious\n")
    argv = ["--storage-path", str(tmp_path / "runs"), "--name", "taken", "--no-report"]
    assert search.main(argv) == 2  # stops at the taken name, before any data is made or read
    lines = capsys.readouterr().err.strip().splitlines()
    assert "no --data: this search runs on the bundled synthetic rice-leaf demo set" in lines[0]
    assert lines[-1].startswith("error: ") and "already exists" in lines[-1]
    assert search.main([*argv, "--data", str(tmp_path)]) == 2
    assert "demo" not in capsys.readouterr().err


def test_a_csv_of_images_is_prepared_once_and_a_later_change_is_said(tmp_path, caplog):
    labels = make_separable_dataset(tmp_path / "data", per_class=4, size=32)
    frame = pd.read_csv(labels)
    source = tmp_path / "data" / "train.csv"
    pd.DataFrame({"filename": frame["path"], "class": frame["label"]}).to_csv(source, index=False)
    prepared = search.resolve_data(str(source))
    assert prepared == source.with_name("train.labels.csv") and len(read_labels(prepared).frame) == 12
    written = prepared.stat().st_mtime_ns
    assert search.resolve_data(str(source)) == prepared and prepared.stat().st_mtime_ns == written  # reused
    os.utime(source, ns=(written + 10**9, written + 10**9))
    caplog.clear()
    assert search.resolve_data(str(source)) == prepared
    assert "train.csv changed after train.labels.csv was prepared from it" in caplog.text


# ------------------------------------------------------------------------------------ last-stage tuning
def test_a_search_mixes_frozen_heads_and_last_stage_tuning(ray_local, labels, tmp_path):
    """Optuna and ASHA over frozen heads and trials tuning layer4 from a stage bank (docs/finetune.md):
    both kinds train, both reach the final choice, and test is read once."""
    space = tmp_path / "finetune.yaml"
    space.write_text(
        SPACE.format(metric="valid/acc", epochs=2, views=2)
        + "  tune_last_stage: {choice: [false, true]}\n  stage_lr_fraction: {loguniform: [0.05, 0.5]}\n"
    )
    storage = tmp_path / "runs"
    assert search.main(search_argv(labels, space, storage, "stage", "--num-samples", 2, "--seed", 1)) == 0
    exp = storage / "stage"
    df = pd.read_csv(exp / "results.csv")
    trials = df.query("kind == 'trial'")
    assert set(trials["config/tune_last_stage"]) == {False, True} and set(trials["status"]) == {"TERMINATED"}
    assert (df["kind"] == "probe").sum() == 1  # the probe fits the pooled bank only
    record = json.loads((exp / "final.json").read_text())
    tuned = set(trials.loc[trials["config/tune_last_stage"], "trial_id"])
    assert tuned & set(record["candidates"])
    test = json.loads((exp / "test_metrics.json").read_text())
    assert test["test_count"] == len(read_labels(labels).split("test"))
    _, meta = load_artifact(exp / "best" / "model.pt")
    stage_members = [m for m in meta["members"] if m["name"] in tuned]
    assert all(m["weights"] == f"random:seed=1+stage:{m['name']}" for m in stage_members)
