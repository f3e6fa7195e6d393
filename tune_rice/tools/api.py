"""The Python API: a finished search and its deployed model, for notebooks and scripts.

    import tune_rice

    result = tune_rice.search(data="photos/", num_samples=30)   # the search of `tune-rice search`
    model = tune_rice.load(result.path)                          # or a runs/<name> folder, or best/model.pt
    model.predict(["leaf.jpg", pil_image, numpy_array])          # labels and calibrated probabilities

``tune_rice.search.run`` is the search module, callable (``search.search``); this module holds what it
returns (:class:`SearchResult`) and :func:`load` with the :class:`Model` it gives. The model runs the code
of the command-line tools: ``predict.predict_files`` (the same preprocessing and numbers as
``tune-rice predict``), ``evaluate.evaluate_data`` (with its test-read ledger) and
``explain.explain_files``. Nothing here imports Ray.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .. import UserError
from ..features.model import LoadedModel, load_model
from ..records import MODEL_PATH, RESULTS_FILE, TEST_METRICS_FILE

ImageLike = str | os.PathLike | Image.Image | np.ndarray


class Model:
    """A trained tune-rice model (``best/model.pt`` or a TorchScript export) ready for inference."""

    def __init__(self, loaded: LoadedModel, *, device: str | torch.device = "cpu"):
        self.loaded, self.device = loaded, torch.device(device)

    @property
    def classes(self) -> list[str]:
        return list(self.loaded.classes)

    @property
    def path(self) -> Path:
        return self.loaded.path

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, classes={self.classes}, weights={self.loaded.weights!r})"

    def predict(self, images: ImageLike | Sequence[ImageLike], *, batch_size: int = 64) -> pd.DataFrame:
        """One row per image (files, folders searched recursively, PIL images or (H, W, 3) / (H, W) uint8
        arrays): ``image`` (the path, or ``image[i]`` for an in-memory one), ``label``, ``score`` (its
        probability) and one probability column per class, named by it; calibrated when the model holds
        a temperature fitted on valid. A file that will not decode gets ``error`` and no label."""
        from .predict import predict_files

        items, names = _inputs(images)
        pred = predict_files(self.loaded, items, batch_size=batch_size, device=self.device, progress=False)
        assert pred.probabilities is not None  # predict_files keeps every class's probability
        table = pd.DataFrame({"image": names, "label": pred.table["label"], "score": pred.table["score"]})
        probs = pd.DataFrame(pred.probabilities, columns=self.classes)
        return pd.concat([table, probs, pred.table[["error"]]], axis=1)

    def evaluate(
        self,
        data: str | os.PathLike,
        *,
        split: str | None = None,
        data_root: str | os.PathLike | None = None,
        batch_size: int = 64,
    ) -> dict:
        """The scores of ``tune-rice evaluate`` (accuracy, macro_f1, per_class, confusion_matrix, ...) on a
        labels.csv's ``split`` (default test) or a folder of labelled images. Scoring a labels.csv's test
        split is recorded in its ledger (``test_reads``: how many reads it holds now)."""
        from .evaluate import evaluate_data

        return evaluate_data(
            self.loaded, data, split=split, data_root=data_root, device=self.device, batch_size=batch_size
        )

    def explain(
        self, images: ImageLike | Sequence[ImageLike], out: str | os.PathLike = "explain", *, method: str | None = None
    ) -> pd.DataFrame:
        """Class activation maps: one overlay PNG per image in ``out`` and the table of ``tune-rice
        explain`` (path, overlay, label, score, top-k, peak). In-memory images are saved to ``out/inputs/``
        first."""
        from .explain import DEFAULT_METHOD, explain_files

        out = Path(out)
        items, names = _inputs(images)
        files = [_as_file(item, out / "inputs" / f"image-{i}.png") for i, item in enumerate(items)]
        table = explain_files(
            self.loaded, files, out, method=method or DEFAULT_METHOD, device=self.device, progress=False
        )
        table.insert(0, "image", names)
        return table


def load(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Model:
    """A model from a ``runs/<name>`` folder, its ``best/`` folder, ``best/model.pt`` or an export."""
    return Model(load_model(path, device=device), device=device)


@dataclass
class SearchResult:
    """A finished search: ``path`` (runs/<name>), ``model`` (the deployed one, loaded), ``test_metrics``
    (its one read of the test split, test_metrics.json) and ``results`` (results.csv: a row per trial, then
    the linear probes)."""

    path: Path
    model: Model
    test_metrics: dict
    results: pd.DataFrame

    @classmethod
    def read(cls, path: str | os.PathLike) -> SearchResult:
        exp = Path(path)
        for name in (MODEL_PATH, TEST_METRICS_FILE, RESULTS_FILE):
            if not (exp / name).is_file():
                raise UserError(f"{exp}: no {name}; not a finished tune-rice search")
        metrics = json.loads((exp / TEST_METRICS_FILE).read_text())
        return cls(exp, Model(load_model(exp)), metrics, pd.read_csv(exp / "results.csv"))

    def __repr__(self) -> str:
        acc = self.test_metrics.get("accuracy", float("nan"))
        trials = int((self.results.get("kind", pd.Series(dtype=str)) == "trial").sum())
        return f"SearchResult({str(self.path)!r}, trials={trials}, test accuracy={acc:.4f})"


def _inputs(images: ImageLike | Sequence[ImageLike]) -> tuple[list, list[str]]:
    """(what predict_files takes: paths and PIL images, each one's name in the table)."""
    from ..data.images import find_images

    given: list = [images] if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)) else list(images)
    items: list = []
    names: list[str] = []
    for i, x in enumerate(given):
        if isinstance(x, (str, os.PathLike)):
            files = find_images([x])
            items += files
            names += [str(f) for f in files]
        elif isinstance(x, (Image.Image, np.ndarray)):
            items.append(_as_image(x))
            names.append(f"image[{i}]")
        else:
            raise UserError(f"image {i}: {type(x).__name__} is not a path, a PIL image or a numpy array")
    if not items:
        raise UserError("no images to predict")
    return items, names


def _as_image(x: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(x, Image.Image):
        return x.convert("RGB")
    a = np.asarray(x)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise UserError(f"an image array must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {a.dtype} {a.shape}")
    return Image.fromarray(a).convert("RGB")


def _as_file(item: Path | Image.Image, path: Path) -> Path:
    if isinstance(item, Image.Image):
        path.parent.mkdir(parents=True, exist_ok=True)
        item.save(path)
        return path
    return item
