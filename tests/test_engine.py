"""Training and evaluation functions, on small synthetic feature banks (no backbone, no images)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tune_rice import UserError
from tune_rice.features.bank import FeatureBank, FeatureSpec, SplitFeatures
from tune_rice.features.model import build_head
from tune_rice.heads.engine import (
    BankBatches,
    HeadRun,
    TrialConfig,
    compute_metrics,
    evaluate,
    make_criterion,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
)


def _split(n: int, k: int, d: int, *, seed: int, n_classes: int = 3, shift: float = 2.0) -> SplitFeatures:
    """Gaussian blobs, one per class, with K noisy views of each point. features (N, K, D) float16."""
    rng = np.random.default_rng(seed)
    targets = np.arange(n) % n_classes
    centres = np.random.default_rng(123).normal(0, shift, size=(n_classes, d))
    base = centres[targets] + rng.normal(0, 1, size=(n, d))
    views = base[:, None, :] + rng.normal(0, 0.3, size=(n, k, d))
    views[:, 0] = base
    return SplitFeatures(views.astype(np.float16), targets.astype(np.int64), [f"img{i}.png" for i in range(n)])


def synthetic_bank(*, n_train: int = 60, n_valid: int = 30, k: int = 3, d: int = 16) -> FeatureBank:
    train, valid = _split(n_train, k, d, seed=0), _split(n_valid, 1, d, seed=1)
    f0 = train.features[:, 0].astype(np.float32)
    return FeatureBank(
        spec=FeatureSpec(backbone="resnet18", image_size=32, views=k),
        weights="random:seed=0",
        pretrained=False,
        classes=("a", "b", "c"),
        splits={"train": train, "valid": valid},
        mean=f0.mean(0),
        std=f0.std(0),
    )


# -------------------------------------------------------------------------------------------- metrics
def test_compute_metrics_by_hand():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    m = compute_metrics(y_true, y_pred, 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # rows = true class
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert m["recall"] == pytest.approx([1 / 2, 1.0, 1 / 2])
    assert m["f1"] == pytest.approx([0.5, 0.8, 2 / 3])
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["support"] == [2, 2, 2] and m["count"] == 6
    perfect = compute_metrics(y_true, y_true, 3)
    assert perfect["acc"] == 1.0 and perfect["macro_f1"] == 1.0


def test_macro_f1_and_balanced_accuracy_are_scikit_learns_over_all_classes():
    from sklearn.metrics import balanced_accuracy_score, f1_score

    y_true = np.array([0, 0, 1, 1, 1, 2, 2, 0])  # class 3 never occurs and is predicted once; 4 neither
    y_pred = np.array([0, 1, 1, 1, 3, 2, 0, 0])
    m = compute_metrics(y_true, y_pred, 5)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, labels=range(5), average="macro", zero_division=0))
    with pytest.warns(UserWarning):  # scikit-learn warns of the class predicted but absent
        assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))


# -------------------------------------------------------------------------------------------- batches
def _view_bank(n: int = 40, k: int = 4) -> SplitFeatures:
    """Feature value = 10 * image + view, so each drawn row says which image and view it came from."""
    values = (10 * np.arange(n)[:, None] + np.arange(k)[None, :]).astype(np.float16)  # (N, K)
    return SplitFeatures(np.repeat(values[:, :, None], 2, axis=2), np.arange(n) % 3, [str(i) for i in range(n)])


def _draw(batches: BankBatches, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    batches.epoch = epoch
    xs, ys = zip(*batches)
    x = torch.cat(xs)[:, 0].numpy().astype(np.int64)
    return x // 10, x % 10  # image index, view index


def test_bank_batches_draw_views_per_epoch_deterministically():
    split = _view_bank()
    batches = BankBatches(split, batch_size=7, train=True, seed=3)
    assert len(batches) == math.ceil(40 / 7)
    images0, views0 = _draw(batches, 0)
    images1, views1 = _draw(batches, 1)
    for images in (images0, images1):
        assert sorted(images) == list(range(40))  # every image once per epoch
    assert not np.array_equal(views0[np.argsort(images0)], views1[np.argsort(images1)])  # other views
    assert not np.array_equal(images0, images1)  # another order
    assert set(views0) == {0, 1, 2, 3}
    again = BankBatches(split, batch_size=13, train=True, seed=3)  # fresh object, other batch size
    images0b, views0b = _draw(again, 0)
    assert np.array_equal(images0, images0b) and np.array_equal(views0, views0b)
    _, views_other_seed = _draw(BankBatches(split, batch_size=7, train=True, seed=4), 0)
    assert not np.array_equal(views0, views_other_seed)

    targets = torch.cat([y for _, y in batches]).numpy()
    batches.epoch = 1
    assert np.array_equal(targets, split.targets[images1])  # targets travel with their features

    evaluation = BankBatches(split, batch_size=7, train=False, seed=3)
    images_e, views_e = _draw(evaluation, 5)
    assert np.array_equal(images_e, np.arange(40)) and not views_e.any()  # view 0, in order


# ------------------------------------------------------------------------------------------ optimisers
def test_make_optimizer():
    head = build_head("pooled", in_dim=8, n_classes=3, hidden=4)
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    params = [*head.parameters(), frozen]
    sgd = make_optimizer(params, TrialConfig(optimizer="sgd", lr=0.1, momentum=0.8, weight_decay=1e-3))
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.8, 1e-3, True)
    assert all(p is not frozen for p in group["params"]) and len(group["params"]) == 4
    no_momentum = make_optimizer(params, TrialConfig(optimizer="sgd", momentum=0.0))
    assert no_momentum.param_groups[0]["nesterov"] is False  # torch refuses nesterov without momentum
    adamw = make_optimizer(params, TrialConfig(optimizer="adamw", lr=0.01, weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.05
    cfg = TrialConfig()
    cfg.optimizer = "rmsprop"  # past validation
    with pytest.raises(UserError, match="Only adamw, sgd"):
        make_optimizer(params, cfg)


def _lrs(cfg: TrialConfig, steps_per_epoch: int) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(opt, cfg, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedules_with_warmup():
    # 4 epochs of 5 steps, 1 warmup epoch: steps 0-4 ramp (s+1)/6, then the schedule over steps 5-19.
    cosine = _lrs(TrialConfig(lr=1.0, epochs=4, warmup_epochs=1, schedule="cosine"), 5)
    assert cosine[:5] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6])
    assert cosine[5] == pytest.approx(1.0)
    assert cosine[5 + 15 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert cosine[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 14 / 15)))
    assert all(a >= b for a, b in zip(cosine[5:], cosine[6:]))
    constant = _lrs(TrialConfig(lr=0.1, epochs=4, warmup_epochs=1, schedule="constant"), 5)
    assert constant[:5] == pytest.approx([0.1 * s / 6 for s in range(1, 6)])
    assert constant[5:] == pytest.approx([0.1] * 15)
    assert _lrs(TrialConfig(lr=0.1, epochs=2, schedule="constant"), 3) == pytest.approx([0.1] * 6)
    # Warmup longer than the run: clamped, the LR still ramps and never divides by zero.
    short = _lrs(TrialConfig(lr=1.0, epochs=1, warmup_epochs=5, schedule="cosine"), 4)
    assert short == pytest.approx([1 / 4, 2 / 4, 3 / 4, 1.0])


def test_grad_clip_bounds_the_norm():
    bank = synthetic_bank()
    norms = {}
    for clip in (0.0, 0.05):
        torch.manual_seed(0)
        head = build_head("pooled", in_dim=bank.dim, n_classes=3, hidden=0)
        head.set_standardization(bank.mean, bank.std)
        opt = torch.optim.SGD(head.parameters(), lr=5.0)  # a large LR: big, growing gradients
        seen = []

        def record(optimizer, args, kwargs, seen=seen, head=head):  # runs after clipping, just before the update
            seen.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in head.parameters()]))))

        opt.register_step_pre_hook(record)
        batches = BankBatches(bank.splits["train"], batch_size=8, train=True)
        train_one_epoch(head, batches, optimizer=opt, criterion=nn.CrossEntropyLoss(), grad_clip=clip)
        norms[clip] = seen
    assert max(norms[0.0]) > 0.5  # unclipped gradients are far above the bound
    assert max(norms[0.05]) <= 0.05 * (1 + 1e-5)


def test_class_balanced_weights_and_label_smoothing():
    counts = np.array([10, 30, 60])
    balanced = make_criterion(TrialConfig(class_balanced=True), counts, "cpu")
    assert balanced.weight.tolist() == pytest.approx([100 / 30, 100 / 90, 100 / 180])  # N / (C * n_c)
    assert make_criterion(TrialConfig(), counts, "cpu").weight is None
    # An empty class does not divide by zero.
    assert torch.isfinite(make_criterion(TrialConfig(class_balanced=True), np.array([5, 0, 5]), "cpu").weight).all()

    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0], [0.0, 0.0, 4.0]])
    y = torch.tensor([0, 1, 2, 0])  # confident; the last one confidently wrong, on the rare class 0
    plain = float(make_criterion(TrialConfig(), counts, "cpu")(logits, y))
    smooth = float(make_criterion(TrialConfig(label_smoothing=0.2), counts, "cpu")(logits, y))
    weighted = float(balanced(logits, y))
    assert smooth != pytest.approx(plain)
    expected = float(nn.functional.cross_entropy(logits, y, label_smoothing=0.2))
    assert smooth == pytest.approx(expected)
    assert weighted > plain  # the rare class's mistake counts more


class _MoveSpy(nn.CrossEntropyLoss):
    """Records being moved (``.cpu()``, ``.to()``): on a GPU that would strand the training criterion."""

    moved = False

    def _apply(self, fn, recurse=True):
        self.moved = True
        return super()._apply(fn, recurse)


def test_evaluate_leaves_the_training_criterion_alone():
    bank = synthetic_bank()
    head = build_head("pooled", in_dim=bank.dim, n_classes=3, hidden=0).eval()
    criterion = _MoveSpy(weight=torch.tensor([1.0, 2.0, 3.0]))
    batches = BankBatches(bank.splits["valid"], batch_size=7, train=False)
    metrics = evaluate(head, batches, n_classes=3, criterion=criterion)
    assert not criterion.moved and metrics["count"] == 30 and 0 <= metrics["acc"] <= 1
    with torch.no_grad():
        logits = head(torch.from_numpy(bank.splits["valid"].features[:, 0]))
    expected = nn.functional.cross_entropy(
        logits, torch.from_numpy(bank.splits["valid"].targets), weight=torch.tensor([1.0, 2.0, 3.0])
    )
    assert metrics["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert evaluate(head, batches, n_classes=3)["loss"] != pytest.approx(metrics["loss"])  # plain CE by default


# -------------------------------------------------------------------------------------------- config
def test_trial_config_rejects_unknown_keys_and_lists_valid_ones():
    with pytest.raises(UserError) as err:
        TrialConfig.from_dict({"lr": 0.1, "learning_rate": 0.1})
    message = str(err.value)
    assert "learning_rate" in message and "valid:" in message
    assert all(name in message for name in ("lr", "hidden", "optimizer", "label_smoothing", "warmup_epochs"))


def test_trial_config_coerces_types():
    cfg = TrialConfig.from_dict(
        {
            "lr": "0.01",
            "hidden": 64.0,
            "epochs": np.int64(3),
            "nesterov": "false",
            "class_balanced": 1,
            "dropout": np.float32(0.25),
            "image_size": "48",
        }
    )
    assert cfg.lr == 0.01 and type(cfg.lr) is float
    assert cfg.hidden == 64 and type(cfg.hidden) is int
    assert cfg.epochs == 3 and type(cfg.epochs) is int
    assert cfg.nesterov is False and cfg.class_balanced is True
    assert cfg.dropout == pytest.approx(0.25) and type(cfg.dropout) is float
    assert cfg.image_size == 48
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    assert TrialConfig.from_dict({}) == TrialConfig()


@pytest.mark.parametrize(
    "values, words",
    [
        ({"hidden": 3.5}, "'hidden'"),
        ({"epochs": "many"}, "'epochs'"),
        ({"nesterov": "maybe"}, "'nesterov'"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"schedule": "step"}, "schedule must be one of"),
        ({"head": "transformer"}, "head must be one of"),
        ({"aug_policy": "wild"}, "aug_policy must be one of"),
        ({"lr": -1}, "lr must be > 0"),
        ({"lr": float("nan")}, "lr must be > 0"),
        ({"dropout": 1.0}, "dropout"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"views": 0}, "views"),
        ({"batch_size": 0}, "batch_size"),
        ({"grad_clip": -1}, "grad_clip"),
    ],
)
def test_trial_config_rejects_invalid_values(values, words):
    with pytest.raises(UserError) as err:
        TrialConfig.from_dict(values)
    assert words in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ head runs
CFG = dict(
    backbone="resnet18",
    image_size=32,
    views=3,
    hidden=16,
    dropout=0.3,
    lr=3e-3,
    batch_size=8,
    epochs=5,
    warmup_epochs=1,
    seed=7,
    label_smoothing=0.1,
)


def test_head_run_learns_blobs():
    run = HeadRun(TrialConfig(**CFG), bank=synthetic_bank(), device="cpu")
    history = [run.step() for _ in range(5)]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["valid/acc"] > 0.9 and history[-1]["train/loss"] < history[0]["train/loss"]
    assert history[0]["lr"] < history[1]["lr"]  # warmup


def test_head_run_resume_matches_an_uninterrupted_run(tmp_path):
    bank = synthetic_bank()
    cfg = TrialConfig.from_dict(CFG)
    straight = HeadRun(cfg, bank=bank, device="cpu")
    expected = [straight.step() for _ in range(4)]

    first = HeadRun(cfg, bank=bank, device="cpu")
    assert [first.step() for _ in range(2)] == expected[:2]
    torch.save(first.state_dict(), tmp_path / "checkpoint.pt")
    del first
    torch.rand(1000)  # whatever ran in between (other trials in the same worker) must not matter

    resumed = HeadRun(cfg, bank=bank, device="cpu")
    resumed.load_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=True))
    assert resumed.epoch == 2
    assert [resumed.step() for _ in range(2)] == expected[2:]  # bit-identical metrics, dropout included


def test_min_steps_repeats_passes_within_each_epoch_and_the_schedule_spans_them():
    from tune_rice.heads.cv import CVHeadRun
    from tune_rice.heads.engine import make_criterion

    bank = synthetic_bank(n_train=60)  # batch 32: 2 steps a pass
    cfg = TrialConfig.from_dict({**CFG, "batch_size": 32, "epochs": 3, "min_steps": 40})
    run = HeadRun(cfg, bank=bank, device="cpu")
    assert run.passes == math.ceil(40 / (3 * 2)) == 7
    for _ in range(3):
        run.step()
    assert run.scheduler.last_epoch == 3 * 7 * 2  # optimiser steps taken, at least min_steps
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ends with the steps
    cv = CVHeadRun(cfg, bank=bank, folds=np.arange(90) % 3, device="cpu")
    cv.step()
    assert cv.passes == math.ceil(40 / (3 * len(cv.batches))) and cv.scheduler.last_epoch == cv.passes * len(cv.batches)
    # label smoothing is for hidden layers only: a linear head trains on the plain targets
    assert make_criterion(TrialConfig(hidden=0, label_smoothing=0.1), np.ones(3), "cpu").label_smoothing == 0.0
    assert make_criterion(TrialConfig(hidden=8, label_smoothing=0.1), np.ones(3), "cpu").label_smoothing == 0.1


def test_head_run_needs_exactly_one_source():
    with pytest.raises(ValueError):
        HeadRun(TrialConfig(**CFG))
