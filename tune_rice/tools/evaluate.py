"""``python -m tune_rice evaluate``: score a trained model on a labelled split, or on every labelled image.

    python -m tune_rice evaluate --model runs/<name>/best/model.pt --data data/labels.csv --split test
    python -m tune_rice evaluate --model runs/<name>/best/model.pt --data new_field/     # class folders: all

The numbers and the JSON are those of a search's ``test_metrics.json`` (accuracy, macro_f1, loss,
test_count, classes, per_class{precision, recall, f1, support}, confusion_matrix with rows = true class),
computed the same way: the full model on the images, ``engine.predict_logits`` over ``ImageBatches`` with the
evaluation transform of the model's image size. ``test_count`` is the number of images scored, whatever
the split (the name is kept so both files read the same). The JSON goes to ``--out``
(default ``eval_<split>.json`` in the current folder); the search's own ``test_metrics.json`` is never
overwritten. Scoring a search's model on test again is a second look at the test split, and is said so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from .. import UserError, cli
from ..data.images import SPLITS, LabelTable, Preprocessing, is_labels_file, read_labels_checked
from ..devices import add_device_args, device_from_arg
from ..experiment import ledger
from ..features.model import LoadedModel, load_model
from ..heads.engine import ALL, metrics_record, split_logits
from ..records import BEST_DIR, LABELS_FILE, TEST_MARK, TEST_METRICS_FILE

log = logging.getLogger(__name__)


def resolve_labels(data: str | os.PathLike) -> Path:
    """``--data``: a labels.csv, or a folder holding one."""
    p = Path(data).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if (p / LABELS_FILE).is_file():
            return p / LABELS_FILE
        raise UserError(f"{p}: no labels.csv in this folder; write one with `python -m tune_rice prepare {p}`")
    raise UserError(f"--data {data}: no such file or folder")


def load_scored(
    data: str | os.PathLike,
    data_root: str | os.PathLike | None,
    split: str | None,
    *,
    path_col: str | None = None,
    label_col: str | None = None,
) -> tuple[LabelTable, str]:
    """--data as a table and the split to score (``split``, else test, or all for data with no split).

    A labels.csv (or a folder holding one) is read as the search reads it; a class-folder tree, a
    pre-split tree or a CSV of images is read as it is (nothing is written, nothing decoded yet); only
    a pre-split tree has a split, the others are scored with ``all``."""
    p = Path(data).expanduser()
    if (p.is_file() and is_labels_file(p)) or (p.is_dir() and (p / LABELS_FILE).is_file()):
        split = split or "test"
        splits = SPLITS if split == ALL else (split,)
        return read_labels_checked(resolve_labels(p), data_root, splits=splits), split
    if not p.exists():
        raise UserError(f"--data {data}: no such file or folder")
    from ..data.prepare import read_source

    scan = read_source(p, path_col=path_col, label_col=label_col, image_dir=data_root if p.is_file() else None)
    if scan.skipped:
        log.warning(
            "%s: %d file(s) not scored, e.g. %s",
            p,
            len(scan.skipped),
            "; ".join(f"{rel}: {reason}" for rel, reason in scan.skipped[:2]),
        )
    if not scan.candidates:
        raise UserError(
            f"{p}: no labelled images (expected a labels.csv, class folders, train/ valid/ test/ folders "
            "of them, or a CSV of image paths and labels)"
        )
    frame = pd.DataFrame(
        {
            "path": [c.rel for c in scan.candidates],
            "label": [c.label for c in scan.candidates],
            "split": [c.split or "" for c in scan.candidates],
            "group": "",
        }
    )
    table = LabelTable(
        frame=frame, root=scan.data_dir, classes=tuple(sorted(set(frame["label"]))), csv_path=p.resolve()
    )
    split = split or ("test" if scan.layout == "presplit" else ALL)
    if split != ALL and table.split(split).empty:
        what = "its split folders" if scan.layout == "presplit" else "a class folder or a CSV of images has no split"
        raise UserError(f"{p}: no {split} images ({what}); score every image with --split all")
    return table, split


def align_classes(table: LabelTable, model_classes: Sequence[str]) -> LabelTable:
    """``table`` with its targets indexed by the model's classes; every label must be one of them."""
    model_classes = tuple(model_classes)
    unknown = sorted(set(table.classes) - set(model_classes))
    if unknown:
        raise UserError(
            f"{table.csv_path}: its classes ({', '.join(table.classes)}) do not match the model's "
            f"({', '.join(model_classes)}); not known to the model: {', '.join(unknown)}"
        )
    if table.classes != model_classes:
        missing = sorted(set(model_classes) - set(table.classes))
        log.warning(
            "%s has no images of %s: scored on the model's classes, with support 0 for those",
            table.csv_path,
            ", ".join(missing),
        )
    return dataclasses.replace(table, classes=model_classes)


