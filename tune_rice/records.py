"""The experiment folder's files, each name spelled once, and the typed records read from them.

As Ray Tune spells its result files once (``ray/tune/result.py``) and Optuna hands out ``FrozenTrial``
rather than dicts: every module that writes or reads ``runs/<name>/final.json`` or ``test_metrics.json``
goes through :class:`FinalRecord` and :class:`TestMetrics` (``read`` and ``write``), and names the
other files by the constants below. Also the two small types
every layer shares: the search metric's :class:`Direction` and the :func:`cache_root`.

Imports nothing from the package, so any module may use it.
"""

from __future__ import annotations

import enum
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ the experiment's files
RESULTS_FILE = "results.csv"  # one row per trial, then one per linear probe (kind "probe")
ARGS_FILE = "search_args.json"  # the search's arguments, read back by --resume and the tools
FINAL_FILE = "final.json"  # how the final model was chosen and calibrated on valid
TEST_METRICS_FILE = "test_metrics.json"  # the one read of the test split
TEST_MARK = "test_started.json"  # written before the first test image is read
SUMMARY_FILE = "summary.txt"  # the console summary
TIMINGS_FILE = "timings.json"  # seconds per phase, per trial and per bank
BASELINE_FILE = "baseline.json"  # the search against the linear probe
BEST_DIR = "best"  # the deployed model's folder
MODEL_FILE = "model.pt"  # the model artifact inside BEST_DIR
MODEL_PATH = f"{BEST_DIR}/{MODEL_FILE}"
CONFIG_FILE = "config.yaml"  # the winner's configuration inside BEST_DIR
LABELS_FILE = "labels.csv"  # what prepare writes at the top of a data set


# ------------------------------------------------------------------------------- the metric's direction
class Direction(str, enum.Enum):
    """Whether a larger (``max``) or a smaller (``min``) value of the search metric is better. A ``str``
    enum: ``Direction("max")`` reads a space file's ``mode`` and compares equal to it."""

    MAX = "max"
    MIN = "min"

    @property
    def sign(self) -> float:
        """+1 for max, -1 for min: ``sign * value`` is larger for the better value."""
        return 1.0 if self is Direction.MAX else -1.0

    @property
    def ascending(self) -> bool:
        """Whether sorting best first is an ascending sort."""
        return self is Direction.MIN

    @property
    def optuna(self) -> Literal["maximize", "minimize"]:
        """Optuna's name: ``maximize`` or ``minimize``."""
        return "maximize" if self is Direction.MAX else "minimize"

    def better(self, a: float, b: float | None) -> bool:
        """Whether ``a`` is strictly better than ``b`` (anything beats ``None``)."""
        return b is None or (a > b if self is Direction.MAX else a < b)

    def best(self, values: Iterable[float]) -> float:
        """The best of ``values``."""
        return max(values) if self is Direction.MAX else min(values)

    def best_label(self, series: Any) -> Any:
        """The index label of the best value of a pandas Series (its first on ties)."""
        return series.idxmax() if self is Direction.MAX else series.idxmin()


# ------------------------------------------------------------------------------------------ the cache
def cache_root() -> Path:
    """tune-rice's cache folder: ``$TUNE_RICE_CACHE``, else ``~/.cache/tune_rice``; feature banks, the
    demo data sets, weights and measured sizes live in sub-folders of it."""
    base = os.environ.get("TUNE_RICE_CACHE")
    return Path(base).expanduser() if base else Path.home() / ".cache" / "tune_rice"


# ------------------------------------------------------------------------------------ typed records
R = TypeVar("R", bound="_Record")


@dataclass
class _Record:
    """A JSON file's record: its known keys as fields, any others kept in ``extra``. A record read from a
    file writes back the keys it was read with, in their order (no default is added to an older file)."""

    FILE: ClassVar[str]  # the file's name in the experiment folder

    extra: dict = field(default_factory=dict, repr=False)
    keys: tuple[str, ...] = field(default=(), repr=False, compare=False)  # as read; () for a new record

    @classmethod
    def read(cls: type[R], exp_dir: str | os.PathLike) -> R | None:
        """The record in ``exp_dir``, or None when it has none (or an unreadable one, with a warning)."""
        path = Path(exp_dir) / cls.FILE
        d = read_json(path)
        if d is not None and not isinstance(d, dict):
            log.warning("%s: not a JSON object; ignored", path)
            return None
        return None if d is None else cls.from_dict(d)

    def write(self, exp_dir: str | os.PathLike) -> Path:
        path = Path(exp_dir) / self.FILE
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_dict(cls: type[R], d: Mapping[str, Any]) -> R:
        known = {f.name for f in fields(cls)} - {"extra", "keys"}
        return cls(
            **{k: v for k, v in d.items() if k in known},
            extra={k: v for k, v in d.items() if k not in known},
            keys=tuple(d),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        out = {**{k: v for k, v in d.items() if k not in ("extra", "keys")}, **d["extra"]}
        return {k: out[k] for k in self.keys} if self.keys else out


@dataclass
class FinalRecord(_Record):
    """final.json: the deployed model's choice on valid (``tune_rice.heads.final.FinalChoice.to_dict``), the
    candidates' names, scores and settings, the ensemble size asked for and the seconds it took. Files
    from older versions may lack fields: they keep the defaults."""

    FILE = FINAL_FILE

    candidates: list[str] = field(default_factory=list)  # names, the leader first
    selection: dict = field(default_factory=dict)  # the greedy ensemble: members (names), weights, ...
    deployed: str = "single"  # "single" | "ensemble"
    members: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # the deployed members' weights
    temperature: float = 1.0
    single_temperature: float = 1.0
    ensemble_temperature: float = 1.0
    valid: dict = field(default_factory=dict)  # {"single": {...}, "ensemble": {...}, "deployed": {...}, ...}
    threshold: dict = field(default_factory=dict)
    reliability: dict = field(default_factory=dict)
    coverage: dict = field(default_factory=dict)
    metric: str = "valid/acc"
    mode: str = "max"
    lead: dict = field(default_factory=dict)  # the best trial against the linear probe
    candidate_temperatures: list[float] = field(default_factory=list)
    candidate_info: list[dict] = field(default_factory=list)  # per candidate: name, score, backbone, head, ...
    seconds: dict = field(default_factory=dict)
    k: int | None = None  # the ensemble size asked for


@dataclass
class TestMetrics(_Record):
    """test_metrics.json: the deployed model on the test split, read once. ``single_best``,
    ``ensemble`` and each of ``compared`` hold the same figures for the models scored beside it."""

    FILE = TEST_METRICS_FILE

    accuracy: float = float("nan")
    macro_f1: float = float("nan")
    loss: float = float("nan")
    test_count: int = 0
    classes: list[str] = field(default_factory=list)
    confusion_matrix: list[list[int]] = field(default_factory=list)
    per_class: dict = field(default_factory=dict)
    trial_id: str = ""
    weights: Any = None  # the backbone identity (older files: the ensemble's member weights, a list)
    pretrained: bool | None = None
    deployed: str = "single"
    members: list[str] = field(default_factory=list)
    member_weights: list[float] = field(default_factory=list)
    temperature: float | None = None
    single_best: dict | None = None
    ensemble: dict | None = None
    threshold: dict = field(default_factory=dict)
    compared: dict = field(default_factory=dict)


def read_json(path: str | os.PathLike) -> dict | None:
    """One of the experiment's other JSON files as a dict, or None when missing or unreadable (warned)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        log.warning("%s: not valid JSON (%s); ignored", path, e)
        return None
