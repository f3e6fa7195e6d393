"""A finished search read back for the report: results.csv, the arguments, the search space, each trial's
history, final.json and test_metrics.json, as one :class:`Experiment`. Reads files only; no Ray."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .. import UserError
from ..experiment.space import METRICS, SearchSpace, load_search_space, with_metric
from ..records import ARGS_FILE, RESULTS_FILE, Direction, FinalRecord, TestMetrics, read_json

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    """What a finished search left on disk, read and cross-checked."""

    exp_dir: Path
    results: pd.DataFrame  # results.csv, sorted best first; trial_id as str
    metric: str
    mode: str
    max_epochs: int | None
    space: SearchSpace | None
    args: dict = field(default_factory=dict)
    test: TestMetrics | None = None  # test_metrics.json: the one read of the test split
    histories: dict = field(default_factory=dict)  # trial_id -> progress.csv frame
    final: FinalRecord | None = None  # final.json: how the deployed model was chosen and calibrated on valid
    probes: pd.DataFrame = field(default_factory=pd.DataFrame)  # results.csv rows of kind "probe"

    @property
    def key(self) -> str:
        return f"best/{self.metric}"

    @property
    def searched(self) -> list[str]:
        if self.space is not None:
            return [p for p in self.space.searched if f"config/{p}" in self.results]
        # Space file gone (moved experiment): every config column that varies was searched.
        return [
            c[len("config/") :]
            for c in self.results.columns
            if c.startswith("config/") and self.results[c].nunique(dropna=True) > 1
        ]

    def status(self, row) -> str:
        if row.get("status") == "ERROR":
            return "errored"
        return "stopped early" if _truthy(row.get("stopped_early")) else "completed"

    @property
    def weights(self) -> str:
        # test_metrics.json's "weights": the backbone identity (files written before "member_weights" held the
        # ensemble's member weights there, a list; then the trials' rows say where the numbers came from)
        if self.test and isinstance(self.test.weights, str):
            return self.test.weights
        if "weights" in self.results and self.results["weights"].notna().any():
            return str(self.results["weights"].dropna().iloc[0])
        return str(self.args.get("weights", "unknown"))

    def trials_by_weights(self) -> dict[tuple[str, str], int]:
        """(backbone, weights identity) -> number of trials, from results.csv."""
        df = self.results
        if "weights" not in df:
            return {}
        backbone = df["config/backbone"] if "config/backbone" in df else pd.Series("backbone", index=df.index)
        pairs = pd.DataFrame({"backbone": backbone.astype(str), "weights": df["weights"]}).dropna()
        return {(b, str(w)): int(n) for (b, w), n in pairs.value_counts(sort=False).sort_index().items()}


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value) and not (isinstance(value, float) and math.isnan(value))


def _read_history(trial_dir: Path) -> pd.DataFrame | None:
    """A trial's results, one row per epoch: its result.json (a JSON object a line), else progress.csv.

    After ``--resume``, Tune appends to a restored trial's progress.csv with the columns of its first new
    result under the old header (one column fewer shifts the rest), while result.json stays sound. An
    epoch run again after a restore is listed twice; the later row is kept.
    """
    rows = []
    if (trial_dir / "result.json").is_file():
        for line in (trial_dir / "result.json").read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a killed driver
                continue
            if isinstance(row, dict):
                rows.append({k: v for k, v in row.items() if k != "config"})
    if rows:
        hist = pd.DataFrame(rows)
    elif (trial_dir / "progress.csv").is_file():
        try:
            hist = pd.read_csv(trial_dir / "progress.csv")
        except (pd.errors.ParserError, pd.errors.EmptyDataError):
            return None
    else:
        return None
    if "training_iteration" in hist:
        hist = hist.drop_duplicates("training_iteration", keep="last").reset_index(drop=True)
    return hist


def _trial_dir(exp_dir: Path, row) -> Path | None:
    """The trial's folder: under ``exp_dir`` first (the experiment may have moved), then as recorded."""
    candidates = []
    recorded = row.get("trial_dir")
    if isinstance(recorded, str) and recorded:
        candidates += [exp_dir / Path(recorded).name, Path(recorded)]
    candidates.append(exp_dir / f"trial_{row['trial_id']}")
    return next((c for c in candidates if c.is_dir()), None)


