"""The report's valid gallery: the deployed model on the valid images, the highest losses and the most
confident right ones per class, each with its class activation map (``mistakes.png``, ``correct.png``, the
TensorBoard run ``valid``) and per-class recall. Reads the experiment's model and labels; no Ray."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .. import UserError
from ..records import ARGS_FILE, LABELS_FILE, MODEL_PATH
from .explain import DEFAULT_METHOD, Explainer, denormalise, overlay

if TYPE_CHECKING:
    from ..data.images import LabelTable
    from ..features.model import LoadedModel

log = logging.getLogger(__name__)

GALLERY_FILES = ("mistakes.png", "correct.png")
GALLERY_MISTAKES = 12
GALLERY_PER_CLASS = 3
THUMB_INCHES, THUMB_DPI = 1.7, 80  # ~136 px thumbnails: the two grids stay well under 1 MB together
VALID_RUN = "valid"  # the TensorBoard run beside the trials and ``test`` that holds the gallery images


@dataclass
class Gallery:
    """The valid split seen through the deployed model: per image its loss and prediction; the picks."""

    classes: list[str]
    table: pd.DataFrame  # path, true, pred, p_pred, p_true, loss (one row per valid image)
    mistakes: list[int]  # rows with the highest loss, highest first
    correct: dict[str, list[int]]  # per class, its most confident correct rows
    maps: dict[int, np.ndarray]  # row -> map of the predicted class (S, S)
    photos: dict[int, np.ndarray]  # row -> photo as the model saw it (S, S, 3) uint8
    layer: str

    def recall(self) -> pd.DataFrame:
        t = self.table
        rows = []
        for c in self.classes:
            mine = t[t["true"] == c]
            rows.append(
                {
                    "class": c,
                    "valid images": len(mine),
                    "recall": float((mine["pred"] == c).mean()) if len(mine) else float("nan"),
                    "among the highest losses": int(sum(t.loc[i, "true"] == c for i in self.mistakes)),
                }
            )
        return pd.DataFrame(rows)


def gallery_data(exp_dir: Path) -> tuple[LoadedModel, LabelTable] | str:
    """The deployed model and the labels table of a finished search, or why they cannot be had."""
    from ..data.images import read_labels_checked
    from ..features.model import load_model
    from .evaluate import align_classes, resolve_labels

    model_path = exp_dir / MODEL_PATH
    if not model_path.is_file():
        return f"no {model_path.relative_to(exp_dir)} in the experiment"
    args = _read_args(exp_dir)
    data = args.get("data")
    try:
        if data:
            csv = resolve_labels(data)
        else:  # the search's default: the demo set in the cache, never generated here
            from ..data.demo import dataset_name, default_demo_dir

            csv = default_demo_dir() / dataset_name() / LABELS_FILE
        loaded = load_model(model_path)
        if loaded.kind != "artifact":
            return f"{model_path.name} is not a tune-rice model file"
        table = align_classes(read_labels_checked(csv, args.get("data_root"), splits=("valid",)), loaded.classes)
    except UserError as e:
        return str(e)
    if table.split("valid").empty:
        return f"{table.csv_path}: the valid split has no images"
    return loaded, table


def _read_args(exp_dir: Path) -> dict:
    import json

    try:
        return json.loads((exp_dir / ARGS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def build_gallery(
    loaded,
    table,
    *,
    n_mistakes: int = GALLERY_MISTAKES,
    per_class: int = GALLERY_PER_CLASS,
    method: str = DEFAULT_METHOD,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> Gallery:
    """Score every valid image once; maps for the ``n_mistakes`` highest losses and the ``per_class`` most
    confident correct images of each class (the valid split only: the test split is never read here)."""
    from torch.utils.data import DataLoader

    from ..data.images import dataset_for_split
    from .predict import eval_transform

    device = torch.device(device)
    model = loaded.module.to(device).eval()
    ds = dataset_for_split(table, "valid", eval_transform(loaded.preprocessing))
    batches = []
    with torch.inference_mode():
        for x, _, _ in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
            batches.append(torch.softmax(model(x.to(device)).float(), dim=1).cpu())
    probs = torch.cat(batches).numpy()  # (N, C)
    truth = np.asarray(ds.targets)
    classes = list(loaded.classes)
    pred = probs.argmax(1)
    p_true = probs[np.arange(len(truth)), truth]
    frame = pd.DataFrame(
        {
            "path": table.split("valid")["path"].to_numpy(),
            "true": [classes[t] for t in truth],
            "pred": [classes[p] for p in pred],
            "p_pred": probs.max(1),
            "p_true": p_true,
            "loss": -np.log(np.clip(p_true, 1e-12, None)),
        }
    )
    mistakes = list(frame.sort_values("loss", ascending=False, kind="stable").index[:n_mistakes])
    correct = {}
    for c in classes:
        ok = frame[(frame["true"] == c) & (frame["pred"] == c)]
        correct[c] = list(ok.sort_values("p_pred", ascending=False, kind="stable").index[:per_class])
    wanted = list(dict.fromkeys(mistakes + [i for rows in correct.values() for i in rows]))
    maps, photos = {}, {}
    with Explainer(model, image_size=loaded.image_size, method=method) as ex:
        for start in range(0, len(wanted), batch_size):
            rows = wanted[start : start + batch_size]
            x = torch.stack([ds[i][0] for i in rows]).to(device)  # (B, 3, S, S)
            _, m = ex(x, targets=[int(pred[i]) for i in rows])
            rgb = denormalise(x, loaded.preprocessing)
            for k, i in enumerate(rows):
                maps[i], photos[i] = m[k], rgb[k]
        layer = f"{ex.layers[0].name} ({ex.layers[0].grid[0]}x{ex.layers[0].grid[1]})"
    return Gallery(classes, frame, mistakes, correct, maps, photos, layer)


def _thumb(ax, rgb, heat, caption: str, *, wrong: bool) -> None:
    ax.imshow(overlay(rgb, heat))
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():  # a red frame for a wrong prediction, green for a right one
        spine.set_edgecolor("#c0392b" if wrong else "#2ca02c")
        spine.set_linewidth(2.5)
    ax.set_title(caption, fontsize=7.5, pad=2)


def mistakes_figure(g: Gallery, *, cols: int = 4):
    from matplotlib.figure import Figure

    n = len(g.mistakes)
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(cols * THUMB_INCHES, rows * (THUMB_INCHES + 0.35)), dpi=THUMB_DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, i in zip(axes, g.mistakes):
        r = g.table.loc[i]
        wrong = r["pred"] != r["true"]
        caption = (
            f"true {r['true']}\npred {r['pred']} {r['p_pred']:.2f}"
            if wrong
            else f"{r['true']} (right, {r['p_pred']:.2f})\nloss {r['loss']:.2f}"
        )
        _thumb(ax, g.photos[i], g.maps[i], caption, wrong=wrong)
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig


def correct_figure(g: Gallery):
    from matplotlib.figure import Figure

    cols = max(1, max(len(v) for v in g.correct.values()))
    rows = len(g.classes)
    fig = Figure(figsize=(cols * THUMB_INCHES + 0.9, rows * (THUMB_INCHES + 0.2)), dpi=THUMB_DPI, layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for r, c in enumerate(g.classes):
        picks = g.correct[c]
        for k in range(cols):
            ax = axes[r, k]
            if k < len(picks):
                i = picks[k]
                _thumb(ax, g.photos[i], g.maps[i], f"p {g.table.loc[i, 'p_pred']:.2f}", wrong=False)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
                if not picks and k == 0:
                    ax.text(0.5, 0.5, "none right", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            if k == 0:
                ax.set_ylabel(c, fontsize=9)
    return fig


def write_tensorboard_gallery(exp_dir: Path, figures: dict) -> None:
    """The gallery images into ``exp_dir/valid`` (a TensorBoard run of its own, apart from ``test``)."""
    from torch.utils.tensorboard import SummaryWriter

    run = exp_dir / VALID_RUN
    for old in run.glob("events.out.tfevents.*"):  # one gallery per report, not one more per rerun
        old.unlink()
    writer = SummaryWriter(str(run))
    try:
        for tag, fig in figures.items():
            writer.add_figure(tag, fig, 0, close=False)
    finally:
        writer.close()


def gallery_section(exp_dir: str | os.PathLike, out: Path, *, device: str | torch.device = "cpu") -> list[str]:
    """Draw ``mistakes.png`` and ``correct.png`` into ``out`` and the same into TensorBoard; returns the
    report's markdown for them. Anything missing (model, data) is one line saying so, never an error."""
    exp_dir = Path(exp_dir)
    for name in GALLERY_FILES:  # a gallery this run cannot draw must not be left over from an earlier run
        (out / name).unlink(missing_ok=True)
    md = ["## Mistakes and examples on valid", ""]
    got = gallery_data(exp_dir)
    if isinstance(got, str):
        return md + [f"No gallery: {got}.", ""]
    loaded, table = got
    g = build_gallery(loaded, table, device=device)
    figs = {"valid/mistakes": mistakes_figure(g), "valid/correct": correct_figure(g)}
    figs["valid/mistakes"].savefig(out / "mistakes.png")
    figs["valid/correct"].savefig(out / "correct.png")
    try:
        write_tensorboard_gallery(exp_dir, figs)
    except Exception as e:  # noqa: BLE001 - TensorBoard is a second copy; the report's own files are written
        log.warning("gallery not written to TensorBoard (%s: %s)", type(e).__name__, e)
    wrong = int((g.table["pred"] != g.table["true"]).sum())
    md += [
        f"The deployed model on the {len(g.table)} valid images ({wrong} wrong); never the test split. Maps: "
        f"{DEFAULT_METHOD} on `{g.layer}`, for the predicted class (red: high).",
        "",
        f"### The {len(g.mistakes)} highest losses",
        "",
        "![valid images with the highest loss, with their activation maps](mistakes.png)",
        "",
        "A red frame is a wrong prediction (true and predicted class, its probability); a green frame a right "
        "one with a low probability.",
        "",
        "### Right, and most confident, per class",
        "",
        "![the most confident right predictions of each class, with their activation maps](correct.png)",
        "",
        "### Recall per class on valid",
        "",
        *_recall_lines(g.recall()),
        "",
    ]
    if not loaded.meta.get("pretrained", True):
        md[2:2] = [
            "**The backbone is randomly initialised: maps from its last spatial layer hardly localise, maps "
            "two stages earlier do (measured in BENCHMARKS.md, section 8); for those, "
            "`python -m tune_rice explain --earlier 2`.**",
            "",
        ]
    return md


def _recall_lines(recall: pd.DataFrame) -> list[str]:
    lines = ["| class | valid images | recall | among the highest losses |", "|---|---:|---:|---:|"]
    for r in recall.itertuples(index=False):
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]} |")
    return lines