def evaluate_model(
    model: nn.Module,
    table: LabelTable,
    split: str,
    preprocessing: int | dict | Preprocessing,
    device: str | torch.device = "auto",
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
) -> dict:
    """Score ``model`` on the ``split`` images of ``table``; the dict of a search's test_metrics.json.

    ``table.classes`` must be the model's classes in the model's order (see :func:`align_classes`).
    """
    logits, y = split_logits(model, table, split, preprocessing, device, batch_size=batch_size, num_workers=num_workers)
    return metrics_record(logits, y, table.classes)


def evaluate_data(
    loaded: LoadedModel,
    data: str | os.PathLike | LabelTable,
    *,
    split: str | None = None,
    data_root: str | os.PathLike | None = None,
    path_col: str | None = None,
    label_col: str | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    num_workers: int | None = None,
) -> dict:
    """``loaded`` scored on ``data`` (see :func:`load_scored`): the record ``--out`` holds, with ``splits``
    (the splits scored) and, when the test split of a labels.csv was scored, that read in its ledger and
    ``test_reads`` (how many it holds now). ``data`` may be a table :func:`load_scored` returned, with its
    ``split``."""
    if isinstance(data, LabelTable):
        table, split = data, split or "test"
    else:
        table, split = load_scored(data, data_root, split, path_col=path_col, label_col=label_col)
    table = align_classes(table, loaded.classes)
    result = evaluate_model(
        loaded.module, table, split, loaded.preprocessing, device, batch_size=batch_size, num_workers=num_workers
    )
    scored = sorted(set(table.frame["split"]) if split == ALL else {split})
    record: dict = {"model": str(loaded.path), "data": str(table.csv_path), "split": split, "weights": loaded.weights}
    if "test" in scored and table.csv_path.is_file() and is_labels_file(table.csv_path):
        exp = loaded.path.parent.parent if loaded.path.parent.name == "best" else loaded.path.parent
        reads = ledger.record_test_read(table.csv_path, table.frame, tool="evaluate", experiment=exp, model=loaded.path)
        record["test_reads"] = reads
    return {**record, **result, "splits": scored}


def second_look(model_path: Path) -> str:
    """Why scoring a search's model on test is a second look at the test split ('' when it is not known to be).

    The search scores its model on test once (test_metrics.json) and marks the start of that read
    (test_started.json); either next to ``best/`` means the test images have been read for this model."""
    exp = model_path.parent.parent if model_path.parent.name == BEST_DIR else model_path.parent
    if (exp / TEST_METRICS_FILE).is_file():
        return (
            f"a second look at the test split: the search scored this model on it once already "
            f"({exp / TEST_METRICS_FILE}); that first score is the one to report"
        )
    if (exp / TEST_MARK).is_file():
        try:
            when = json.loads((exp / TEST_MARK).read_text()).get("started", "?")
        except ValueError:
            when = "?"
        return (
            f"a second look at the test split: the search began scoring this model on it at {when} "
            f"({exp / TEST_MARK}) and recorded no result; the test images may have been read, so a choice "
            "made after seeing this score is no longer tested on untouched data"
        )
    return ""


