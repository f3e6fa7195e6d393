"""Training and evaluation as plain functions, over a feature bank or over images.

No Ray here: ``trainable.py`` wraps :class:`HeadRun` with reporting and checkpoints, and the same code
runs in tests, benchmarks and on a GPU machine without Ray.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import UserError
from ..data.images import (
    AUG_POLICIES,
    SPLITS,
    ImageDataset,
    ImageDecodeError,
    LabelTable,
    Preprocessing,
    build_transform,
    dataset_for_split,
    to_model_input,
)
from ..devices import loader_workers, resolve_device
from ..features.bank import FeatureBank, FeatureSpec, SplitFeatures, run_backbone
from ..features.model import HEAD_KINDS, Classifier, ResolvedWeights, build_backbone, build_head, feature_layer_for

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
STAGE_BN = ("frozen", "update")
STAGE_DECAY = ("pretrained", "zero")


@dataclass
class TrialConfig:
    """Every knob of one trial. Search spaces may set any field; unknown keys are an error."""

    # backbone side (changes the feature bank)
    backbone: str = "resnet34"  # a torchvision model, optionally with weights: "vit_b_16:IMAGENET1K_SWAG_LINEAR_V1"
    image_size: int = 0  # 0 = the weights' own preprocessing (crop, resize, interpolation)
    head: str = "pooled"  # pooled | seed (seed = the recipe's head on the 1000 ImageNet logits)
    aug_policy: str = "standard"
    views: int = 4  # K: views per training image in the bank (view 0 un-augmented)
    # head side
    hidden: int = 256  # 0 = linear classifier
    dropout: float = 0.2
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    batch_size: int = 64
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    schedule: str = "cosine"
    warmup_epochs: int = 0
    class_balanced: bool = False  # inverse-frequency class weights in the loss
    # At least this many optimiser steps over all epochs: on a small train set each epoch then makes
    # several passes (177 images at batch 128 give 2 steps an epoch, 40 in 20 epochs). 0 = one pass.
    min_steps: int = 0
    # last-stage tuning (finetune.py): the backbone's last stage trains with the head, from a stage bank
    tune_last_stage: bool = False
    stage_lr_fraction: float = 0.1  # the stage's learning rate as a fraction of lr
    stage_bn: str = "frozen"  # frozen: its BatchNorm keeps the running statistics; update: they follow the batches
    stage_decay: str = "pretrained"  # weight decay pulls the stage towards its pretrained weights, or to zero
    epochs: int = 10
    seed: int = 0

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict) -> TrialConfig:
        unknown = sorted(set(values) - set(cls.fields()))
        if unknown:
            raise UserError(f"unknown config key(s) {unknown}; valid: {', '.join(cls.fields())}")
        cfg = cls()
        for f in dataclasses.fields(cls):
            if f.name in values:
                setattr(cfg, f.name, _coerce(f.name, values[f.name], type(getattr(cfg, f.name))))
        cfg.validate()
        return cfg

    def validate(self) -> None:
        checks = [
            (self.head in HEAD_KINDS, f"head must be one of {HEAD_KINDS}"),
            (self.aug_policy in AUG_POLICIES, f"aug_policy must be one of {AUG_POLICIES}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}"),
            (self.views >= 1, "views must be >= 1"),
            (self.image_size == 0 or self.image_size >= 16, "image_size must be >= 16 (or 0: the weights' own)"),
            (self.hidden >= 0, "hidden must be >= 0"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (self.grad_clip >= 0, "grad_clip must be >= 0"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.min_steps >= 0, "min_steps must be >= 0"),
            (not self.tune_last_stage or self.head == "pooled", "tune_last_stage needs head: pooled"),
            (self.stage_lr_fraction > 0, "stage_lr_fraction must be > 0"),
            (self.stage_bn in STAGE_BN, f"stage_bn must be one of {STAGE_BN}"),
            (self.stage_decay in STAGE_DECAY, f"stage_decay must be one of {STAGE_DECAY}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"invalid trial config: {message}")

    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(
            backbone=self.backbone,
            image_size=int(self.image_size),
            feature_layer="stage" if self.tune_last_stage else feature_layer_for(self.head),
            policy=self.aug_policy,
            views=int(self.views),
            seed=int(self.seed),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(name: str, value, kind: type):
    if kind is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise UserError(f"config key {name!r}: {value!r} is not a bool (true/false)")  # bool("no") is True
        return bool(value)
    try:
        if kind is int:
            if isinstance(value, float) and not float(value).is_integer():
                raise ValueError
            return int(value)
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"config key {name!r}: {value!r} is not a {kind.__name__}") from None


# -------------------------------------------------------------------------------------------- metrics
def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    """Accuracy, macro-F1 and balanced accuracy, per-class precision/recall/F1 and the confusion matrix
    (rows = true). Macro-F1 averages all ``n_classes`` (a class neither present nor predicted counts 0), as
    scikit-learn's ``f1_score(labels=range(n_classes), average="macro")``; balanced accuracy is the mean
    recall of the classes present, as its ``balanced_accuracy_score``."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    present = support > 0
    n = int(cm.sum())
    return {
        "acc": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1.mean()) if n_classes else 0.0,
        "balanced_acc": float(recall[present].mean()) if present.any() else 0.0,
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": support.tolist(),
        "confusion": cm.tolist(),
        "count": n,
    }


