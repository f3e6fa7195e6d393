"""Cross-validation on a feature bank (``--cv K``), in one place: the folds of train+valid pooled (by
near-copy group and class), and a trial's K fold heads trained as one (:class:`CVHeadRun`, a
:class:`HeadStack` vmapped over the folds), their out-of-fold scores, and the fold heads a cross-validated
candidate deploys averaged (:func:`fold_heads`). The linear probe's own CV is ``probe.probe_bank_cv``.
No Ray here."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .. import UserError
from ..devices import resolve_device
from ..features.bank import FeatureBank
from ..features.model import Head, build_head
from .engine import (
    TrialConfig,
    _load_progress,
    _rng_state,
    compute_metrics,
    make_criterion,
    make_optimizer,
    make_scheduler,
    passes_per_epoch,
)

log = logging.getLogger(__name__)

# --cv auto turns cross-validation on when valid holds fewer images than this: below it one image
# moves a valid accuracy by more than a third of a point, and picking the best of many trials on it
# mostly picks noise.
CV_AUTO_BELOW = 300
CV_AUTO_FOLDS = 5


# ------------------------------------------------------------------------------------------ folds
def pooled_view0(bank: FeatureBank) -> tuple[np.ndarray, np.ndarray]:
    """Train then valid, un-augmented view: ``(x (N, D) float32, y (N,))``, the pooled order of the folds."""
    train, valid = bank.splits["train"], bank.splits["valid"]
    x = np.concatenate([train.features[:, 0], valid.features[:, 0]]).astype(np.float32)
    return x, np.concatenate([train.targets, valid.targets]).astype(np.int64)


def fold_split(labels: Sequence, groups: Sequence, k: int, *, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) per image, keeping each group in one fold and each class spread evenly.

    Groups (near-duplicates, from labels.csv) are stratified by their majority class with the same
    greedy assignment as the train/valid/test split (``prepare.split_groups``, equal fractions): per
    class, largest groups first, each to the fold furthest below its share.
    """
    from ..data.prepare import split_groups

    if k < 2:
        raise UserError(f"--cv needs at least 2 folds, got {k}")
    classes, label_idx = np.unique(np.asarray(labels), return_inverse=True)
    _, group_idx = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(group_idx.max()) + 1
    if n_groups < k:
        raise UserError(f"--cv {k}: train+valid hold only {n_groups} distinct image groups; use fewer folds")
    votes = np.zeros((n_groups, len(classes)), dtype=np.int64)
    np.add.at(votes, (group_idx, label_idx), 1)
    fold_of_group, _ = split_groups(
        votes.argmax(1),
        votes.sum(1),
        [1.0 / k] * k,
        seed=seed,
        classes=[str(c) for c in classes],
        allow_small_classes=True,
    )
    return fold_of_group[group_idx].astype(np.int64)


def resolve_folds(cv: str | int | None, n_valid: int) -> int:
    """``--cv`` value -> number of folds (0 = off). ``auto``: ``CV_AUTO_FOLDS`` when valid has fewer
    than ``CV_AUTO_BELOW`` images, else off."""
    if cv in (None, "", "off", 0, "0"):
        return 0
    if cv == "auto":
        return CV_AUTO_FOLDS if n_valid < CV_AUTO_BELOW else 0
    try:
        k = int(cv)
    except (TypeError, ValueError):
        raise UserError(f"--cv must be a number of folds (>= 2), 'auto' or 'off', got {cv!r}") from None
    if k < 2:
        raise UserError(f"--cv must be a number of folds (>= 2), 'auto' or 'off', got {cv!r}")
    return k


def bank_folds(bank: FeatureBank, group_of_path: dict[str, str], k: int, *, seed: int = 0) -> np.ndarray:
    """Folds for ``bank``'s pooled train+valid images (order of :func:`pooled_view0`), grouped by the
    labels.csv ``group`` of each path."""
    paths = list(bank.splits["train"].paths) + list(bank.splits["valid"].paths)
    _, y = pooled_view0(bank)
    missing = [p for p in paths if p not in group_of_path]
    if missing:
        raise UserError(f"{len(missing)} bank image(s) have no group in labels.csv, e.g. {missing[:2]}")
    return fold_split(np.asarray(bank.classes)[y], [group_of_path[p] for p in paths], k, seed=seed)