def format_metrics(result: dict, *, title: str = "") -> str:
    """Per-class precision/recall/F1/support, accuracy, macro-F1, loss and the confusion matrix as text."""
    classes = result["classes"]
    w = max(len("macro-F1"), *map(len, classes))
    lines = [title] if title else []
    lines.append(f"{'class':<{w}}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'support':>7}")
    for c in classes:
        m = result["per_class"][c]
        lines.append(f"{c:<{w}}  {m['precision']:>9.4f}  {m['recall']:>6.4f}  {m['f1']:>6.4f}  {m['support']:>7d}")
    lines.append(
        f"{'accuracy':<{w}}  {result['accuracy']:.4f}   macro-F1 {result['macro_f1']:.4f}   "
        f"loss {result['loss']:.4f}   images {result['test_count']}"
    )
    cm = np.asarray(result["confusion_matrix"])
    cw = max(5, *map(len, classes), len(str(cm.max() if cm.size else 0)))
    lines.append("")
    lines.append("confusion matrix (rows = true, columns = predicted):")
    lines.append(" " * w + "  " + " ".join(f"{c:>{cw}}" for c in classes))
    for c, row in zip(classes, cm):
        lines.append(f"{c:<{w}}  " + " ".join(f"{v:>{cw}d}" for v in row))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=os.environ.get("TUNE_RICE_PROG", "python -m tune_rice evaluate"),
        description="Score a trained tune-rice model on a labelled split: accuracy, macro-F1, per-class "
        "precision/recall/F1, confusion matrix (the metrics of the search's test_metrics.json).",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="runs/<name>/best/model.pt, an exported TorchScript file, or an experiment folder",
    )
    p.add_argument(
        "--data",
        required=True,
        help="a labels.csv or a dataset folder holding one; or, read as they are, a folder of class "
        "folders, a pre-split train/ valid/ test/ tree of them, or a CSV of image paths and labels",
    )
    p.add_argument(
        "--data-root",
        metavar="DIR",
        help="folder the labels.csv paths are relative to (default: the folder holding the labels.csv); "
        "for a CSV of images, their folder",
    )
    p.add_argument("--path-col", metavar="NAME", help="a CSV of images: its column of paths or ids (default: found)")
    p.add_argument("--label-col", metavar="NAME", help="a CSV of images: its column of labels (default: found)")
    p.add_argument(
        "--split",
        choices=(*SPLITS, ALL),
        default=None,
        help="which images to score: a split, or all of them (default: test; all for data with no split)",
    )
    p.add_argument(
        "--out", metavar="FILE", help="the JSON file to write (default: eval_<split>.json in the current folder)"
    )
    cli.add_force_arg(p, "--out")
    add_device_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.out and Path(args.out).name == TEST_METRICS_FILE:
        raise UserError(
            f"--out {args.out}: refusing to write {TEST_METRICS_FILE} (the search's own record of its "
            "one test read); choose another name"
        )
    device = device_from_arg(args.device)
    loaded = load_model(args.model, device=device)
    table, split = load_scored(args.data, args.data_root, args.split, path_col=args.path_col, label_col=args.label_col)
    out = Path(args.out) if args.out else Path(f"eval_{split}.json")
    cli.refuse_overwrite([out], args.force)  # before any image is read or any test read recorded
    record = evaluate_data(
        loaded,
        table,
        split=split,
        device=device,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    scored = set(record.pop("splits"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(format_metrics(record, title=f"{loaded.path} on {record['data']} [{split}]"))
    seen = sorted(scored & {"train", "valid"})
    if seen:
        print(
            f"note: the {' and '.join(seen)} images were seen while searching (train to fit, valid to "
            "choose); their score is optimistic"
        )
    if "test" in scored:
        second = second_look(loaded.path)
        if second:
            print(f"note: {second}")
        reads = ledger.reads_note(record.get("test_reads"), record["data"])
        if reads:
            print(f"note: {reads}")
    if loaded.weights.startswith("random:"):
        print(f"note: this model's backbone was RANDOMLY INITIALISED ({loaded.weights})")
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