# ------------------------------------------------------------------------------------------ batches
class BankBatches:
    """Mini-batches from a bank split.

    Training (``train=True``): every epoch draws, for each image, one of its K views (seeded by
    ``seed`` and the epoch) and shuffles. Evaluation: view 0 in order.
    """

    def __init__(
        self, split: SplitFeatures, *, batch_size: int, train: bool, seed: int = 0, device: torch.device | str = "cpu"
    ):
        with warnings.catch_warnings():  # banks from Ray's object store are read-only; we never write them
            warnings.simplefilter("ignore", UserWarning)
            self.features = torch.from_numpy(np.ascontiguousarray(split.features))  # (N, K, D) float16, shared
        self.targets = torch.from_numpy(np.asarray(split.targets, dtype=np.int64))
        self.batch_size, self.train, self.seed = int(batch_size), train, seed
        self.device = torch.device(device)
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, k = self.features.shape[:2]
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g)
            views = torch.randint(k, (n,), generator=g)
        else:
            order = torch.arange(n)
            views = torch.zeros(n, dtype=torch.long)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.features[idx, views[idx]].float()  # (B, D)
            yield x.to(self.device, non_blocking=True), self.targets[idx].to(self.device, non_blocking=True)


class ImageBatches:
    """Mini-batches of images through a DataLoader (the inline path); yields (x, y) like BankBatches.

    uint8 items (transforms built with ``normalize=False``) are normalised on ``device`` with
    ``preprocessing`` (default: the dataset transform's own)."""

    def __init__(
        self,
        dataset,
        *,
        batch_size: int,
        train: bool,
        seed: int = 0,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
        preprocessing: Preprocessing | None = None,
    ):
        self.dataset, self.batch_size, self.train, self.seed = dataset, int(batch_size), train, seed
        self.num_workers, self.device = num_workers, torch.device(device)
        self.preprocessing = preprocessing or getattr(getattr(dataset, "transform", None), "preprocessing", None)
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self):
        self.dataset.epoch = self.epoch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=self.train,
            generator=g,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for x, y, _ in loader:
            yield (
                to_model_input(x, self.device, self.preprocessing).contiguous(memory_format=torch.channels_last),
                y.to(self.device, non_blocking=True),
            )


# ------------------------------------------------------------------------------------ optimisation
def make_optimizer(params: Iterable[torch.Tensor], cfg: TrialConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov and cfg.momentum > 0,
        )
    raise UserError(f"Invalid optimizer {cfg.optimizer}. Only {', '.join(OPTIMIZERS)} are supported.")


