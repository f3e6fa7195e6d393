"""The Ray Tune function trainable: :class:`tune_rice.heads.engine.HeadRun` wired to reports and checkpoints.

Big inputs (the feature banks) arrive through ``tune.with_parameters``, so they sit in the object store
once and every trial on a node maps the same memory; nothing is decoded or extracted inside a trial.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune

from .. import UserError
from ..data.images import read_labels
from ..features.bank import FeatureBank
from ..features.model import ResolvedWeights
from ..heads.cv import CVHeadRun
from ..heads.engine import HeadRun, TrialConfig
from ..heads.finetune import StageRun
from ..records import Direction

CHECKPOINT_FILE = "state.pt"


@dataclass(frozen=True)
class ImageSource:
    """A trial's data when there are no banks (``--bank off``, the reference path): the images
    listed in ``labels_csv`` (relative to ``data_root``, default its folder) and, per backbone name, the
    weights resolved when the search started."""

    labels_csv: str
    data_root: str | None
    weights: dict[str, ResolvedWeights]


@dataclass(frozen=True)
class CVBanks:
    """A cross-validated trial's data (``--cv K``): the banks (or their object references), and the fold
    of every train+valid image in the pooled order (train then valid, the same in every bank)."""

    banks: dict[str, FeatureBank | ray.ObjectRef]
    folds: np.ndarray  # (N_train + N_valid,) int64


# A trial's data: the feature banks (or their object references) by FeatureSpec name (the fast path),
# the same with folds (--cv), or the images themselves.
TrialData = dict[str, FeatureBank | ray.ObjectRef] | CVBanks | ImageSource


def trial_device() -> str:
    """``cuda`` when Ray gave this trial a GPU and one is really there, else ``cpu``."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def start_run(cfg: TrialConfig, data: TrialData, device: str) -> HeadRun | CVHeadRun:
    """The trial's HeadRun on its bank, its K fold heads (CVHeadRun) with folds, or a HeadRun on the
    images (decoded by the CPUs Ray gave it, less one); a StageRun instead of a HeadRun for a trial
    that tunes the last stage."""
    if isinstance(data, CVBanks):
        if cfg.tune_last_stage:
            raise UserError("tune_last_stage does not combine with --cv (the fold heads share one frozen backbone)")
        return CVHeadRun(cfg, bank=_fetch(data.banks[cfg.feature_spec().name]), folds=data.folds, device=device)
    run = StageRun if cfg.tune_last_stage else HeadRun  # StageRun: the last stage trains with the head
    if isinstance(data, ImageSource):
        cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
        return run(
            cfg,
            table=read_labels(data.labels_csv, root=data.data_root),
            weights=data.weights[cfg.backbone],
            device=device,
            num_workers=max(0, cpus - 1),
        )
    return run(cfg, bank=_fetch(data[cfg.feature_spec().name]), device=device)


def _fetch(bank: FeatureBank | ray.ObjectRef) -> FeatureBank:
    """A bank extracted on the cluster comes as a reference: fetched here, on the trial's node, never
    through the driver."""
    return ray.get(bank) if isinstance(bank, ray.ObjectRef) else bank


def train_head(
    config: dict, *, data: TrialData, base: dict | None = None, metric: str = "valid/acc", mode: str = "max"
) -> None:
    """Train one trial for ``epochs`` epochs, reporting every epoch and checkpointing improvements.

    ``data``: the feature banks by FeatureSpec name, :class:`CVBanks` (K fold heads per trial, reporting
    out-of-fold scores), or an :class:`ImageSource` (the full model on the images, the reference path). ``base`` holds the settings every trial shares (epochs, seed).
    """
    # Ray logs "Checkpoint successfully created at ..." at INFO for every checkpoint of every trial, and
    # forwards it to the driver's console; the status table already says what each trial is doing.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    cfg = TrialConfig.from_dict({**(base or {}), **config})
    device = trial_device()
    run = start_run(cfg, data, device)
    best = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        run.load_state_dict(state)
        best = state.get("best")
    context = ray.get_runtime_context()
    where = {
        "node_id": context.get_node_id(),
        "gpu_ids": ",".join(map(str, ray.get_gpu_ids())),
        "device": device,
        "weights": run.weights,
    }
    while run.epoch < cfg.epochs:
        metrics = {**run.step(), **where}
        if Direction(mode).better(metrics[metric], best):
            best = metrics[metric]
            with tempfile.TemporaryDirectory() as d:
                torch.save({**run.state_dict(), "best": best}, Path(d) / CHECKPOINT_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)
