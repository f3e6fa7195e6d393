"""The search's settings as one typed record, built once from the command line or from Python.

:class:`SearchConfig` is what ``search.run_search`` and its phases take (in the spirit of Ray Tune's
``TuneConfig``/``RunConfig``): one field per ``tune-rice search`` option, named as the option is with
dashes as underscores (``--num-samples`` is ``num_samples``), with the option's default. The command line
builds it from argparse (``search.parse_config``); ``tune_rice.search(...)`` builds it from keyword
arguments (:meth:`SearchConfig.from_options`); ``--resume`` and ``--extend`` restore it from the
experiment's ``search_args.json`` (:meth:`SearchConfig.restore`). Nothing here imports Ray or torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import UserError

log = logging.getLogger(__name__)

# Old option names that still work, answered with the new one (the CLI, the Python API and saved arguments).
RENAMED = {"feature_cache": "bank"}
# Kept out of search_args.json: how this run was started, not how the experiment searches.
NOT_SAVED = ("resume", "extend", "verbose", "address")
# Never restored from search_args.json: the experiment is found by them (and the weights are checked).
NOT_RESTORED = ("name", "storage_path")
DEFAULT_ENSEMBLE = 5  # final.DEFAULT_ENSEMBLE, the same number (checked in tests/test_config.py)


def option(name: str) -> str:
    """A field's command-line spelling: ``num_samples`` -> ``--num-samples``."""
    return "--" + name.replace("_", "-")


