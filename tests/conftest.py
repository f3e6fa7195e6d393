"""Shared fixtures: tiny generated datasets so every test runs on CPU in seconds."""

from __future__ import annotations

import collections
import contextlib
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

# No test may reach the network or the user's caches.
os.environ.setdefault("TUNE_RICE_OFFLINE", "1")
# One torch thread in the test process and the processes it starts (set before torch is imported; Ray
# workers get one already). The tests' tensors are tiny, and on 2 cores with Ray's processes or other jobs
# beside it a second OpenMP thread spends its time waiting: test_backbones' fast tests took 674 s with two
# threads and 119 s with one, back to back at load average 6-10 on this 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray starts its worker processes at nice 15 (its worker_niceness), so beside other busy processes at nice 0
# a test's trials and extraction tasks get a small share of the CPU: with two CPU burners beside it, the slow
# suite took over an hour (the whole suite: 12 minutes unloaded). The tests' Ray workers run at the tests'
# own priority.
os.environ.setdefault("RAY_worker_niceness", "0")


def pytest_collection_modifyitems(config, items):
    """The heaviest modules first, each module's own order kept. ``make test`` runs the suite in 2 processes
    that each take a whole module at a time (pytest-xdist's ``--dist loadfile --no-loadscope-reorder``):
    starting with the modules of end-to-end searches keeps one process from being left alone at the end
    with one of them. A module's weight: 30 per slow test (a Ray search takes tens of seconds), 1 per other."""
    weight: collections.Counter = collections.Counter()
    for item in items:
        weight[item.path] += 30 if item.get_closest_marker("slow") else 1
    items.sort(key=lambda item: -weight[item.path])  # a stable sort: modules stay whole and in order


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "tune_rice_cache"
    monkeypatch.setenv("TUNE_RICE_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch_home"))


@contextlib.contextmanager
def local_ray(tmp_path_factory, **init_kwargs):
    """A local Ray for a test module, its workers on the same isolated caches as ``_isolated_caches``
    (workers inherit the driver's environment at ``ray.init``, so it is set here, for the module)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    base = tmp_path_factory.getbasetemp()
    env = {
        "TUNE_RICE_CACHE": str(base / "tune_rice_cache"),
        "TORCH_HOME": str(base / "torch_home"),
        "TUNE_RICE_OFFLINE": "1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", **init_kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def error_line(err: str) -> str:
    """The one ``error: `` line of a command's stderr. It is the last line the command prints itself, but
    a line from a Ray worker's log (``log_to_driver``) can reach the driver's stderr after it."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


CLASS_COLOURS = {"alpha": (200, 60, 50), "beta": (50, 170, 60), "gamma": (60, 80, 200)}


def make_separable_dataset(
    root: Path, *, per_class: int = 12, size: int = 48, seed: int = 0, splits=(0.5, 0.25, 0.25)
) -> Path:
    """Class folders of textured images whose mean colour identifies the class; writes labels.csv."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, colour in CLASS_COLOURS.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        n_train = int(per_class * splits[0])
        n_valid = int(per_class * splits[1])
        for i in range(per_class):
            base = np.array(colour, dtype=np.float64)
            noise = rng.normal(0, 35, size=(size, size, 3))
            arr = np.clip(base + noise, 0, 255).astype(np.uint8)
            rel = f"{label}/{label}_{i:03d}.png"
            Image.fromarray(arr).save(root / rel)
            split = "train" if i < n_train else "valid" if i < n_train + n_valid else "test"
            rows.append({"path": rel, "label": label, "split": split, "group": f"g{len(rows):04d}"})
    csv = root / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


# A space whose checks pass: what the tests that stop before any trial (or run one or two) search over.
SMALL_SPACE = """\
metric: valid/acc
max_epochs: 2
params:
  backbone: resnet18
  image_size: 32
  views: 1
  lr: {loguniform: [1.0e-3, 3.0e-2]}
"""


def search_argv(labels: Path, space: Path, storage: Path | str, name: str, *extra, weights: str = "none") -> list[str]:
    """``tune_rice.search.run`` arguments for a test search: no report, random init unless ``weights`` says."""
    return [
        "--data",
        str(labels),
        "--search-space",
        str(space),
        "--weights",
        weights,
        "--storage-path",
        str(storage),
        "--name",
        name,
        "--no-report",
        *map(str, extra),
    ]


@pytest.fixture
def separable(tmp_path) -> Path:
    """labels.csv of a tiny 3-class separable dataset (12 images per class, 48 px)."""
    return make_separable_dataset(tmp_path / "data")
