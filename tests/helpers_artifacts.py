"""Builders for the after-the-search tools' tests: a tiny trained model artifact and a hand-made experiment.

Kept out of conftest.py so the fixtures that use them stay in the test files that need them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tune_rice.data import images as data
from tune_rice.features import bank as features
from tune_rice.features import model
from tune_rice.heads import engine

TINY_CONFIG = dict(backbone="resnet18", image_size=32, views=1, aug_policy="none", epochs=3, hidden=32, lr=3e-3, seed=0)


def train_tiny_artifact(labels_csv: Path, out: Path, *, cache_dir: Path) -> Path:
    """A real model.pt: random-init resnet18 at 32 px, a head trained a few epochs on its feature bank."""
    cfg = engine.TrialConfig(**TINY_CONFIG)
    bank = features.extract_bank(
        labels_csv, cfg.feature_spec(), weights="none", cache_dir=cache_dir, device="cpu", num_workers=0, progress=False
    )
    run = engine.HeadRun(cfg, bank=bank, device="cpu")
    for _ in range(cfg.epochs):
        run.step()
    backbone, resolved = model.build_backbone(cfg.backbone, weights="none", seed=cfg.seed, feature_layer="pooled")
    classifier = model.Classifier(backbone, run.head.cpu()).eval()
    return model.save_artifact(
        out,
        classifier,
        classes=bank.classes,
        preprocessing=data.preprocessing_spec(32),
        weights=resolved,
        config=cfg.to_dict(),
        metrics={"note": "test artifact"},
    )


# ----------------------------------------------------------------------------- a hand-made experiment
FAKE_SPACE = """\
description: a fake space for report tests
metric: valid/acc
mode: max
max_epochs: 9
params:
  backbone: resnet18
  lr: {loguniform: [1.0e-4, 1.0e-1]}
  dropout: {uniform: [0.0, 0.5]}
  hidden: {choice: [0, 64, 256]}
  optimizer: {choice: [adamw, sgd]}
  warmup_epochs: {randint: [0, 3]}
