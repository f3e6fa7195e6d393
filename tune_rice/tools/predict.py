"""``python -m tune_rice predict``: classify new images with a trained model.

    python -m tune_rice predict --model runs/<name>/best/model.pt photos/ more/leaf.jpg --out predictions.csv

The model is a search's ``best/model.pt`` (loaded with ``weights_only=True``: nothing in it can run code)
or a TorchScript file written by ``python -m tune_rice export`` (TorchScript holds its own graph code;
load only exports you trust). Images are preprocessed exactly as in
evaluation (the image size stored in the model, ``data.build_transform(train=False)``), batched, and run
in inference mode on the GPU when there is one. A file that will not decode is never a crash: it gets a
row with the ``error`` column filled and is listed in a "skipped" report.

CSV columns: ``path, label, score, top1_label, top1_score, ..., topK_label, topK_score, error``; ``score``
is the softmax probability of ``top1`` and ``label`` is ``top1`` itself, or ``uncertain`` with
``--min-confidence P`` when that probability is below P (the top-k columns are kept). A search's model
divides its logits by the temperature fitted on valid, so these probabilities are calibrated; the search's
report suggests P for a target accuracy.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import UserError, cli
from ..data.images import FULL_DECODE, IMAGE_EXTENSIONS, Preprocessing, build_transform, find_images, to_model_input
from ..devices import add_device_args, device_from_arg, loader_workers
from ..features.model import LoadedModel, load_model

log = logging.getLogger(__name__)

DEFAULT_TOPK = 3
UNCERTAIN = "uncertain"  # the label of an image whose top probability is below --min-confidence


def eval_transform(preprocessing: dict, *, normalize: bool = True):
    """The evaluation transform for a stored preprocessing spec (resize, crop, interpolation, mean, std);
    refuses a spec this version cannot honour. ``normalize=False``: uint8 output, for
    ``data.to_model_input`` to normalise on the model's device."""
    return build_transform(Preprocessing.from_dict(preprocessing), train=False, normalize=normalize)


# ---------------------------------------------------------------------------------------------- images
class PredictImages(Dataset):
    """Item ``i``: ``(tensor (3, S, S), i, "")``, or ``(None, i, "why")`` for a file that will not decode.

    Files are decoded as the transform needs them (its ``decode``: ``data.decode_for`` of the model's
    preprocessing, a JPEG at its draft scale); an RGB PIL image (the Python API's) is brought to the same
    working size as a decoded file."""

    def __init__(self, paths: Sequence[Path | Image.Image], transform):
        self.paths = list(paths)
        self.transform = transform
        self.decode = getattr(transform, "decode", FULL_DECODE)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        try:
            image = self.decode.working(path) if isinstance(path, Image.Image) else self.decode(path)
            return self.transform(image), i, ""
        except UserError as e:  # ImageDecodeError: the message already names the file
            return None, i, str(e)
        except Exception as e:  # noqa: BLE001 - one odd file must not end a run over thousands
            return None, i, f"{path}: cannot preprocess ({type(e).__name__}: {e})"


def collate_skipping_failures(items):
    """Stack the decoded images; hand the failures on separately: (x (B, 3, S, S) | None, idx, failures)."""
    good = [(x, i) for x, i, _ in items if x is not None]
    failures = [(i, err) for x, i, err in items if x is None]
    x = torch.stack([g[0] for g in good]) if good else None
    return x, [g[1] for g in good], failures


@dataclass
class Predictions:
    table: pd.DataFrame  # one row per input file, in input order
    classes: list[str]
    topk: int
    min_confidence: float | None = None
    probabilities: np.ndarray | None = None  # (N, C) every class's probability; NaN rows for skipped files

    @property
    def skipped(self) -> pd.DataFrame:
        return self.table[self.table["error"] != ""]

    def counts(self) -> pd.Series:
        ok = self.table[self.table["error"] == ""]
        labels = self.classes + ([UNCERTAIN] if self.min_confidence is not None else [])
        return ok["label"].value_counts().reindex(labels, fill_value=0)


def calibration_note(loaded: LoadedModel) -> str:
    """Empty for a model whose temperature was fitted on valid; else why its probabilities may be off."""
    if not loaded.meta.get("calibration"):
        return (
            f"{loaded.path} holds no temperature fitted on valid: its probabilities are not calibrated, "
            "so --min-confidence compares P with uncalibrated scores"
        )
    return ""


