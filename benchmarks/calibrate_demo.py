"""How hard is the demo dataset? Two reference classifiers on a held-out split.

1. Logistic regression on the global-pooled 512-d features of a *randomly initialised* resnet18
   (``torch.manual_seed(0)``, ``weights=None``, eval mode, ImageNet normalisation). Random features
   carry colour and coarse texture statistics only, so this is a floor a trained model must beat.
2. Nearest centroid on 8x8x8 RGB colour histograms (square-rooted), the baseline from the tests.

Each split is stratified 70/30 (split seeds 0..K-1, the mean and spread are reported); a near-duplicate
always goes to its source's side, so copies cannot leak across. Usage::

    python benchmarks/calibrate_demo.py [--per-class 200] [--size 256] [--seed 0] [--input 128 224]

Measured on the default set (per_class=200, size=256, seed=0: 840 images, 5 splits of 588/252; CPU):
majority class 0.357; colour histogram 0.709 +- 0.015; random resnet18 + logistic regression (l2=1e-3)
0.638 +- 0.033 at 128 px and 0.674 +- 0.016 at 224 px.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from tune_rice.data.demo import CLASSES, MARKER, generate_demo

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_set(root: Path):
    """(paths, labels, groups): the group of a near-duplicate is its source file."""
    marker = json.loads((root / MARKER).read_text())
    source = {d["path"]: d["source"] for d in marker["near_duplicates"]}
    paths, labels, groups = [], [], []
    for ci, label in enumerate(CLASSES):
        for p in sorted((root / label).glob("*.jpg")):
            rel = f"{label}/{p.name}"
            paths.append(p)
            labels.append(ci)
            groups.append(source.get(rel, rel))
    return paths, np.array(labels), groups


def split(labels: np.ndarray, groups: list[str], *, test_fraction=0.3, seed=0) -> np.ndarray:
    """Boolean test mask: stratified by class, whole groups on one side."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        gs = sorted({g for g, y in zip(groups, labels) if y == c})
        chosen = set(rng.permutation(gs)[: int(round(test_fraction * len(gs)))])
        test |= np.array([g in chosen and y == c for g, y in zip(groups, labels)])
    return test


@torch.no_grad()
def random_resnet18_features(paths, input_size: int, batch: int = 64) -> np.ndarray:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    model.eval()
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(paths), batch):
        arrs = [
            np.asarray(Image.open(p).convert("RGB").resize((input_size, input_size), Image.BILINEAR))
            for p in paths[i : i + batch]
        ]
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, S, S)
        out.append(model((x - mean) / std).numpy())
    return np.concatenate(out)  # (N, 512)


def logistic_regression(x_train, y_train, x_test, *, l2=1e-3, steps=200) -> np.ndarray:
    """Multinomial logistic regression on standardised features (LBFGS); returns test predictions."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xt = torch.tensor((x_train - mu) / sd, dtype=torch.float64)
    xv = torch.tensor((x_test - mu) / sd, dtype=torch.float64)
    y = torch.tensor(y_train)
    w = torch.zeros(xt.shape[1], len(CLASSES), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(CLASSES), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (xv @ w + b).argmax(1).numpy()


def colour_histograms(paths, bins=8) -> np.ndarray:
    out = []
    for p in paths:
        a = np.asarray(Image.open(p).convert("RGB")).reshape(-1, 3) // (256 // bins)
        h = np.bincount((a[:, 0] * bins + a[:, 1]) * bins + a[:, 2], minlength=bins**3)
        out.append(np.sqrt(h / h.sum()))
    return np.array(out)


def nearest_centroid(x_train, y_train, x_test) -> np.ndarray:
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(len(CLASSES))])
    return ((x_test[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--input", type=int, nargs="+", default=[224], help="resnet input size(s)")
    ap.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the weights (standardised features)")
    ap.add_argument("--splits", type=int, default=5, help="number of random 70/30 splits to average")
    ap.add_argument("--data", type=Path, help="an existing demo folder (default: generate into a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp) / "demo"
        t0 = time.perf_counter()
        generate_demo(root, per_class=args.per_class, size=args.size, seed=args.seed)
        print(
            f"dataset: per_class={args.per_class} size={args.size} seed={args.seed} ({time.perf_counter() - t0:.1f} s)"
        )
        paths, labels, groups = load_set(root)
        tests = [split(labels, groups, seed=k) for k in range(args.splits)]
        majority = np.mean([np.bincount(labels[t]).max() / t.sum() for t in tests])
        print(
            f"{len(paths)} images, train {int((~tests[0]).sum())}, test {int(tests[0].sum())}, "
            f"{args.splits} splits; majority-class test accuracy {majority:.3f}"
        )
        h = colour_histograms(paths)
        accs = [(nearest_centroid(h[~t], labels[~t], h[t]) == labels[t]).mean() for t in tests]
        print(
            f"colour histogram 8x8x8 (sqrt) + nearest centroid: test accuracy {np.mean(accs):.3f} +- {np.std(accs):.3f}"
        )
        for size in args.input:
            t0 = time.perf_counter()
            f = random_resnet18_features(paths, size)
            accs, recalls = [], []
            for t in tests:
                pred = logistic_regression(f[~t], labels[~t], f[t], l2=args.l2)
                accs.append((pred == labels[t]).mean())
                recalls.append([(pred[labels[t] == i] == i).mean() for i in range(len(CLASSES))])
            per_class = " ".join(f"{c}={r:.2f}" for c, r in zip(CLASSES, np.mean(recalls, 0)))
            print(
                f"random-init resnet18 @{size}px + logistic regression (l2={args.l2}): test accuracy "
                f"{np.mean(accs):.3f} +- {np.std(accs):.3f}  [recall {per_class}]  "
                f"({time.perf_counter() - t0:.1f} s)"
            )


if __name__ == "__main__":
    main()