"""

FAKE_CLASSES = ["bacterial_leaf_blight", "brown_spot", "healthy", "leaf_blast", "tungro"]


def make_fake_experiment(
    root: Path, *, n_trials: int = 24, n_errored: int = 2, seed: int = 0, weights: str = "random:seed=0"
) -> Path:
    """``root/runs/fake``: what search.py writes (results.csv, search_args.json, test_metrics.json,
    trial_<id>/progress.csv), with ASHA-like early stops, errored trials, and the best lr near 0.1."""
    rng = np.random.default_rng(seed)
    exp = root / "runs" / "fake"
    exp.mkdir(parents=True)
    space = root / "fake_space.yaml"
    space.write_text(FAKE_SPACE)
    (exp / "search_args.json").write_text(
        json.dumps(
            {
                "data": str(root / "data" / "labels.csv"),
                "num_samples": n_trials,
                "search_space": str(space),
                "max_epochs": None,
                "grace_period": 1,
                "reduction_factor": 3,
                "storage_path": str(root / "runs"),
                "name": "fake",
                "seed": seed,
                "weights": weights.split(":")[0] if weights.startswith("random") else weights,
                "feature_cache": "on",
                "no_report": True,
            },
            indent=1,
        )
    )
    rows = []
    for k in range(n_trials):
        trial_id = f"{k:03d}ab{rng.integers(16**3):03x}"
        lr = float(10 ** rng.uniform(-4, -1)) if k else 0.095  # trial 0 (the best) at the upper edge
        dropout, hidden = float(rng.uniform(0, 0.5)), int(rng.choice([0, 64, 256]))
        optimizer, warmup = str(rng.choice(["adamw", "sgd"])), int(rng.integers(0, 4))
        quality = (
            0.9 - 0.12 * abs(math.log10(lr) + 1) - 0.2 * dropout + (0.05 if hidden else 0) + (0.25 if k == 0 else 0)
        )
        errored = 0 < k <= n_errored
        epochs = 2 if errored else 9 if k == 0 else int(rng.choice([1, 3, 9, 9]))
        accs = [float(np.clip(quality * (1 - 0.6 * 0.5**e) + rng.normal(0, 0.01), 0, 1)) for e in range(epochs)]
        trial_dir = exp / f"trial_{trial_id}"
        trial_dir.mkdir()
        progress = pd.DataFrame(
            {
                "epoch": range(1, epochs + 1),
                "train/loss": np.linspace(1.5, 0.5, epochs),
                "valid/loss": [1.5 - a for a in accs],
                "valid/acc": accs,
                "training_iteration": range(1, epochs + 1),
                "trial_id": trial_id,
            }
        )
        progress.to_csv(trial_dir / "progress.csv", index=False)
        (trial_dir / "params.json").write_text(json.dumps({"lr": lr, "dropout": dropout, "hidden": hidden}))
        best_i = int(np.argmax(accs))
        row = {
            "trial_id": trial_id,
            "status": "ERROR" if errored else "TERMINATED",
            "epochs": epochs,
            "stopped_early": bool(not errored and epochs < 9),
            "best/valid/acc": accs[best_i],
            "best_epoch": best_i + 1,
            "last/valid/acc": accs[-1],
            "last/valid/loss": 1.5 - accs[-1],
            "weights": weights,
        }
        if errored:
            row["error"] = "RuntimeError: training loss is not finite (learning rate too high?)"
        row.update(
            {
                "config/backbone": "resnet18",
                "config/dropout": dropout,
                "config/hidden": hidden,
                "config/lr": lr,
                "config/optimizer": optimizer,
                "config/warmup_epochs": warmup,
                "trial_dir": str(trial_dir),
            }
        )
        rows.append(row)
    df = pd.DataFrame(rows).sort_values("best/valid/acc", ascending=False).reset_index(drop=True)
    df.to_csv(exp / "results.csv", index=False)
    n = len(FAKE_CLASSES)
    cm = (np.eye(n, dtype=int) * 8 + rng.integers(0, 3, (n, n))).tolist()
    (exp / "test_metrics.json").write_text(
        json.dumps(
            {
                "trial_id": df["trial_id"].iloc[0],
                "weights": weights,
                "pretrained": not weights.startswith("random:"),
                "accuracy": 0.8,
                "macro_f1": 0.79,
                "loss": 0.6,
                "test_count": int(np.sum(cm)),
                "classes": FAKE_CLASSES,
                "per_class": {
                    c: {"precision": 0.8, "recall": 0.8, "f1": 0.8, "support": int(np.sum(cm[i]))}
                    for i, c in enumerate(FAKE_CLASSES)
                },
                "confusion_matrix": cm,
            },
            indent=1,
        )
    )
    return exp


# ------------------------------------------------------------------------------------------- fixtures
# Session-scoped, and loaded as a plugin (``pytest_plugins = ["helpers_artifacts"]`` in the test modules) so
# that predict, evaluate, export and report tests share one trained model and one real search.
@dataclass
class TinyModel:
    labels_csv: Path
    root: Path  # the dataset folder (class sub-folders)
    model_path: Path
    work: Path  # a scratch folder for the session


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    from conftest import make_separable_dataset

    work = tmp_path_factory.mktemp("tiny_model")
    csv = make_separable_dataset(work / "data", per_class=12, size=40)
    path = train_tiny_artifact(csv, work / "run" / "best" / "model.pt", cache_dir=work / "cache")
    return TinyModel(csv, csv.parent, path, work)


TINY_SPACE = """\
metric: valid/acc
mode: max
max_epochs: 3
params:
  backbone: resnet18
  image_size: 32
  views: 1
  aug_policy: none
  lr: {loguniform: [1.0e-4, 1.0e-1]}
  hidden: {choice: [0, 32]}
"""


@pytest.fixture(scope="session")
def real_search(tmp_path_factory) -> Path:
    """A real (tiny) Ray Tune search, run once per session: ~40 s on 2 CPUs. Returns runs/<name>."""
    from conftest import make_separable_dataset

    from tune_rice.search import run as search

    work = tmp_path_factory.mktemp("real_search")
    csv = make_separable_dataset(work / "data", per_class=12, size=40)
    (work / "space.yaml").write_text(TINY_SPACE)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNE_RICE_CACHE", str(work / "cache"))
        mp.setenv("TUNE_RICE_OFFLINE", "1")
        rc = search.main(
            [
                "--data",
                str(csv),
                "--num-samples",
                "4",
                "--search-space",
                str(work / "space.yaml"),
                "--weights",
                "none",
                "--storage-path",
                str(work / "runs"),
                "--name",
                "r",
                "--max-concurrent",
                "2",
                "--grace-period",
                "1",
            ]
        )  # with the report, as users run it
    assert rc == 0
    yield work / "runs" / "r"
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def fake_experiment():
    """:func:`make_fake_experiment`, as a fixture (test modules get helpers through the plugin, not imports)."""
    return make_fake_experiment
