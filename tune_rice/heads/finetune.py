"""Trials that tune the backbone's last stage with the head, at feature-bank speed.

The frozen prefix of the network (everything before its last stage, ``stage.py``) gives the same output
for the same input, so a stage bank holds it and a trial runs only the stage, its pooling and the head,
forward and backward, on the bank's rows. The stage learns at ``lr * stage_lr_fraction``; its
BatchNorm keeps its running statistics (``stage_bn: frozen``) or follows the batches (``update``); its
weight decay pulls it towards the pretrained stage (``stage_decay: pretrained``, decoupled as AdamW's)
or towards zero (``zero``: the optimiser's own decay). Without banks (``--bank off``) the same
trial runs the prefix on the images in every epoch: the reference the bank path is checked against.

The tuned stage is written into a copy of the backbone (:func:`tuned_backbone`), so the deployed model
is a frozen backbone with a head like any other: predict, evaluate, explain, the ensemble and the
exports read it without knowing it was tuned. No Ray here.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from torch import nn

from .. import UserError
from ..data.images import LabelTable, build_transform, dataset_for_split
from ..devices import loader_workers, resolve_device
from ..features.bank import FeatureBank
from ..features.model import FrozenBackbone, Head, ResolvedWeights, build_backbone, build_head
from ..features.stage import StagePrefix, StageTail, stage_shape
from .engine import (
    BankBatches,
    HeadRun,
    ImageBatches,
    TrialConfig,
    make_criterion,
    make_optimizer,
    make_scheduler,
    passes_per_epoch,
    predict_logits,
)


class StageModel(nn.Module):
    """The tuned last stage, its pooling and the head: a bank row (B, C*H*W) -> logits (B, C). With
    ``prefix`` (the inline path) the input is images, run through the frozen prefix first."""

    def __init__(self, tail: StageTail, head: Head, shape: tuple[int, int, int], prefix: StagePrefix | None = None):
        super().__init__()
        self.tail, self.head, self.shape, self.prefix = tail, head, tuple(shape), prefix

    def features(self, x: torch.Tensor) -> torch.Tensor:  # -> pooled (B, D)
        if self.prefix is not None:
            with torch.no_grad():
                x = self.prefix(x)
        return self.tail(x.reshape(len(x), *self.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def stage_from_bank(bank: FeatureBank, bn: str = "frozen") -> tuple[StageTail, tuple[int, int, int]]:
    """The pretrained last stage a stage bank carries, as a trainable module, and its input shape."""
    if bank.spec.feature_layer != "stage" or bank.stage is None:
        raise UserError(f"bank {bank.spec.name} is not a stage bank (tune_last_stage needs one)")
    tail = StageTail(_network(bank.spec.backbone), name=bank.spec.backbone, bn=bn)
    tail.load_state_dict(bank.stage)
    return tail, tuple(bank.info.get("stage_shape") or stage_shape(bank.spec.backbone, bank.spec.image_size))


def _network(backbone: str) -> nn.Module:
    """A network of ``backbone``'s architecture (its numbers are replaced next), classifier cut as the
    frozen backbone's."""
    return build_backbone(backbone, weights="none")[0].net


def tuned_backbone(backbone: FrozenBackbone, stage_state: dict) -> FrozenBackbone:
    """A copy of the frozen ``backbone`` whose last stage holds ``stage_state`` (a StageTail's state
    dict): the backbone of a model whose stage was tuned. ``backbone`` itself is unchanged."""
    out = copy.deepcopy(backbone)
    tail = StageTail(out.net, name=out.name)
    tail.load_state_dict(stage_state)
    tail.put_into(out.net)
    for p in out.net.parameters():
        p.requires_grad_(False)
    return out


def tuned_weights(resolved: ResolvedWeights, name: str) -> ResolvedWeights:
    """What a tuned backbone's numbers are: ``resolved`` with the last stage of trial ``name``."""
    return dataclasses.replace(resolved, identity=f"{resolved.identity}+stage:{name}")