@dataclass
class SearchConfig:
    """Every setting of a search. ``labels`` is filled in by the search (the labels.csv it read)."""

    # data
    data: str | None = None
    data_root: str | None = None
    path_col: str | None = None
    label_col: str | None = None
    # model
    search_space: str = "default"
    metric: str | None = None
    weights: str | None = None
    bank: str = "on"
    bank_cache: str | None = None
    # search
    num_samples: int = 30
    max_epochs: int | None = None
    grace_period: int = 2
    reduction_factor: float = 3
    cv: str = "off"
    ensemble: int = DEFAULT_ENSEMBLE
    seed: int = 0
    time_budget: str | None = None
    # resources
    gpus_per_trial: str = "auto"
    cpus_per_trial: float = 1.0
    max_concurrent: int = 0
    address: str | None = field(default_factory=lambda: os.environ.get("RAY_ADDRESS"))
    wait_for_gpus: float = 0
    # experiment and outputs
    storage_path: str = "runs"
    name: str | None = None
    resume: bool = False
    extend: int = 0
    log_to: list[str] | None = None  # experiment trackers: mlflow[=URI], wandb[=PROJECT]
    no_report: bool = False
    verbose: bool = False
    # filled in by the search
    labels: str | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, **options) -> SearchConfig:
        """A config from keyword arguments named as the fields; unknown names are one error naming them
        (with the closest valid names), old names (``feature_cache``) are taken with a warning; paths may
        be ``pathlib.Path``."""
        options = {renamed(k, where="option"): v for k, v in options.items()}
        unknown = sorted(set(options) - set(cls.names()) - {"labels"})
        if unknown:
            hints = [f"{u} (did you mean {', '.join(c)}?)" if (c := close_names(u)) else u for u in unknown]
            raise UserError(f"unknown search option(s): {'; '.join(hints)}; valid: {', '.join(cls.names()[:-1])}")
        return cls(**{k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()})

    def saved(self) -> dict:
        """What search_args.json keeps, with paths made absolute (``--resume`` may run elsewhere)."""
        if self.data is not None:
            self.data = str(Path(self.data).expanduser().resolve())
        if self.data_root is not None:
            self.data_root = str(Path(self.data_root).expanduser().resolve())
        if Path(self.search_space).expanduser().is_file():
            self.search_space = str(Path(self.search_space).expanduser().resolve())
        if self.weights not in (None, "auto", "imagenet", "none") and Path(self.weights).expanduser().is_file():
            self.weights = str(Path(self.weights).expanduser().resolve())
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_SAVED}

    def restore(self, saved: dict) -> None:
        """Take the settings of search_args.json (all but the experiment's name and storage path)."""
        for key, value in saved.items():
            key = RENAMED.get(key, key)  # arguments saved before an option was renamed
            if key in self.names() and key not in NOT_RESTORED and key not in NOT_SAVED:
                setattr(self, key, value)

    def validate(self) -> None:
        """Every value checked before anything starts: one line naming the option."""
        for name, low in (("num_samples", 1), ("grace_period", 1), ("ensemble", 1), ("reduction_factor", 2)):
            if getattr(self, name) < low:
                raise UserError(f"{option(name)} must be >= {low}, got {getattr(self, name)}")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise UserError(f"--max-epochs must be >= 1, got {self.max_epochs}")
        if self.cpus_per_trial <= 0:
            raise UserError(f"--cpus-per-trial must be > 0, got {self.cpus_per_trial}")
        if self.max_concurrent < 0:
            raise UserError(f"--max-concurrent must be >= 0, got {self.max_concurrent}")
        if self.extend < 0:
            raise UserError(f"--extend must be >= 1 (trials to add), got {self.extend}")
        if self.bank not in ("on", "off"):
            raise UserError(f"--bank must be on or off, got {self.bank!r}")
        self._validate_gpus()
        if self.time_budget is not None:
            parse_duration(self.time_budget, what="--time-budget")
        self._validate_experiment()
        from ..heads.cv import resolve_folds

        resolve_folds(self.cv, 0)  # a bad value is one line before anything starts
        if isinstance(self.log_to, str):  # tune_rice.search(log_to="mlflow")
            self.log_to = [self.log_to]
        from .tracking import parse_log_to

        parse_log_to(self.log_to)  # unknown or not installed: one line, before any work
        if self.bank != "on" and self.cv not in ("off", "auto"):
            raise UserError("--cv needs the feature bank: it trains K heads per trial on it (drop --bank off)")

    def _validate_gpus(self) -> None:
        if self.gpus_per_trial == "auto":
            return
        try:
            g = float(self.gpus_per_trial)
        except ValueError:
            raise UserError(f"--gpus-per-trial must be 'auto' or a number, got {self.gpus_per_trial!r}") from None
        if g < 0 or not math.isfinite(g):
            raise UserError(f"--gpus-per-trial must be >= 0, got {self.gpus_per_trial}")

    def _validate_experiment(self) -> None:
        if self.resume and not self.name:
            raise UserError("--resume needs --name of the experiment to continue")
        if self.extend and not self.name:
            raise UserError("--extend needs --name of the finished experiment to grow")
        if self.extend and self.resume:
            raise UserError(
                "--extend and --resume: --resume continues an interrupted search, --extend grows a finished one"
            )


def renamed(name: str, *, where: str) -> str:
    """``name``, or its new name when it is an old one (with a warning saying the new name)."""
    new = RENAMED.get(name)
    if new is None:
        return name
    if where == "option":
        log.warning("search option %r is now called %r (the old name still works)", name, new)
    return new


def close_names(name: str) -> list[str]:
    return difflib.get_close_matches(name, SearchConfig.names(), n=2, cutoff=0.6)


def parse_duration(text: str, *, what: str) -> float:
    """``2h``, ``90m``, ``40s`` or plain seconds (``1.5h`` too) -> seconds, > 0."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0}
    t = str(text).strip().lower()
    scale = units.get(t[-1:], None)
    try:
        seconds = float(t[:-1] if scale else t) * (scale or 1.0)
    except ValueError:
        raise UserError(f"{what} {text!r}: expected a duration such as 2h, 90m, 40s or a number of seconds") from None
    if not (seconds > 0 and math.isfinite(seconds)):
        raise UserError(f"{what} {text!r}: must be a positive duration")
    return seconds