# ------------------------------------------------------------------------- cross-validated trials
class HeadStack:
    """K heads of one architecture trained as one: their parameters stacked ``(K, ...)`` and the
    forward vmapped over them, so a K-fold trial costs one batched pass per step, not K.

    Each head's gradient is that of its own loss (the losses are summed), AdamW and SGD act element by
    element, and gradient clipping is per head: one step equals K separate steps (tested).
    """

    def __init__(self, heads: Sequence[nn.Module]):
        from torch.func import stack_module_state

        self.k = len(heads)
        self.base = copy.deepcopy(heads[0]).to("meta")  # the architecture only; numbers come from params
        params, buffers = stack_module_state(heads)
        self.params = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}  # leaves
        self.buffers = {n: b.detach().clone() for n, b in buffers.items()}
        self.training = True

    def to(self, device) -> HeadStack:
        self.params = {n: p.detach().to(device).requires_grad_(True) for n, p in self.params.items()}
        self.buffers = {n: b.to(device) for n, b in self.buffers.items()}
        return self

    def train(self, mode: bool = True) -> HeadStack:
        self.training = mode
        self.base.train(mode)
        return self

    def eval(self) -> HeadStack:
        return self.train(False)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (K, B, D) -> (K, B, C)
        from torch.func import functional_call, vmap

        def one(params, buffers, xk):
            return functional_call(self.base, (params, buffers), (xk,))

        return vmap(one, randomness="different")(self.params, self.buffers, x)

    def clip_grad_norm_(self, max_norm: float) -> None:
        """Per head, as ``clip_grad_norm_`` on each head alone would."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (K,)
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))

    def head(self, k: int, template: nn.Module) -> nn.Module:
        """Head ``k`` as a plain module (``template``: a module of the same architecture, overwritten)."""
        template.load_state_dict(
            {
                **{n: p[k].detach().cpu() for n, p in self.params.items()},
                **{n: b[k].cpu() for n, b in self.buffers.items()},
            }
        )
        return template

    def state_dict(self) -> dict:
        return {
            "params": {n: p.detach().cpu() for n, p in self.params.items()},
            "buffers": {n: b.cpu() for n, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n])
            for n, b in self.buffers.items():
                b.copy_(state["buffers"][n])


class PooledBank:
    """Train and valid of a bank pooled (train rows first, as :func:`pooled_view0`),
    without copying: ``rows(idx, views)`` gathers features. Valid images have only their un-augmented
    view, so they are drawn with view 0."""

    def __init__(self, bank: FeatureBank):
        with warnings.catch_warnings():  # read-only arrays from Ray's object store; never written
            warnings.simplefilter("ignore", UserWarning)
            self.train = torch.from_numpy(np.ascontiguousarray(bank.splits["train"].features))  # (Nt, V, D)
            self.valid = torch.from_numpy(np.ascontiguousarray(bank.splits["valid"].features))  # (Nv, 1, D)
        self.n_train, self.views = self.train.shape[0], self.train.shape[1]
        self.targets = torch.from_numpy(
            np.concatenate([bank.splits["train"].targets, bank.splits["valid"].targets]).astype(np.int64)
        )

    def __len__(self) -> int:
        return len(self.targets)

    def rows(self, idx: torch.Tensor, views: torch.Tensor | None = None) -> torch.Tensor:
        """Features (M, D) float32 of pooled rows ``idx`` (M,), train rows at ``views`` (default view 0)."""
        out = torch.empty(len(idx), self.train.shape[2], dtype=torch.float32)
        is_train = idx < self.n_train
        t = idx[is_train]
        out[is_train] = self.train[t, views[is_train] if views is not None else 0].float()
        out[~is_train] = self.valid[idx[~is_train] - self.n_train, 0].float()
        return out

    def view0(self) -> torch.Tensor:
        return self.rows(torch.arange(len(self)))  # (N, D)


class FoldBatches:
    """Training batches for K fold heads at once: ``(x (K, B, D), y (K, B), mask (K, B))``.

    Each epoch, fold k's training images (those outside fold k) are shuffled and, for train images,
    one of their K views drawn, seeded by ``seed``, the epoch and k. Folds differ in size by a few
    images; the shorter ones are padded and ``mask`` marks real rows.
    """

    def __init__(
        self,
        pooled: PooledBank,
        folds: np.ndarray,
        *,
        batch_size: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        self.pooled, self.batch_size, self.seed = pooled, int(batch_size), seed
        self.folds = torch.as_tensor(folds)
        self.k = int(self.folds.max()) + 1
        self.members = [torch.nonzero(self.folds != f).flatten() for f in range(self.k)]
        self.n_max = max(len(m) for m in self.members)
        self.device = torch.device(device)
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.n_max / self.batch_size)

    def __iter__(self):
        idx = torch.full((self.k, len(self) * self.batch_size), -1, dtype=torch.long)
        views = torch.zeros_like(idx)
        for f, members in enumerate(self.members):
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 101 + f)
            idx[f, : len(members)] = members[torch.randperm(len(members), generator=g)]
            views[f, : len(members)] = torch.randint(self.pooled.views, (len(members),), generator=g)
        for start in range(0, self.n_max, self.batch_size):
            i, v = idx[:, start : start + self.batch_size], views[:, start : start + self.batch_size]  # (K, B)
            mask = i >= 0
            safe = i.clamp(min=0)
            x = self.pooled.rows(safe.flatten(), v.flatten()).view(*i.shape, -1)
            y = self.pooled.targets[safe]
            yield x.to(self.device), y.to(self.device), mask.to(self.device)


class CVHeadRun:
    """One cross-validated trial: K heads (one per fold of train+valid pooled) trained batched.

    ``step()`` trains every head one epoch and scores each on its held-out fold. ``valid/*`` are
    out-of-fold scores over all N pooled images (so ``valid/acc`` is the size-weighted mean of the
    fold accuracies); ``valid/acc_sd``, ``_min`` and ``_max`` are the spread over the K folds.
    Each head is standardised with its own training images' statistics. The deployed model of a CV
    trial is its K fold heads averaged (``final.Candidate``), chosen on these out-of-fold scores.
    """

    def __init__(self, cfg: TrialConfig, *, bank: FeatureBank, folds: np.ndarray, device: str | torch.device = "auto"):
        self.cfg, self.device, self.epoch = cfg, resolve_device(device), 0
        torch.manual_seed(cfg.seed)
        self.classes, self.weights = bank.classes, bank.weights
        self.n_classes = len(bank.classes)
        self.pooled = PooledBank(bank)
        self.folds = np.asarray(folds, dtype=np.int64)
        if len(self.folds) != len(self.pooled):
            raise ValueError(f"{len(self.folds)} fold labels for {len(self.pooled)} pooled images")
        self.batches = FoldBatches(
            self.pooled, self.folds, batch_size=cfg.batch_size, seed=cfg.seed, device=self.device
        )
        self.k = self.batches.k
        x0 = self.pooled.view0().numpy()
        heads, self.criteria = [], []
        for f in range(self.k):
            train = self.folds != f
            head = build_head(
                cfg.head, in_dim=x0.shape[1], n_classes=self.n_classes, hidden=cfg.hidden, dropout=cfg.dropout
            )
            head.set_standardization(x0[train].mean(0), x0[train].std(0))
            heads.append(head)
            counts = np.bincount(self.pooled.targets.numpy()[train], minlength=self.n_classes)
            self.criteria.append(make_criterion(cfg, counts, self.device))
        self.template = heads[0]
        self.stack = HeadStack(heads).to(self.device)
        self.last_logits: torch.Tensor | None = None
        self.optimizer = make_optimizer(self.stack.parameters(), cfg)
        self.passes = passes_per_epoch(cfg, len(self.batches))
        self.scheduler = make_scheduler(self.optimizer, cfg, len(self.batches) * self.passes)

    def train_epoch(self) -> dict:
        lr = self.optimizer.param_groups[0]["lr"]
        self.stack.train()
        total, correct, n = 0.0, 0, 0
        for x, y, mask in self._passes():
            logits = self.stack(x)  # (K, B, C)
            losses = [self.criteria[f](logits[f][mask[f]], y[f][mask[f]]) for f in range(self.k) if mask[f].any()]
            loss = torch.stack(losses).sum()  # each head's gradient is that of its own loss
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip > 0:
                self.stack.clip_grad_norm_(self.cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            m = int(mask.sum())
            total += float(loss.detach()) / len(losses) * m
            correct += int(((logits.detach().argmax(-1) == y) & mask).sum())
            n += m
        if not math.isfinite(total):
            raise FloatingPointError("training loss is not finite (learning rate too high?)")
        self.epoch += 1
        return {"epoch": self.epoch, "lr": lr, "train/loss": total / n, "train/acc": correct / n}

    def _passes(self):
        """The batches of this epoch's passes over the pooled train rows (each pass its own views)."""
        for p in range(self.passes):
            self.batches.epoch = self.epoch * self.passes + p
            yield from self.batches

    @torch.inference_mode()
    def out_of_fold_logits(self) -> torch.Tensor:
        """(N, C): each pooled image scored by the head that did not train on it."""
        self.stack.eval()
        x = self.pooled.view0()
        out = torch.empty(len(x), self.n_classes)
        folds = torch.as_tensor(self.folds)
        for start in range(0, len(x), 1024):
            xb = x[start : start + 1024].to(self.device)
            logits = self.stack(xb.expand(self.k, *xb.shape)).float().cpu()  # (K, B, C)
            rows = torch.arange(len(xb))
            out[start : start + len(xb)] = logits[folds[start : start + len(xb)], rows]
        return out

    def step(self) -> dict:
        out = self.train_epoch()
        logits = self.last_logits = self.out_of_fold_logits()
        y = self.pooled.targets
        va = compute_metrics(y.numpy(), logits.argmax(1).numpy(), self.n_classes)
        hit = (logits.argmax(1) == y).numpy()
        fold_acc = np.array([hit[self.folds == f].mean() for f in range(self.k)])
        out.update(
            {
                "valid/loss": float(nn.functional.cross_entropy(logits, y)),
                "valid/acc": va["acc"],
                "valid/macro_f1": va["macro_f1"],
                "valid/balanced_acc": va["balanced_acc"],
                "valid_count": va["count"],
                "cv_folds": self.k,
                "valid/acc_sd": float(fold_acc.std(ddof=1)) if self.k > 1 else 0.0,
                "valid/acc_min": float(fold_acc.min()),
                "valid/acc_max": float(fold_acc.max()),
            }
        )
        for c, r in zip(self.classes, va["recall"]):
            out[f"valid/recall/{c}"] = r
        return out

    def fold_head(self, f: int) -> nn.Module:
        template = copy.deepcopy(self.template)
        return self.stack.head(f, template).eval()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "stack": self.stack.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.cfg.to_dict(),
            "folds": self.k,
            # this epoch's out-of-fold logits (N, C): the trial's valid predictions, for the final choice
            "oof_logits": self.last_logits if self.last_logits is not None else torch.empty(0),
            "classes": list(self.classes),
            "weights": self.weights,
            **_rng_state(self.device),
        }

    def load_state_dict(self, state: dict) -> None:
        self.stack.load_state_dict(state["stack"])
        self.epoch = _load_progress(state, self.optimizer, self.scheduler, self.device)


def fold_heads(state: dict, cfg: TrialConfig, *, n_classes: int) -> list[Head]:
    """The K fold heads of a cross-validated trial's checkpoint (``CVHeadRun.state_dict()``), as plain
    heads: together, averaged, they are the trial's deployed model."""
    params, buffers = state["stack"]["params"], state["stack"]["buffers"]
    k, in_dim = buffers["mean"].shape
    heads = []
    for f in range(k):
        head = build_head(cfg.head, in_dim=int(in_dim), n_classes=n_classes, hidden=cfg.hidden, dropout=cfg.dropout)
        head.load_state_dict({**{n: p[f] for n, p in params.items()}, **{n: b[f] for n, b in buffers.items()}})
        heads.append(head.eval())
    return heads
