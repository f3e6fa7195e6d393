"""Search spaces: plain YAML files, validated on load, turned into Ray Tune domains.

Only the distributions OptunaSearch can convert are accepted: ``uniform``, ``loguniform``, ``randint``,
``choice`` and constants. Parameters that change the feature bank (backbone, image size, head kind,
augmentation policy, views) must be constants or ``choice`` so every bank can be extracted before the
trials start.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from .. import UserError
from ..features.bank import FeatureSpec
from ..heads.engine import TrialConfig

# The repository's search_spaces/, reached through the package's link to it so that a wheel (which
# copies the linked files) finds them as well as a source tree or an editable install.
SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
METRICS = {"valid/acc": "max", "valid/macro_f1": "max", "valid/balanced_acc": "max", "valid/loss": "min"}
CLI_METRICS = ("acc", "macro_f1", "balanced_acc")  # --metric: what imbalanced sets are judged by
FEATURE_PARAMS = ("backbone", "image_size", "head", "aug_policy", "views", "tune_last_stage")
# Set by the command line, not by a space: the epoch budget and the seed.
RESERVED = ("epochs", "seed")
TOP_LEVEL_KEYS = ("metric", "mode", "max_epochs", "params", "description")


def searchable_params() -> tuple[str, ...]:
    return tuple(f for f in TrialConfig.fields() if f not in RESERVED)


def bundled_spaces() -> list[str]:
    """The names of the spaces that come with the package (the YAML files of ``SPACES_DIR``)."""
    return sorted(q.stem for q in SPACES_DIR.glob("*.yaml"))


def space_difference(before: dict, after: dict) -> list[str]:
    """How the space ``after`` differs from ``before`` (both :meth:`SearchSpace.record`), one phrase per
    change: ``lr: loguniform [0.001, 0.03] -> loguniform [0.0001, 0.1]``, ``hidden: added``, ..."""

    def params(r: dict) -> dict:
        out = {n: repr(v) for n, v in r.get("constants", {}).items()}
        return {**out, **{n: f"{kind} {args}" for n, (kind, args) in r.get("distributions", {}).items()}}

    changes = [
        f"{k}: {before.get(k)} -> {after.get(k)}" for k in ("metric", "max_epochs") if before.get(k) != after.get(k)
    ]
    old, new = params(before), params(after)
    for name in sorted(set(old) | set(new)):
        if name not in new:
            changes.append(f"{name}: removed (was {old[name]})")
        elif name not in old:
            changes.append(f"{name}: added ({new[name]})")
        elif old[name] != new[name]:
            changes.append(f"{name}: {old[name]} -> {new[name]}")
    return changes


def resolve_space_path(name_or_path: str | os.PathLike) -> Path:
    """A file path, or the name of a bundled space (``quick`` or ``quick.yaml``)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p.resolve()
    for candidate in (SPACES_DIR / p.name, SPACES_DIR / f"{p.name}.yaml"):
        if not p.parent.parts and candidate.is_file():
            return candidate.resolve()
    bundled = ", ".join(bundled_spaces()) or "none found"
    raise UserError(f"{name_or_path}: search space file not found (bundled spaces: {bundled})")


