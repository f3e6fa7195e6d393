"""The test-read ledger: every scoring of a labels.csv's test split, one line each, kept beside it.

A test split answers honestly only the first time it is looked at: every later choice made after seeing
its score (another search, a widened space, a second model) fits the test split a little. The search, its
``--extend`` and ``evaluate`` (on ``--split test`` or ``all``) each append one line to
``<labels>.test_reads.csv`` next to the labels.csv (``labels.test_reads.csv``) when they score the test
images: the time, the tool, the experiment, the model and a digest of the test split (its paths and
labels), so that a re-prepared split starts its own count. Nothing here imports Ray or torch.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from datetime import datetime
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

SUFFIX = ".test_reads.csv"
COLUMNS = ("time", "tool", "experiment", "model", "test_images", "split_digest")


def ledger_path(labels_csv: str | os.PathLike) -> Path:
    """``data/labels.csv`` -> ``data/labels.test_reads.csv``."""
    p = Path(labels_csv)
    return p.with_name(p.stem + SUFFIX)


def split_digest(frame: pd.DataFrame) -> str:
    """A digest of the test split of a labels table (``path``, ``label``, ``split`` columns): the same for
    the same test images and labels, whatever the other splits or the row order."""
    test = frame[frame["split"] == "test"]
    rows = sorted(f"{p}\t{lab}" for p, lab in zip(test["path"].astype(str), test["label"].astype(str)))
    return hashlib.sha1("\n".join(rows).encode()).hexdigest()[:16]


def read_ledger(labels_csv: str | os.PathLike) -> pd.DataFrame:
    """The ledger's lines (no lines when there is none)."""
    path = ledger_path(labels_csv)
    if not path.is_file():
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def record_test_read(
    labels_csv: str | os.PathLike, frame: pd.DataFrame, *, tool: str, experiment: str | os.PathLike | None, model
) -> int | None:
    """Append one read of the test split of ``frame`` (the labels table read from ``labels_csv``) and
    return how many times this test split has now been read, this one included. A ledger that cannot be
    written costs a warning and returns None: the scores are saved already."""
    path = ledger_path(labels_csv)
    digest = split_digest(frame)
    row = {
        "time": datetime.now().astimezone().isoformat(timespec="seconds"),
        "tool": tool,
        "experiment": str(experiment or ""),
        "model": str(model),
        "test_images": int((frame["split"] == "test").sum()),
        "split_digest": digest,
    }
    try:
        new = not path.is_file()
        with open(path, "a", newline="") as f:  # one short append: whole lines, even from two writers
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)
    except OSError as e:
        log.warning("the test read was not recorded in %s (%s)", path, e)
        return None
    return int((read_ledger(labels_csv)["split_digest"] == digest).sum())


def reads_note(count: int | None, labels_csv: str | os.PathLike) -> str:
    """The line a person reads when the test split has been read more than once ('' otherwise)."""
    if not count or count < 2:
        return ""
    return (
        f"this test split has now been read {count} times ({ledger_path(labels_csv)}): its score after a "
        "choice made on an earlier read is no longer a score on unseen data"
    )