def passes_per_epoch(cfg: TrialConfig, batches_per_pass: int) -> int:
    """Passes over the train set in each epoch, so that the epochs make at least ``cfg.min_steps`` steps."""
    return max(1, math.ceil(cfg.min_steps / (cfg.epochs * max(1, batches_per_pass))))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrialConfig, steps_per_epoch: int):
    """Per-step LR multiplier: linear warmup over ``warmup_epochs``, then cosine to 0 or constant."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_criterion(cfg: TrialConfig, class_counts: np.ndarray, device) -> nn.Module:
    weight = None
    if cfg.class_balanced:
        counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
        w = counts.sum() / (len(counts) * counts)  # inverse frequency, mean weight ~1
        weight = torch.tensor(w, dtype=torch.float32, device=device)
    # No label smoothing for a linear head: it caps the logits' scale, which the probe it competes with
    # and the temperature fitted afterwards set better; only hidden layers have use for it.
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing if cfg.hidden else 0.0)


def train_one_epoch(model: nn.Module, batches, *, optimizer, criterion, scheduler=None, grad_clip: float = 0.0) -> dict:
    """One pass over ``batches``; returns ``{"loss", "acc"}`` averaged over samples."""
    model.train()
    total_loss, correct, n = 0.0, 0, 0
    params = [p for p in model.parameters() if p.requires_grad]
    for x, y in batches:
        logits = model(x)
        loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        n += len(y)
    if n == 0:
        raise UserError("no training batches")
    if not math.isfinite(total_loss):
        raise FloatingPointError("training loss is not finite (learning rate too high?)")
    return {"loss": total_loss / n, "acc": correct / n}


@torch.inference_mode()
def predict_logits(model: nn.Module, batches) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    outs, ys = [], []
    for x, y in batches:
        outs.append(model(x).float().cpu())
        ys.append(y.cpu())
    return torch.cat(outs), torch.cat(ys)


ALL = "all"  # a split value meaning every labelled image, whatever its split


def split_logits(
    model: nn.Module,
    table: LabelTable,
    split: str,
    preprocessing: int | dict | Preprocessing,
    device: str | torch.device = "auto",
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s outputs on the ``split`` images of ``table`` (``all``: every row; decoded once, in
    order) and the targets.

    ``preprocessing``: the model's (as saved with it), or a bare image size for the ResNet convention.
    """
    if split not in (*SPLITS, ALL):
        raise UserError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}, {ALL}")
    rows = table.frame if split == ALL else table.split(split)
    if rows.empty:
        raise UserError(f"{table.csv_path}: the {split} split has no images")
    device = resolve_device(device)
    workers = loader_workers(device, batches=-(-len(rows) // batch_size), most=4)
    workers = workers if num_workers is None else num_workers
    index = {c: i for i, c in enumerate(table.classes)}
    ds = ImageDataset(
        [table.root / q for q in rows["path"]],
        np.asarray([index[c] for c in rows["label"]], dtype=np.int64),
        build_transform(preprocessing, train=False, normalize=False),
    )
    batches = ImageBatches(ds, batch_size=batch_size, train=False, num_workers=workers, device=device)
    try:
        return predict_logits(model.to(device), batches)
    except ImageDecodeError as e:
        # From a loader worker the message is a whole traceback; its last line is the one that matters.
        last = str(e).strip().splitlines()[-1].split("ImageDecodeError: ", 1)[-1]
        raise UserError(
            f"{last} (every image of the split must decode; fix it or drop its row from {table.csv_path.name})"
        ) from None


def metrics_record(logits: torch.Tensor, y: torch.Tensor, classes: Sequence[str]) -> dict:
    """The dict of a search's test_metrics.json from logits (N, C) and targets (N,)."""
    classes = list(classes)
    metrics = compute_metrics(y.numpy(), logits.argmax(1).numpy(), len(classes))
    return {
        "accuracy": metrics["acc"],
        "macro_f1": metrics["macro_f1"],
        "loss": float(nn.functional.cross_entropy(logits.float(), y)),
        "test_count": metrics["count"],
        "classes": classes,
        "per_class": {
            c: {
                "precision": metrics["precision"][i],
                "recall": metrics["recall"][i],
                "f1": metrics["f1"][i],
                "support": metrics["support"][i],
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": metrics["confusion"],
    }


def evaluate(model: nn.Module, batches, *, n_classes: int, criterion: nn.Module | None = None) -> dict:
    """Loss (plain cross-entropy unless ``criterion``), accuracy, macro-F1, per-class metrics."""
    logits, y = predict_logits(model, batches)
    # A copy: Module.cpu() moves in place, and the caller's training criterion must stay on its device.
    crit = copy.deepcopy(criterion).cpu() if criterion is not None else nn.CrossEntropyLoss()
    metrics = compute_metrics(y.numpy(), logits.argmax(1).numpy(), n_classes)
    metrics["loss"] = float(crit(logits, y))
    return metrics


# ---------------------------------------------------------------------------------------- one trial
class HeadRun:
    """One trial's training state: a head on a bank, or (``bank=None``) the full model on images.

    ``step()`` trains one epoch and evaluates on valid; ``state_dict()``/``load_state_dict()`` let a
    trial resume exactly where a checkpoint left it.
    """

    def __init__(
        self,
        cfg: TrialConfig,
        *,
        bank: FeatureBank | None = None,
        table: LabelTable | None = None,
        weights: str | ResolvedWeights = "auto",
        device: str | torch.device = "auto",
        num_workers: int | None = None,
    ):
        if (bank is None) == (table is None):
            raise ValueError("give exactly one of bank (feature-bank path) or table (inline path)")
        self.cfg, self.device, self.epoch = cfg, resolve_device(device), 0
        torch.manual_seed(cfg.seed)
        self.model: nn.Module  # the head alone on a bank, backbone + head on images
        self.train_batches: BankBatches | ImageBatches
        self.valid_batches: BankBatches | ImageBatches
        if bank is not None:
            counts = self._on_bank(bank)
        elif table is not None:
            counts = self._on_images(table, weights, num_workers)
        self.n_classes = len(self.classes)
        self.optimizer = make_optimizer(self.head.parameters(), cfg)
        self.passes = passes_per_epoch(cfg, len(self.train_batches))
        self.scheduler = make_scheduler(self.optimizer, cfg, len(self.train_batches) * self.passes)
        self.criterion = make_criterion(cfg, counts, self.device)

    def _on_bank(self, bank: FeatureBank) -> np.ndarray:
        """The head on the bank's features and its batches; the train split's class counts."""
        cfg = self.cfg
        self.classes = bank.classes
        self.weights = bank.weights
        n_classes = len(bank.classes)
        self.head = build_head(cfg.head, in_dim=bank.dim, n_classes=n_classes, hidden=cfg.hidden, dropout=cfg.dropout)
        self.head.set_standardization(bank.mean, bank.std)
        self.model = self.head.to(self.device)
        self.train_batches = BankBatches(
            bank.splits["train"], batch_size=cfg.batch_size, train=True, seed=cfg.seed, device=self.device
        )
        self.valid_batches = BankBatches(bank.splits["valid"], batch_size=512, train=False, device=self.device)
        return np.bincount(bank.splits["train"].targets, minlength=n_classes)

    def _on_images(self, table: LabelTable, weights: str | ResolvedWeights, num_workers: int | None) -> np.ndarray:
        """The backbone and the head on decoded images, and their batches; the train split's class counts."""
        cfg = self.cfg
        self.classes = table.classes
        n_classes = len(table.classes)
        spec = cfg.feature_spec()
        backbone, resolved = build_backbone(
            spec.backbone, weights=weights, seed=cfg.seed, feature_layer=spec.feature_layer
        )
        self.weights = resolved.identity
        backbone = backbone.to(self.device).to(memory_format=torch.channels_last)
        workers = loader_workers(self.device) if num_workers is None else num_workers
        # uint8 items, normalised on the device; files decoded as data.decode_for says for each transform
        eval_tf = build_transform(spec.preprocessing, train=False, normalize=False)
        train_tf = build_transform(spec.preprocessing, train=True, policy=spec.policy, normalize=False)
        # Standardisation statistics from un-augmented train images: the same numbers the bank uses.
        stats_loader = DataLoader(
            dataset_for_split(table, "train", eval_tf),
            batch_size=64,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
        )
        f0 = run_backbone(
            backbone,
            stats_loader,
            n=len(table.split("train")),
            views=1,
            device=self.device,
            desc="feature statistics",
            progress=False,
            preprocessing=spec.preprocessing,
        )[:, 0].astype(np.float32)
        self.head = build_head(
            cfg.head, in_dim=f0.shape[1], n_classes=n_classes, hidden=cfg.hidden, dropout=cfg.dropout
        )
        self.head.set_standardization(f0.mean(0), f0.std(0))
        self.model = Classifier(backbone, self.head).to(self.device)
        self.train_batches = ImageBatches(
            dataset_for_split(table, "train", train_tf, seed=cfg.seed),
            batch_size=cfg.batch_size,
            train=True,
            seed=cfg.seed,
            num_workers=workers,
            device=self.device,
        )
        self.valid_batches = ImageBatches(
            dataset_for_split(table, "valid", eval_tf),
            batch_size=64,
            train=False,
            num_workers=workers,
            device=self.device,
        )
        return np.bincount(table.targets("train"), minlength=n_classes)

    def train_epoch(self) -> dict:
        """Train one epoch (``self.passes`` passes over train); returns ``{"epoch", "lr", "train/loss",
        "train/acc"}`` of its last pass."""
        lr = self.optimizer.param_groups[0]["lr"]
        for p in range(self.passes):
            self.train_batches.epoch = self.epoch * self.passes + p  # each pass draws its own views
            tr = train_one_epoch(
                self.model,
                self.train_batches,
                optimizer=self.optimizer,
                criterion=self.criterion,
                scheduler=self.scheduler,
                grad_clip=self.cfg.grad_clip,
            )
        self.epoch += 1
        return {"epoch": self.epoch, "lr": lr, "train/loss": tr["loss"], "train/acc": tr["acc"]}

    def step(self) -> dict:
        """Train one epoch, evaluate on valid; returns namespaced metrics for this epoch."""
        out = self.train_epoch()
        va = evaluate(self.model, self.valid_batches, n_classes=self.n_classes)
        out.update(
            {
                "valid/loss": va["loss"],
                "valid/acc": va["acc"],
                "valid/macro_f1": va["macro_f1"],
                "valid/balanced_acc": va["balanced_acc"],
                "valid_count": va["count"],
            }
        )
        for c, r in zip(self.classes, va["recall"]):
            out[f"valid/recall/{c}"] = r
        return out

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.cfg.to_dict(),
            "classes": list(self.classes),
            "weights": self.weights,
            **_rng_state(self.device),
        }

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.epoch = _load_progress(state, self.optimizer, self.scheduler, self.device)


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":  # dropout on the GPU draws from the CUDA generator, not the CPU one
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _load_progress(state: dict, optimizer: torch.optim.Optimizer, scheduler, device: torch.device) -> int:
    """Restore a checkpoint's optimizer, scheduler and random generators (those it has); returns its epoch."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
    return int(state["epoch"])
