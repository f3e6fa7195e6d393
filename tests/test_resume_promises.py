"""What --resume and the test read promise, checked without running trials: the same backbone weights
as at the start (or a refusal), one test read (a durable mark before it, no second score on resume), test
results on a URI storage path as soon as they exist, and every randomly initialised backbone flagged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import torchvision
from conftest import SMALL_SPACE, error_line, search_argv

from tune_rice import UserError
from tune_rice.experiment import storage
from tune_rice.features.model import hub_weights_file, load_artifact, resolve_weights
from tune_rice.heads.engine import TrialConfig
from tune_rice.search import results, tune_glue
from tune_rice.search import run as search
from tune_rice.search.summary import format_summary
from tune_rice.tools import evaluate, report

pytest_plugins = ["helpers_artifacts"]


def _no_ray(monkeypatch):
    monkeypatch.setattr(tune_glue, "init_ray", lambda address: pytest.fail("Ray started"))


def _started_experiment(
    tmp_path: Path, labels: Path, weights_arg: str, recorded: dict[str, str], storage_path: str | None = None
) -> tuple[str, Path]:
    """An interrupted search's folder as the search leaves it when it starts: search_args.json with the
    resolved weights. Returns (storage path, local experiment folder)."""
    (tmp_path / "space.yaml").write_text(SMALL_SPACE)
    storage_path = storage_path or str(tmp_path / "runs")
    config = search.parse_config(search_argv(labels, tmp_path / "space.yaml", storage_path, "r", weights=weights_arg))
    paths = storage.experiment_paths(storage_path, "r")
    storage.save_args(paths.local, config.saved(), weights=recorded)
    if paths.remote:
        storage.upload(paths.local, paths.ray_path)
    return storage_path, paths.local


def _one_line_error(capsys) -> str:
    return error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------ weights on resume
def test_resume_refuses_imagenet_weights_it_cannot_have(separable, tmp_path, monkeypatch, capsys):
    """Started with ImageNet weights; resumed where the torch cache lacks them (TUNE_RICE_OFFLINE, an
    empty TORCH_HOME): one line saying which file to put where, before Ray or any trial."""
    _no_ray(monkeypatch)
    w, cached = hub_weights_file("resnet18")
    where, _ = _started_experiment(tmp_path, separable, "auto", {"resnet18": f"imagenet:{w}"})
    assert search.main(["--resume", "--name", "r", "--storage-path", where]) == 2
    err = _one_line_error(capsys)
    assert f"imagenet:{w}" in err and str(cached) in err and "TORCH_HOME" in err, err


def test_resume_refuses_a_weights_file_that_changed(separable, tmp_path, monkeypatch, capsys):
    _no_ray(monkeypatch)
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(3)}, path)
    identity = resolve_weights("resnet18", str(path)).identity
    where, _ = _started_experiment(tmp_path, separable, str(path), {"resnet18": identity})
    torch.save({"w": torch.ones(3)}, path)  # replaced since the search started
    assert search.main(["--resume", "--name", "r", "--storage-path", where]) == 2
    err = _one_line_error(capsys)
    assert identity in err and f"put the file the search started with back at {path}" in err, err


def test_resume_keeps_random_weights_when_the_cache_now_has_imagenet(separable, tmp_path):
    """Started on random weights (`auto` with no cache); the cache has ImageNet weights by the resume:
    the trials go on with the random backbone they were trained on, not a pretrained one."""
    w, cached = hub_weights_file("resnet18")
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)  # what a download would have left
    assert resolve_weights("resnet18", "auto").identity == f"imagenet:{w}"
    where, exp = _started_experiment(tmp_path, separable, "auto", {"resnet18": "random:seed=0"})
    config = search.parse_config(["--resume", "--name", "r", "--storage-path", where])
    config.restore(storage.load_args(exp))
    space, _ = search.load_space(config)
    weights = search.backbone_weights(config, space.feature_specs(seed=0), storage.experiment_paths(where, "r"))
    assert {b: r.identity for b, r in weights.items()} == {"resnet18": "random:seed=0"}


def test_the_final_model_is_not_built_on_other_weights_than_its_heads_saw(tmp_path):
    from ray import tune

    from tune_rice.experiment.space import load_search_space

    (tmp_path / "ckpt").mkdir()
    torch.save(
        {"weights": "imagenet:ResNet18_Weights.IMAGENET1K_V1", "epoch": 2, "best": 0.9}, tmp_path / "ckpt" / "state.pt"
    )
    checkpoint = tune.Checkpoint.from_directory(tmp_path / "ckpt")
    result = SimpleNamespace(
        config={"lr": 0.01},
        error=None,
        metrics={"trial_id": "t1"},
        path=str(tmp_path / "t1"),
        metrics_dataframe=pd.DataFrame({"valid/acc": [0.9], "training_iteration": [2]}),
        best_checkpoints=[(checkpoint, {})],
        get_best_checkpoint=lambda metric, mode: checkpoint,
    )
    (tmp_path / "space.yaml").write_text(SMALL_SPACE)
    space = load_search_space(str(tmp_path / "space.yaml"))
    base = {"epochs": 2, "seed": 0, "backbone": "resnet18", "image_size": 32, "views": 1}
    with pytest.raises(UserError) as e:
        results.final_candidates([result], base, space, weights={"resnet18": resolve_weights("resnet18", "none")})
    assert "imagenet:ResNet18_Weights.IMAGENET1K_V1" in str(e.value) and "random:seed=0" in str(e.value)


# ---------------------------------------------------------------------------------------- the test read
def _winner(tiny_model) -> SimpleNamespace:
    """What score_winner uses of results.Winner, around the tiny trained model (``model``: the module)."""
    from tune_rice.data.images import preprocessing_spec
    from tune_rice.features.model import save_artifact

    model, meta = load_artifact(tiny_model.model_path)
    cfg = TrialConfig.from_dict(meta["config"])

    def save(folder: Path, extra_metrics: dict | None = None) -> Path:
        return save_artifact(
            folder / "model.pt",
            model,
            classes=meta["classes"],
            preprocessing=preprocessing_spec(cfg.image_size),
            weights="random:seed=0",
            config=cfg.to_dict(),
            metrics=extra_metrics or {},
        )

    return SimpleNamespace(
        model=model, fm=None, cfg=cfg, trial_id="t1", identity="random:seed=0", pretrained=False, save=save
    )


def test_a_resume_after_a_started_test_read_refuses_to_score_again(tiny_model, tmp_path, monkeypatch, capsys):
    """The mark is on disk and on the URI storage path before the first test image is read; a scoring
    that ends without a result (a bad image here; a kill does the same) leaves it, and --resume, from
    another job's empty working folder, refuses to score again and says how to score deliberately."""
    from tune_rice.data.images import read_labels

    _no_ray(monkeypatch)
    uri = f"file://{tmp_path / 'bucket'}"
    (tmp_path / "job1").mkdir()
    monkeypatch.chdir(tmp_path / "job1")
    where, exp = _started_experiment(tmp_path, tiny_model.labels_csv, "none", {"resnet18": "random:seed=0"}, uri)
    remote = tmp_path / "bucket" / "r"
    winner = _winner(tiny_model)
    winner.save(exp / "best")

    def score(fm, table, **_):
        assert json.loads((exp / storage.TEST_MARK).read_text())["trial_id"] == "t1"
        assert (remote / storage.TEST_MARK).read_bytes() == (exp / storage.TEST_MARK).read_bytes()
        assert (remote / "best" / "model.pt").is_file()  # the model that is being scored, beside the mark
        raise UserError("alpha_000.png: cannot decode")

    monkeypatch.setattr(results, "score_on_test", score)
    paths = storage.experiment_paths(where, "r")
    with pytest.raises(UserError, match="scoring the test split failed"):
        results.score_winner(winner, read_labels(tiny_model.labels_csv), paths)
    assert not (exp / "test_metrics.json").exists()

    monkeypatch.setattr(results, "score_on_test", lambda *a, **k: pytest.fail("the test split was scored again"))
    (tmp_path / "job2").mkdir()
    monkeypatch.chdir(tmp_path / "job2")
    assert search.main(["--resume", "--name", "r", "--storage-path", where]) == 2
    err = _one_line_error(capsys)
    assert "began scoring the test split" in err and "not scored again" in err, err
    assert f"python -m tune_rice evaluate --model {exp / 'best' / 'model.pt'} --data {tiny_model.labels_csv}" in err