class StageRun(HeadRun):
    """One trial that tunes the last stage with its head: on a stage bank (``bank``), or on the images
    (``table``, the inline path). Trains, evaluates and checkpoints as :class:`engine.HeadRun`; the
    checkpoint adds ``stage`` (the tuned stage's state dict)."""

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
            raise ValueError("give exactly one of bank (stage bank) or table (inline path)")
        self.cfg, self.device, self.epoch = cfg, resolve_device(device), 0
        torch.manual_seed(cfg.seed)
        self.train_batches: BankBatches | ImageBatches
        self.valid_batches: BankBatches | ImageBatches
        stats_batches: BankBatches | ImageBatches
        if bank is not None:
            tail, shape, prefix, stats_batches, targets = self._on_bank(bank)
        else:
            assert table is not None
            tail, shape, prefix, stats_batches, targets = self._on_images(table, weights, num_workers)
        self.n_classes = len(self.classes)
        self.tail = tail.to(self.device)
        if prefix is not None:
            prefix = prefix.to(self.device)
        pooled = _pooled(self.tail, prefix, shape, stats_batches)  # (N, D): train view 0 at the pretrained stage
        self.head = build_head(
            "pooled", in_dim=pooled.shape[1], n_classes=self.n_classes, hidden=cfg.hidden, dropout=cfg.dropout
        )
        self.head.set_standardization(pooled.mean(0), pooled.std(0))
        self.model = StageModel(self.tail, self.head, shape, prefix).to(self.device)
        self._optimizer()
        self.passes = passes_per_epoch(cfg, len(self.train_batches))
        self.scheduler = make_scheduler(self.optimizer, cfg, len(self.train_batches) * self.passes)
        self.criterion = make_criterion(cfg, np.bincount(targets, minlength=self.n_classes), self.device)

    def _on_bank(self, bank: FeatureBank):
        """Batches from a stage bank; the stage rebuilt from the pretrained weights the bank carries."""
        cfg = self.cfg
        self.classes, self.weights = bank.classes, bank.weights
        tail, shape = stage_from_bank(bank, cfg.stage_bn)
        prefix = None
        self.train_batches = BankBatches(
            bank.splits["train"], batch_size=cfg.batch_size, train=True, seed=cfg.seed, device=self.device
        )
        self.valid_batches = BankBatches(bank.splits["valid"], batch_size=256, train=False, device=self.device)
        stats_batches = BankBatches(bank.splits["train"], batch_size=256, train=False, device=self.device)
        targets = bank.splits["train"].targets
        return tail, shape, prefix, stats_batches, targets

    def _on_images(self, table: LabelTable, weights: str | ResolvedWeights, num_workers: int | None):
        """Batches decoded from the images (the inline path); the whole backbone, its prefix frozen."""
        cfg = self.cfg
        self.classes = table.classes
        spec = cfg.feature_spec()
        backbone, resolved = build_backbone(spec.backbone, weights=weights, seed=cfg.seed)
        self.weights = resolved.identity
        tail, shape = (
            StageTail(backbone.net, name=spec.backbone, bn=cfg.stage_bn),
            stage_shape(spec.backbone, spec.image_size),
        )
        prefix = StagePrefix(backbone)
        workers = loader_workers(self.device) if num_workers is None else num_workers
        eval_tf = build_transform(spec.preprocessing, train=False, normalize=False)
        train_tf = build_transform(spec.preprocessing, train=True, policy=spec.policy, normalize=False)
        self.train_batches = ImageBatches(
            dataset_for_split(table, "train", train_tf, seed=cfg.seed),
            batch_size=cfg.batch_size,
            train=True,
            seed=cfg.seed,
            num_workers=workers,
            device=self.device,
        )
        self.valid_batches, stats_batches = (
            ImageBatches(
                dataset_for_split(table, split, eval_tf),
                batch_size=64,
                train=False,
                num_workers=workers,
                device=self.device,
            )
            for split in ("valid", "train")  # train un-augmented: the head's standardisation statistics
        )
        targets = table.targets("train")
        return tail, shape, prefix, stats_batches, targets

    def _optimizer(self) -> None:
        """The head's optimizer with the stage as a second group at ``lr * stage_lr_fraction``; decay towards
        the pretrained stage (after every step) or plain decay."""
        cfg = self.cfg
        self.optimizer = make_optimizer(self.head.parameters(), cfg)
        plain = cfg.stage_decay == "zero"
        self.optimizer.add_param_group(
            {
                "params": list(self.tail.parameters()),
                "lr": cfg.lr * cfg.stage_lr_fraction,
                "weight_decay": cfg.weight_decay if plain else 0.0,
            }
        )
        if not plain:  # decoupled decay towards the pretrained stage (L2-SP), after every step
            self.anchor = [p.detach().clone() for p in self.tail.parameters()]
            self.optimizer.register_step_post_hook(self._pull_to_pretrained)

    @torch.no_grad()
    def _pull_to_pretrained(self, optimizer, args, kwargs) -> None:
        group = optimizer.param_groups[1]
        for p, p0 in zip(group["params"], self.anchor):
            p.add_(p - p0, alpha=-group["lr"] * self.cfg.weight_decay)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "stage": self.tail.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.tail.load_state_dict(state["stage"])
        super().load_state_dict(state)


@torch.no_grad()
def _pooled(tail: StageTail, prefix: StagePrefix | None, shape, batches) -> np.ndarray:
    """The stage's pooled output (N, D) float32 over ``batches`` in eval mode."""
    tail.eval()
    out = []
    for x, _ in batches:
        if prefix is not None:
            x = prefix(x)
        out.append(tail(x.reshape(len(x), *shape)).float().cpu())
    return torch.cat(out).numpy()


def stage_valid_logits(heads: list[Head], stage_state: dict, bank: FeatureBank) -> np.ndarray:
    """A tuned-stage candidate's valid logits (N, C) from its stage bank, as its trial evaluated them
    (the mean over ``heads``)."""
    tail, shape = stage_from_bank(bank)
    tail.load_state_dict(stage_state)
    batches = BankBatches(bank.splits["valid"], batch_size=256, train=False)
    out = [predict_logits(StageModel(tail, h.cpu(), shape), batches)[0].double().numpy() for h in heads]
    return np.mean(out, axis=0)