def load_experiment(exp_dir: str | os.PathLike) -> Experiment:
    exp_dir = Path(exp_dir).expanduser().resolve()
    csv = exp_dir / RESULTS_FILE
    if not exp_dir.is_dir():
        raise UserError(f"{exp_dir}: no such experiment folder")
    if not csv.is_file():
        raise UserError(
            f"{exp_dir}: no results.csv (not a finished tune-rice search; runs/<name> after "
            "`python -m tune_rice.search` finishes)"
        )
    try:
        results = pd.read_csv(csv, dtype={"trial_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise UserError(f"{csv}: not a readable CSV ({e})") from None
    if results.empty or "trial_id" not in results:
        raise UserError(f"{csv}: no trials in it")
    probes = pd.DataFrame()
    if "kind" in results:  # the linear-probe baseline has rows of its own kind; the rest are trials
        probes = results[results["kind"] == "probe"].reset_index(drop=True)
        results = results[results["kind"] != "probe"].reset_index(drop=True)
    args = read_json(exp_dir / ARGS_FILE) or {}
    space = None
    if args.get("search_space"):
        try:
            space = with_metric(load_search_space(args["search_space"]), args.get("metric"))
        except UserError as e:
            log.warning("search space not readable (%s): bounds and scales are guessed from results.csv", e)
    if space is not None:
        metric, mode = space.metric, space.mode
    else:
        keys = [c[len("best/") :] for c in results.columns if c.startswith("best/")]
        metric = keys[0] if keys else "valid/acc"
        mode = METRICS.get(metric, "max")
    max_epochs = args.get("max_epochs") or (space.max_epochs if space else None)
    if not max_epochs:  # search's own default, unless the space that might have set it is gone
        ran = pd.to_numeric(results.get("epochs"), errors="coerce") if "epochs" in results else None
        max_epochs = 10 if space is not None or ran is None or ran.isna().all() else int(ran.max())
    exp = Experiment(
        exp_dir,
        results,
        metric,
        mode,
        int(max_epochs),
        space,
        args,
        TestMetrics.read(exp_dir),
        final=FinalRecord.read(exp_dir),
        probes=probes,
    )
    if exp.key in results:
        exp.results = results.sort_values(
            exp.key, ascending=Direction(mode).ascending, na_position="last", kind="stable"
        ).reset_index(drop=True)
    for _, row in exp.results.iterrows():
        d = _trial_dir(exp_dir, row)
        hist = _read_history(d) if d is not None else None
        if hist is None:
            continue
        if metric in hist and not hist.empty:
            x = "training_iteration" if "training_iteration" in hist else "epoch"
            exp.histories[row["trial_id"]] = hist.assign(_epoch=hist[x].astype(int))
    return exp


def match_choice(value, choices):
    """The choice a CSV cell stands for (pandas reads 0 as 0, 0.0 or '0'; True as True or 'True')."""
    for c in choices:
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            try:
                if not isinstance(value, bool) and float(value) == float(c):
                    return c
            except (TypeError, ValueError):
                pass
        if str(c).strip().lower() == str(value).strip().lower():
            return c
    return None


def param_kind(exp: Experiment, name: str) -> tuple[str, list | tuple]:
    """(``log`` | ``linear`` | ``int`` | ``choice``, bounds or choices)."""
    if exp.space is not None and name in exp.space.distributions:
        kind, args = exp.space.distributions[name]
        if kind == "choice":
            return "choice", list(args)
        return {"loguniform": "log", "uniform": "linear", "randint": "int"}[kind], tuple(args)
    col = exp.results[f"config/{name}"].dropna()
    numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
    if numeric and col.nunique() > 5:  # a handful of distinct numbers was most likely a choice
        lo, hi = float(col.min()), float(col.max())
        # A guess without the space file: values spread over two decades or more were drawn log-uniformly.
        return ("log" if lo > 0 and hi / lo >= 100 else "linear"), (lo, hi)
    return "choice", sorted(col.unique(), key=float if numeric else str)


def plain(value):
    return value.item() if hasattr(value, "item") else value