def test_test_results_reach_the_storage_uri_as_soon_as_they_exist(tiny_model, tmp_path, monkeypatch):
    from tune_rice.data.images import read_labels

    monkeypatch.chdir(tmp_path)
    where, exp = _started_experiment(
        tmp_path, tiny_model.labels_csv, "none", {"resnet18": "random:seed=0"}, f"file://{tmp_path / 'bucket'}"
    )
    winner = _winner(tiny_model)
    winner.save(exp / "best")
    table = read_labels(tiny_model.labels_csv)
    monkeypatch.setattr(
        results,
        "score_on_test",  # the tiny model on the real test images
        lambda fm, table, **_: evaluate.evaluate_model(winner.model, table, "test", winner.cfg.image_size),
    )
    test = results.score_winner(winner, table, storage.experiment_paths(where, "r"))
    remote = tmp_path / "bucket" / "r"
    assert json.loads((remote / "test_metrics.json").read_text()) == test
    assert test["test_count"] == len(table.split("test"))
    assert load_artifact(remote / "best" / "model.pt")[1]["metrics"]["test_accuracy"] == test["accuracy"]
    assert list((remote / "test").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("record", ["test_metrics.json", storage.TEST_MARK])
def test_evaluate_on_test_says_it_is_a_second_look(tiny_model, tmp_path, capsys, record):
    exp = tmp_path / "runs" / "r"
    (exp / "best").mkdir(parents=True)
    shutil.copy(tiny_model.model_path, exp / "best" / "model.pt")
    (exp / record).write_text(json.dumps({"started": "2026-01-01T00:00:00+00:00"}))
    argv = [
        "--model",
        str(exp),
        "--data",
        str(tiny_model.labels_csv),
        "--out",
        str(tmp_path / "e.json"),
        "--num-workers",
        "0",
    ]
    assert evaluate.main(argv + ["--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "note: a second look at the test split" in out and record in out, out
    assert evaluate.main(argv + ["--split", "valid", "--force"]) == 0
    assert "second look" not in capsys.readouterr().out


# --------------------------------------------------------------------------------- random weights flags
def test_summary_flags_every_backbone_on_random_weights():
    df = pd.DataFrame({"trial_id": ["a", "b"], "status": ["TERMINATED"] * 2, "best/valid/acc": [0.9, 0.5]})
    kwargs = dict(metric="valid/acc", exp_dir=Path("runs/r"), seconds=1.0, phases={})
    text = format_summary(
        df,
        None,
        weights="imagenet:ResNet34_Weights.IMAGENET1K_V1",
        backbones={"resnet18": "random:seed=0", "resnet34": "imagenet:ResNet34_Weights.IMAGENET1K_V1"},
        **kwargs,
    )
    assert "1 of 2 backbones ran on RANDOMLY INITIALISED weights: resnet18 (random:seed=0)" in text, text
    assert "deployed model's backbone" not in text
    text = format_summary(
        df,
        None,
        weights="imagenet:ResNet34_Weights.IMAGENET1K_V1",
        backbones={"resnet34": "imagenet:ResNet34_Weights.IMAGENET1K_V1"},
        **kwargs,
    )
    assert "RANDOMLY" not in text


def test_report_flags_every_backbone_on_random_weights(tmp_path, fake_experiment):
    exp = fake_experiment(tmp_path, n_trials=8, n_errored=0, weights="imagenet:ResNet18_Weights.IMAGENET1K_V1")
    df = pd.read_csv(exp / "results.csv", dtype={"trial_id": str})
    df.loc[5:, "config/backbone"] = "resnet34"  # three trials of another backbone, on random weights
    df.loc[5:, "weights"] = "random:seed=0"
    df.to_csv(exp / "results.csv", index=False)
    assert report.main([str(exp)]) == 0
    md = (exp / "report" / "report.md").read_text()
    assert "**3 of 8 trials ran on randomly initialised backbones: resnet34 (`random:seed=0`, 3 trials).**" in md


def test_each_trials_tensorboard_run_names_its_weights(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class FakeTrial:  # what TrialScalars uses of a Tune trial
        def __init__(self, folder: Path, backbone: str):
            self.local_path, self.path, self.storage = str(folder), None, SimpleNamespace(storage_filesystem=None)
            self.config = {"backbone": backbone}

        def init_local_path(self):
            Path(self.local_path).mkdir(parents=True, exist_ok=True)

    texts = {}
    for backbone, weights in (("resnet18", "random:seed=0"), ("resnet34", "imagenet:ResNet34_Weights.IMAGENET1K_V1")):
        trial = FakeTrial(tmp_path / backbone, backbone)
        cb = tune_glue.tensorboard_callback_cls()()
        cb.log_trial_start(trial)
        for step in (1, 2):
            cb.log_trial_result(step, trial, {"epoch": step, "valid/acc": 0.5, "weights": weights})
        cb.log_trial_end(trial)
        acc = EventAccumulator(str(tmp_path / backbone), size_guidance={"tensors": 0})
        acc.Reload()
        texts[backbone] = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("weights/text_summary")]
    assert len(texts["resnet18"]) == 1 and "RANDOMLY INITIALISED (random:seed=0)" in texts["resnet18"][0]
    assert texts["resnet34"] == ["resnet34: imagenet:ResNet34_Weights.IMAGENET1K_V1"]


@pytest.mark.slow
def test_a_real_search_on_random_weights_says_so_everywhere(real_search):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    timings = json.loads((real_search / "timings.json").read_text())
    assert timings["weights"] == {"resnet18": "random:seed=0"} and timings["random_weights"] == ["resnet18"]
    assert "RANDOMLY INITIALISED" in (real_search / "summary.txt").read_text()
    df = pd.read_csv(real_search / "results.csv")
    for trial_dir in df.loc[df["kind"] == "trial", "trial_dir"]:
        acc = EventAccumulator(trial_dir, size_guidance={"tensors": 0})
        acc.Reload()
        texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("weights/text_summary")]
        assert texts and "RANDOMLY INITIALISED" in texts[0], trial_dir


def test_summary_names_the_linear_probe_when_it_was_the_single_best_beside_a_deployed_ensemble():
    df = pd.DataFrame({"trial_id": ["a", "b"], "status": ["TERMINATED"] * 2, "best/valid/acc": [0.9, 0.5]})
    kwargs = dict(metric="valid/acc", exp_dir=Path("runs/r"), seconds=1.0, phases={}, weights="random:seed=0")
    test = {"trial_id": "probe:bank", "deployed": "ensemble", "members": ["probe:bank", "a"], "accuracy": 0.8}
    test |= {"macro_f1": 0.7, "test_count": 5}
    for single_id, label in (("probe:bank", "linear probe"), ("a", "single best trial")):
        single = {"trial_id": single_id, "deployed": False, "accuracy": 0.6, "macro_f1": 0.5}
        text = format_summary(df, {**test, "single_best": single}, **kwargs)
        assert f"  {label} (same pass, not deployed): accuracy 0.6000, macro-F1 0.5000" in text, text
    # test figures with their intervals, and the paired comparison with the probe: reported, not chosen
    test |= {"accuracy_interval": [0.71, 0.87], "macro_f1_interval": [0.6, 0.79]}
    mcnemar = {"deployed_only": 14, "other_only": 6, "p_value": 0.115}
    compared = {"trial_id": "probe:bank", "accuracy": 0.75, "macro_f1": 0.7, "mcnemar": mcnemar}
    text = format_summary(df, {**test, "compared": {"probe": compared}}, **kwargs)
    assert "accuracy 0.8000 [0.71, 0.87], macro-F1 0.7000 [0.60, 0.79] on 5 images" in text, text
    assert (
        "  the linear probe (probe:bank) on test, same pass, not chosen on it: accuracy 0.7500, macro-F1 0.7000; "
        "the deployed model was right on 14 images it got wrong and wrong on 6 it got right (exact McNemar p = 0.115)"
    ) in text, text