@dataclass
class SearchSpace:
    path: Path
    metric: str
    mode: str
    max_epochs: int | None
    constants: dict = field(default_factory=dict)  # name -> value
    distributions: dict = field(default_factory=dict)  # name -> (kind, args)
    description: str = ""

    @property
    def searched(self) -> list[str]:
        return list(self.distributions)

    @property
    def log_scaled(self) -> set[str]:
        return {n for n, (kind, _) in self.distributions.items() if kind == "loguniform"}

    def bounds(self) -> dict:
        """Numeric bounds of the searched parameters, for edge-of-space checks."""
        return {n: tuple(args) for n, (kind, args) in self.distributions.items() if kind != "choice"}

    def record(self) -> dict:
        """What the trials are drawn from (the metric, the epochs, every parameter), as plain JSON values:
        kept in the experiment so that ``--extend`` can tell the same space from a changed one."""
        record = {
            "metric": self.metric,
            "mode": self.mode,
            "max_epochs": self.max_epochs,
            "constants": dict(sorted(self.constants.items())),
            "distributions": {n: [kind, list(args)] for n, (kind, args) in sorted(self.distributions.items())},
        }
        return json.loads(json.dumps(record))

    def tune_space(self) -> dict:
        """The ``param_space`` for ``tune.Tuner``: Tune domains and constants."""
        from ray import tune

        out = dict(self.constants)
        for name, (kind, args) in self.distributions.items():
            if kind == "uniform":
                out[name] = tune.uniform(*args)
            elif kind == "loguniform":
                out[name] = tune.loguniform(*args)
            elif kind == "randint":
                out[name] = tune.randint(args[0], args[1] + 1)  # YAML bounds are inclusive
            else:
                out[name] = tune.choice(list(args))
        return out

    def feature_specs(self, *, seed: int = 0) -> list[FeatureSpec]:
        """Every distinct feature bank this space can ask for (the product of feature-param choices)."""
        defaults = TrialConfig()
        axes = []
        for name in FEATURE_PARAMS:
            if name in self.distributions:
                axes.append(list(self.distributions[name][1]))
            else:
                axes.append([self.constants.get(name, getattr(defaults, name))])
        specs = []
        for backbone, size, head, policy, views, stage in itertools.product(*axes):
            cfg = TrialConfig(
                backbone=backbone, image_size=int(size), head=head, aug_policy=policy, views=int(views), seed=seed
            )
            # a stage bank comes with the pooled bank of the same backbone: the linear probe's baseline
            wanted = [cfg, replace(cfg, tune_last_stage=True)] if stage else [cfg]
            for spec in (c.feature_spec() for c in wanted):
                if spec not in specs:
                    specs.append(spec)
        return specs


