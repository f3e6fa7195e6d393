"""Search-space files: the bundled ones load, every mistake is one UserError naming the file and key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tune_rice import UserError
from tune_rice.experiment.space import FEATURE_PARAMS, SPACES_DIR, load_search_space, searchable_params

BASE = "params:\n  backbone: resnet18\n  image_size: 32\n"


def _write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_search_space(path)
    message = str(info.value)
    assert str(path) in message, message  # the file is named
    assert "\n" not in message, message  # one line
    return message


# ------------------------------------------------------------------------------------------ bundled
@pytest.mark.parametrize("name", ["default", "quick", "wide"])
def test_bundled_spaces_load_by_name_and_by_path(name):
    by_name = load_search_space(name)
    by_path = load_search_space(SPACES_DIR / f"{name}.yaml")
    assert by_name.path == by_path.path == (SPACES_DIR / f"{name}.yaml").resolve()
    assert by_name.metric == "valid/acc" and by_name.mode == "max"
    assert by_name.max_epochs and by_name.max_epochs >= 1
    assert "lr" in by_name.log_scaled
    assert by_name.searched and set(by_name.searched) <= set(searchable_params())
    assert by_name.feature_specs()


def test_quick_space_constants_and_distributions():
    space = load_search_space("quick")
    assert space.constants["backbone"] == "resnet18" and space.constants["image_size"] == 128
    assert space.distributions["lr"] == ("loguniform", [1e-3, 3e-2])
    assert space.distributions["hidden"] == ("choice", [0, 128, 256])
    assert space.bounds()["dropout"] == (0.0, 0.3)
    assert len(space.feature_specs()) == 1


def test_wide_space_gives_twelve_distinct_feature_specs():
    specs = load_search_space("wide").feature_specs(seed=3)
    assert len(specs) == 12
    assert len({s.name for s in specs}) == 12
    assert {s.backbone for s in specs} == {"resnet18", "resnet34", "resnet50"}
    assert {s.image_size for s in specs} == {160, 224}
    assert {s.feature_layer for s in specs} == {"pooled", "logits"}
    assert all(s.seed == 3 and s.views == 4 for s in specs)


@pytest.mark.parametrize("name", ["default", "quick", "wide"])
def test_tune_space_holds_only_domains_optuna_can_convert(name):
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical, Float, Integer

    space = load_search_space(name)
    param_space = space.tune_space()
    assert set(param_space) == set(space.constants) | set(space.distributions)
    for key, value in param_space.items():
        if key in space.distributions:
            assert isinstance(value, (Float, Integer, Categorical)), (key, value)
        else:
            assert isinstance(value, (str, int, float, bool)), (key, value)
    distributions = OptunaSearch.convert_search_space(param_space)  # what Tune does with param_space
    assert set(distributions) == set(space.distributions)  # constants are not Optuna's business
    searcher = OptunaSearch(space=distributions, metric=space.metric, mode=space.mode, seed=0)
    config = searcher.suggest("t0")
    assert set(config) == set(space.distributions)
    lo, hi = space.bounds()["lr"]
    assert lo <= config["lr"] <= hi


# --------------------------------------------------------------------------------------- numbers
def test_exponent_strings_are_numbers_and_randint_bounds_are_inclusive(tmp_path):
    path = _write(
        tmp_path,
        BASE + "  lr: {loguniform: [1e-4, 3e-2]}\n  weight_decay: {uniform: ['0', 1e-2]}\n"
        "  warmup_epochs: {randint: [0, 2]}\n",
    )
    space = load_search_space(path)
    assert space.distributions["lr"] == ("loguniform", [1e-4, 3e-2])
    assert space.distributions["weight_decay"] == ("uniform", [0.0, 1e-2])
    assert space.distributions["warmup_epochs"] == ("randint", [0, 2])
    domain = space.tune_space()["warmup_epochs"]
    assert {domain.sample() for _ in range(300)} == {0, 1, 2}  # 2 is included, nothing above


def test_choices_and_constants_are_typed_like_the_config(tmp_path):
    path = _write(
        tmp_path, BASE + "  lr: {choice: [1e-3, '3e-3']}\n  hidden: {choice: ['0', 64]}\n  weight_decay: 1e-5\n"
    )
    space = load_search_space(path)
    assert space.distributions["lr"] == ("choice", [1e-3, 3e-3])
    assert space.distributions["hidden"] == ("choice", [0, 64])
    assert space.constants["weight_decay"] == 1e-5 and isinstance(space.constants["weight_decay"], float)
    assert all(isinstance(v, float) for v in space.tune_space()["lr"].categories)


def test_space_metric_mode_and_constants(tmp_path):
    path = _write(tmp_path, "metric: valid/loss\nmax_epochs: 3\n" + BASE + "  hidden: {choice: [0, 32]}\n")
    space = load_search_space(path)
    assert (space.metric, space.mode, space.max_epochs) == ("valid/loss", "min", 3)
    assert space.constants == {"backbone": "resnet18", "image_size": 32}
    assert space.tune_space()["backbone"] == "resnet18"
    # --metric overrides the file's metric (higher is better); nothing else changes
    from tune_rice.experiment.space import with_metric

    f1 = with_metric(space, "macro_f1")
    assert (f1.metric, f1.mode, f1.max_epochs, f1.constants) == ("valid/macro_f1", "max", 3, space.constants)
    assert with_metric(space, None) is space
    with pytest.raises(UserError, match="valid choices are acc, macro_f1, balanced_acc"):
        with_metric(space, "loss")


@pytest.mark.parametrize("name", ["default", "quick", "zoo"])
def test_bundled_spaces_search_class_balancing_and_start_from_a_linear_head(name):
    from tune_rice.experiment.space import linear_point

    space = load_search_space(name)
    assert space.distributions["class_balanced"] == ("choice", [False, True])
    assert space.constants.get("min_steps") == (None if name == "quick" else 300)
    low = {n: space.distributions[n][1][0] for n in ("dropout", "label_smoothing")}
    assert linear_point(space) == {"hidden": 0, **low, "class_balanced": False}


def test_no_linear_point_where_the_space_has_no_linear_head(tmp_path):
    from tune_rice.experiment.space import linear_point

    assert linear_point(load_search_space(_write(tmp_path, BASE + "  hidden: {choice: [32, 64]}\n"))) == {}
    assert linear_point(load_search_space(_write(tmp_path, BASE + "  lr: {loguniform: [1.0e-3, 1.0e-2]}\n"))) == {}


# ---------------------------------------------------------------------------------------- errors
def test_missing_file_names_it_and_lists_bundled_spaces(tmp_path):
    with pytest.raises(UserError, match=r"nope\.yaml: search space file not found.*default.*quick.*wide"):
        load_search_space(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not found"):
        load_search_space("no-such-space")


def test_unknown_parameter_lists_the_valid_ones(tmp_path):
    message = _error(tmp_path, BASE + "  learning_rate: {loguniform: [1.0e-4, 1.0e-2]}\n")
    assert "params.learning_rate" in message and "unknown parameter" in message
    for name in ("lr", "hidden", "dropout", "backbone"):
        assert re.search(rf"\b{name}\b", message.split("valid:")[1]), message


def test_reserved_parameter_points_at_the_flag(tmp_path):
    message = _error(tmp_path, BASE + "  epochs: 5\n")
    assert "params.epochs" in message and "--max-epochs" in message


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("  lr: {normal: [0, 1]}\n", "params.lr", ["unknown distribution 'normal'", "loguniform", "choice"]),
        ("  lr: {uniform: [0.1, 0.01]}\n", "params.lr.uniform", ["low must be < high"]),
        ("  lr: {uniform: [0.1, 0.1]}\n", "params.lr.uniform", ["low must be < high"]),
        ("  lr: {loguniform: [0, 0.1]}\n", "params.lr.loguniform", ["> 0"]),
        ("  weight_decay: {loguniform: [-1.0e-3, 1.0e-2]}\n", "params.weight_decay.loguniform", ["> 0"]),
        ("  lr: {uniform: [a, b]}\n", "params.lr.uniform", ["expected a number", "'a'"]),
        ("  lr: {uniform: [true, 1]}\n", "params.lr.uniform", ["expected a number"]),
        ("  lr: {uniform: [0.1]}\n", "params.lr.uniform", ["[low, high]"]),
        ("  lr: {uniform: 0.1}\n", "params.lr.uniform", ["non-empty list"]),
        ("  lr: {uniform: [0.01, 0.1], choice: [1]}\n", "params.lr", ["expected one of"]),
        ("  hidden: {uniform: [0, 1]}\n", "params.hidden", ["int", "randint"]),
        ("  optimizer: {uniform: [0, 1]}\n", "params.optimizer", ["str", "choice"]),
        ("  class_balanced: {randint: [0, 1]}\n", "params.class_balanced", ["bool", "choice"]),
        ("  batch_size: {loguniform: [16, 256]}\n", "params.batch_size", ["int", "randint"]),
        ("  warmup_epochs: {randint: [0, 2.5]}\n", "params.warmup_epochs.randint", ["whole numbers"]),
        ("  dropout: {uniform: [0.0, 1.5]}\n", "params.dropout.uniform", ["dropout must be in [0, 1)"]),
        ("  hidden: {choice: [0, many]}\n", "params.hidden.choice", ["'many'", "not a int"]),
        ("  optimizer: {choice: [adamw, adam]}\n", "params.optimizer.choice", ["optimizer must be one of"]),
        ("  lr: -1\n", "params.lr", ["lr must be > 0"]),
        ("  lr: {uniform: []}\n", "params.lr.uniform", ["non-empty list"]),
        ("  lr: {uniform: [0.01, .inf]}\n", "params.lr.uniform", ["finite"]),
    ],
)
def test_bad_parameter_names_file_and_key(tmp_path, text, key, words):
    message = _error(tmp_path, BASE + text)
    assert key in message, message
    for w in words:
        assert w in message, message


@pytest.mark.parametrize("name", FEATURE_PARAMS)
def test_feature_param_must_be_a_constant_or_a_choice(tmp_path, name):
    base = "params:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
    message = _error(tmp_path, base + f"  {name}: {{uniform: [1, 4]}}\n")
    assert f"params.{name}" in message and "feature bank" in message and "choice" in message


@pytest.mark.parametrize(
    "text, words",
    [
        ("params: [unclosed\n", ["not valid YAML"]),
        ("- just\n- a list\n", ["expected a mapping"]),
        ("", ["expected a mapping"]),
        ("metrics: valid/acc\n" + BASE, ["unknown top-level key", "'metrics'", "metric"]),
        ("metric: train/acc\n" + BASE, ["metric:", "'train/acc'", "valid/acc", "valid/loss"]),
        ("metric: valid/acc\nmode: maximize\n" + BASE, ["mode:", "'maximize'"]),
        ("max_epochs: 0\n" + BASE, ["max_epochs:", "whole number"]),
        ("max_epochs: 2.5\n" + BASE, ["max_epochs:", "whole number"]),
        ("params: [lr]\n", ["params:", "mapping"]),
        (BASE, ["nothing to search"]),
    ],
)
def test_bad_file_structure_names_the_file(tmp_path, text, words):
    message = _error(tmp_path, text)
    for w in words:
        assert w in message, message


def test_search_cli_reports_a_bad_space_as_one_line(tmp_path, capsys, separable):
    from tune_rice.search import run as search

    bad = _write(tmp_path, BASE + "  lr: {normal: [0, 1]}\n")
    rc = search.main(
        [
            "--data",
            str(separable),
            "--search-space",
            str(bad),
            "--storage-path",
            str(tmp_path / "runs"),
            "--name",
            "x",
            "--no-report",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and str(bad) in err and "params.lr" in err and "\n" not in err
    assert not (tmp_path / "runs" / "x").exists()  # nothing written for a search that never started
