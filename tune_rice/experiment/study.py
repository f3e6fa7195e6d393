"""The searcher's Optuna study, kept in the experiment folder as Optuna's journal file.

The searcher (``tune_glue.PruningAwareOptunaSearch``) writes every trial it proposes into
``runs/<name>/optuna_journal.log``: its params, each epoch's value (Optuna's intermediate values) and its
end state (COMPLETE, PRUNED when ASHA or the time budget stopped it, FAIL when it errored). The file is
Optuna's own format, so ``optuna-dashboard runs/<name>/optuna_journal.log`` and ``optuna.load_study``
read it; the report reads it for the parameter importances. Nothing here imports Ray.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ..records import Direction

log = logging.getLogger(__name__)

STUDY_FILE = "optuna_journal.log"
# The user attribute that names the Ray Tune trial of each Optuna trial (trial_<id> in the folder).
TRIAL_ID_ATTR = "tune_trial_id"


def study_storage(exp_dir: str | Path):
    """The journal storage of the experiment in ``exp_dir`` (created on first write)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(Path(exp_dir).resolve() / STUDY_FILE)))


def load_study(exp_dir: str | Path):
    """The study kept in ``exp_dir``, or None when the experiment has none (made before it was kept)."""
    import optuna

    if not (Path(exp_dir) / STUDY_FILE).is_file():
        return None
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=None, storage=study_storage(exp_dir))
    finally:
        optuna.logging.set_verbosity(previous)


def close_unfinished(exp_dir: str | Path, *, reason: str) -> dict[str, int]:
    """Tell the study how trials that Tune ended without telling the searcher ended.

    Tune stops the running trials when it ends a run early (a stopper such as a time budget; it drops the
    ones it had not started) without calling the searcher, so their Optuna trials would stay RUNNING. A trial with
    epochs behind it is PRUNED (its value is its last epoch's, as for ASHA), one without is PRUNED with
    no value; the study's user attribute ``ended_early`` names both kinds and ``reason``. Returns how many
    of each there were.
    """
    from optuna.trial import TrialState

    study = load_study(exp_dir)
    if study is None:
        return {"cut": 0, "not_started": 0}
    numbers: dict[str, list[int]] = {"cut": [], "not_started": []}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        numbers["cut" if trial.intermediate_values else "not_started"].append(trial.number)
        study.tell(trial.number, state=TrialState.PRUNED)
    counts = {k: len(v) for k, v in numbers.items()}
    if any(counts.values()):
        study.set_user_attr("ended_early", {"reason": reason, **numbers})
        log.info(
            "optuna study: %d running trials cut and %d never started (%s)",
            counts["cut"],
            counts["not_started"],
            reason,
        )
    return counts


def best_values(study, mode: str) -> dict[int, float]:
    """Optuna trial number -> its best epoch's value (what results.csv calls best/<metric>), for the
    trials that ran at least one epoch and did not fail."""
    from optuna.trial import TrialState

    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        values = [v for v in t.intermediate_values.values() if v is not None and math.isfinite(v)]
        if values:
            out[t.number] = float(Direction(mode).best(values))
        elif t.value is not None and math.isfinite(t.value):
            out[t.number] = float(t.value)
    return out