def check_min_confidence(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise UserError(f"--min-confidence {p:g}: must be a probability between 0 and 1")


@torch.inference_mode()
def predict_files(
    loaded: LoadedModel,
    files: Sequence[Path | Image.Image],
    *,
    topk: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    min_confidence: float | None = None,
) -> Predictions:
    """Classify ``files``; unreadable ones get a row with ``error`` set and no label. With
    ``min_confidence`` P, an image whose top probability is below P is labelled ``uncertain``."""
    n_classes = len(loaded.classes)
    topk = min(DEFAULT_TOPK, n_classes) if topk is None else int(topk)
    if not 1 <= topk <= n_classes:
        raise UserError(f"--topk {topk}: must be between 1 and the model's {n_classes} classes")
    if min_confidence is not None:
        check_min_confidence(min_confidence)
        if UNCERTAIN in loaded.classes:
            raise UserError(
                f"--min-confidence: the model has a class named {UNCERTAIN!r}, so that label would be ambiguous"
            )
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    device = torch.device(device)
    model = loaded.module.to(device).eval()
    loader = DataLoader(
        PredictImages(files, eval_transform(loaded.preprocessing, normalize=False)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skipping_failures,
        pin_memory=device.type == "cuda",
    )
    probs = np.full((len(files), topk), np.nan, dtype=np.float64)
    every = np.full((len(files), n_classes), np.nan, dtype=np.float64)
    labels = np.full((len(files), topk), -1, dtype=np.int64)
    errors = [""] * len(files)
    bar = tqdm(
        total=len(files),
        desc="predict",
        unit="img",
        disable=not progress or len(files) <= batch_size,
        leave=False,
        dynamic_ncols=True,
    )
    for x, idx, failures in loader:
        for i, err in failures:
            errors[i] = err
            log.debug("skipped %s", err)  # the caller reports them all at the end
        if x is not None:
            x = to_model_input(x, device, loaded.preprocessing).contiguous(memory_format=torch.channels_last)
            p = torch.softmax(model(x).float(), dim=1)  # (B, C)
            top_p, top_i = p.topk(topk, dim=1)  # (B, K)
            every[idx] = p.cpu().numpy()
            probs[idx] = top_p.cpu().numpy()
            labels[idx] = top_i.cpu().numpy()
        bar.update(len(idx) + len(failures))
    bar.close()
    rows: dict[str, list[str] | np.ndarray] = {"path": [str(f) for f in files]}  # one column each
    names = np.asarray(loaded.classes + [""], dtype=object)  # index -1 -> "" for skipped files
    rows["label"] = names[labels[:, 0]]
    if min_confidence is not None:
        unsure = probs[:, 0] < min_confidence  # NaN (skipped files) compares False: they keep label ""
        rows["label"] = np.where(unsure, UNCERTAIN, rows["label"]).astype(object)
    rows["score"] = probs[:, 0]
    for k in range(topk):
        rows[f"top{k + 1}_label"] = names[labels[:, k]]
        rows[f"top{k + 1}_score"] = probs[:, k]
    rows["error"] = errors
    return Predictions(pd.DataFrame(rows), list(loaded.classes), topk, min_confidence, every)


def format_summary(pred: Predictions, *, out: Path | None = None) -> str:
    n, skipped = len(pred.table), len(pred.skipped)
    lines = [f"{n - skipped} of {n} images classified" + (f" -> {out}" if out else "")]
    if pred.min_confidence is not None:
        lines[0] += f"; {UNCERTAIN} = top probability below {pred.min_confidence:g}"
    counts = pred.counts()
    width = max(map(len, counts.index))
    for cls, count in counts.items():
        share = count / max(1, n - skipped)
        lines.append(f"  {cls:<{width}}  {count:>6}  {share:6.1%}")
    return "\n".join(lines)


def format_skipped(pred: Predictions, *, limit: int = 20) -> str:
    skipped = pred.skipped
    if skipped.empty:
        return ""
    lines = [f"skipped {len(skipped)} unreadable file(s) (rows with the error column filled):"]
    lines += [f"  {err}" for err in skipped["error"].head(limit)]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=os.environ.get("TUNE_RICE_PROG", "python -m tune_rice predict"),
        description="Classify images with a trained tune-rice model (best/model.pt or an exported .ts file).",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument(
        "--model",
        required=True,
        help="runs/<name>/best/model.pt, an exported TorchScript file, or an experiment folder",
    )
    p.add_argument("--out", metavar="FILE", default="predictions.csv", help="the CSV file to write")
    cli.add_force_arg(p, "--out")
    p.add_argument(
        "--topk",
        type=int,
        help=f"how many ranked classes per image (default: {DEFAULT_TOPK}, or the class count if smaller)",
    )
    p.add_argument(
        "--min-confidence",
        type=float,
        metavar="P",
        help=f"label an image {UNCERTAIN!r} when its (calibrated) top probability is below P; the "
        "row keeps its top-k. The search's report suggests P for a target accuracy",
    )
    add_device_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    if args.min_confidence is not None:
        check_min_confidence(args.min_confidence)
    cli.refuse_overwrite([Path(args.out)], args.force)
    device = device_from_arg(args.device)
    files = find_images(args.paths)
    if not files:
        raise UserError(f"no images found in {', '.join(args.paths)} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    loaded = load_model(args.model, device=device)
    if args.min_confidence is not None and calibration_note(loaded):
        log.warning("%s", calibration_note(loaded))
    workers = (
        args.num_workers
        if args.num_workers is not None
        else loader_workers(device, batches=len(files) // args.batch_size, most=4)
    )
    pred = predict_files(
        loaded,
        files,
        topk=args.topk,
        batch_size=args.batch_size,
        num_workers=workers,
        device=device,
        progress=True,
        min_confidence=args.min_confidence,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pred.table.to_csv(out, index=False, float_format="%.6f")
    skipped = format_skipped(pred)
    if skipped:
        print(skipped, file=sys.stderr)
    print(format_summary(pred, out=out))
    return 0 if len(pred.skipped) < len(pred.table) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