def _number(path: Path, key: str, value):
    # PyYAML reads "1e-4" as a string (YAML 1.1 wants "1.0e-4"); accept it as the number it means.
    if isinstance(value, bool):
        raise UserError(f"{path}: {key}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise UserError(f"{path}: {key}: expected a number, got {value!r}")


def _check_value(path: Path, key: str, name: str, value):
    """Check one concrete value by building a TrialConfig with it (reuses the config's own checks).

    Returns the value as the config types it (``"1e-3"`` -> 0.001), so trials, Optuna and results.csv
    see numbers, not strings.
    """
    try:
        return getattr(TrialConfig.from_dict({name: value}), name)
    except UserError as e:
        raise UserError(f"{path}: {key}: {e}") from None


def load_search_space(name_or_path: str | os.PathLike) -> SearchSpace:
    """Read and validate a search-space YAML file; errors name the file and the key in one line."""
    path = resolve_space_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with 'params:' at the top level")
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown top-level key(s) {unknown}; valid: {', '.join(TOP_LEVEL_KEYS)}")
    metric = raw.get("metric", "valid/acc")
    if metric not in METRICS:
        raise UserError(f"{path}: metric: {metric!r} is not one of {', '.join(METRICS)}")
    mode = raw.get("mode", METRICS[metric])
    if mode not in ("min", "max"):
        raise UserError(f"{path}: mode: {mode!r} must be 'min' or 'max'")
    max_epochs = raw.get("max_epochs")
    if max_epochs is not None and (isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1):
        raise UserError(f"{path}: max_epochs: expected a whole number >= 1, got {max_epochs!r}")
    params = raw.get("params") or {}
    if not isinstance(params, dict):
        raise UserError(f"{path}: params: expected a mapping of parameter names")
    valid = searchable_params()
    space = SearchSpace(
        path=path, metric=metric, mode=mode, max_epochs=max_epochs, description=str(raw.get("description", ""))
    )
    for name, spec in params.items():
        _add_param(space, path, name, spec, valid)
    if not space.distributions:
        raise UserError(f"{path}: params: nothing to search (every parameter is a constant)")
    heads = space.distributions.get("head", ("choice", [space.constants.get("head", "pooled")]))[1]
    stages = space.distributions.get("tune_last_stage", ("choice", [space.constants.get("tune_last_stage", False)]))[1]
    if "seed" in heads and any(stages):
        raise UserError(
            f"{path}: tune_last_stage trains the stage under a pooled head; a space with it takes head: pooled"
        )
    try:
        space.feature_specs()  # every backbone, weights name and image size it can ask for exists and fits
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return space


def _add_param(space: SearchSpace, path: Path, name: str, spec, valid) -> None:
    """One entry of ``params:`` checked and added to ``space`` (a constant or a distribution)."""
    key = f"params.{name}"
    if name not in valid:
        hint = " (set by --max-epochs / --seed)" if name in RESERVED else ""
        raise UserError(f"{path}: {key}: unknown parameter{hint}; valid: {', '.join(valid)}")
    if not isinstance(spec, dict):
        space.constants[name] = _check_value(path, key, name, spec)
        return
    if len(spec) != 1:
        raise UserError(f"{path}: {key}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}")
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        raise UserError(f"{path}: {key}: unknown distribution {kind!r}; valid: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise UserError(f"{path}: {key}.{kind}: expected a non-empty list")
    if kind == "choice":
        space.distributions[name] = (kind, [_check_value(path, f"{key}.choice", name, v) for v in args])
        return
    if name in FEATURE_PARAMS:
        raise UserError(
            f"{path}: {key}: a parameter that changes the feature bank must be a constant or a choice, not {kind}"
        )
    if len(args) != 2:
        raise UserError(f"{path}: {key}.{kind}: expected [low, high], got {args!r}")
    kind_type = type(getattr(TrialConfig(), name))
    if kind_type is not float and kind != "randint" or kind_type not in (int, float):
        hint = "randint" if kind_type is int else "choice"
        raise UserError(f"{path}: {key}: {name} is a {kind_type.__name__}; use {hint}, not {kind}")
    lo, hi = (_number(path, f"{key}.{kind}", v) for v in args)
    if not lo < hi:
        raise UserError(f"{path}: {key}.{kind}: low must be < high, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise UserError(f"{path}: {key}.loguniform: bounds must be > 0, got [{lo}, {hi}]")
    if kind == "randint":
        if not (float(lo).is_integer() and float(hi).is_integer()):
            raise UserError(f"{path}: {key}.randint: bounds must be whole numbers, got [{lo}, {hi}]")
        lo, hi = int(lo), int(hi)
    for v in (lo, hi):
        _check_value(path, f"{key}.{kind}", name, v)
    if not all(math.isfinite(float(v)) for v in (lo, hi)):
        raise UserError(f"{path}: {key}.{kind}: bounds must be finite")
    space.distributions[name] = (kind, [lo, hi])


def with_metric(space: SearchSpace, metric: str | None) -> SearchSpace:
    """``space`` optimising ``valid/<metric>`` (``--metric``: acc, macro_f1 or balanced_acc; higher is
    better) instead of the metric its file names; unchanged when ``metric`` is empty."""
    if not metric:
        return space
    if metric not in CLI_METRICS:
        raise UserError(f"--metric {metric!r}: valid choices are {', '.join(CLI_METRICS)}")
    return replace(space, metric=f"valid/{metric}", mode="max")


def linear_point(space: SearchSpace) -> dict:
    """The searched parameters of a linear head, the probe's model trained by the trial's optimiser:
    ``hidden`` 0 with the lowest dropout and label smoothing and no class weights the space allows, on
    the frozen backbone where ``tune_last_stage`` is searched (the rest left to the searcher). Every search tries it first, so the best trial is never worse than the
    space's own linear head. Empty when ``hidden`` is not searched or 0 is not among its choices."""
    d = space.distributions
    kind, args = d.get("hidden", (None, None))
    if kind != "choice" or 0 not in args:
        return {}
    point: dict = {"hidden": 0}
    for name in ("dropout", "label_smoothing"):
        if name in d:
            kind, args = d[name]
            point[name] = min(args) if kind == "choice" else args[0]
    if "class_balanced" in d and False in d["class_balanced"][1]:
        point["class_balanced"] = False
    if "tune_last_stage" in d and False in d["tune_last_stage"][1]:
        point["tune_last_stage"] = False  # the probe's model is a head on the frozen backbone
    return point
