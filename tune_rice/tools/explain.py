"""``python -m tune_rice explain``: where in a photo the model found its evidence.

    python -m tune_rice explain --model runs/<name>/best/model.pt photos/ more/leaf.jpg --out-dir explained/

For each photo: ``OUT/<name>.png`` (the photo as the model saw it, the class activation map over it, the
predicted class with its probability, the top 3) and a row in ``OUT/explain.csv``. A file that will not
decode is listed and skipped, as in ``predict``.

The maps come from pytorch-grad-cam (``grad-cam`` on PyPI) on the backbone's **last spatial layer**,
found by one rule for every torchvision family (:func:`find_spatial_layer`): the last module, in the
order the forward pass finishes them, whose output is a spatial map (``(B, C, H, W)`` with H, W > 1, or
a token sequence ``(B, T, D)`` that is a square grid plus a few class tokens, as in ViT) *and* whose
positions still reach the logits. The last condition is what skips a ViT's final blocks: after them only
the class token is read, so the patch tokens get no gradient; the map is taken where they still do.

Gradients flow only to that layer's activations: every parameter is frozen and the activation is made
a leaf of the graph, so nothing before it (the input, the early layers) is differentiated and no weight
ever gets a ``.grad``; the backbone stays bit-equal. The probabilities are the softmax of the model's
output, which is divided by the temperature fitted on valid when the model holds one (calibrated). An
ensemble's map is its members' maps (one per head, on that head's backbone) averaged with its weights.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .. import UserError, cli
from ..devices import add_device_args

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

METHODS = ("gradcam", "hirescam", "gradcam++", "layercam")
DEFAULT_METHOD = "gradcam"
DEFAULT_TOPK = 3
MAX_EXTRA_TOKENS = 8  # class and register tokens in front of a ViT's patch grid
REACH_SHARE = 0.5  # a layer qualifies when at least this share of its positions reaches the logits


# ------------------------------------------------------------------------------------ the layer rule
@dataclass
class SpatialLayer:
    """The layer the maps are taken from: its name in the network, the module, and for token layers the
    reshape of ``(B, T, D)`` into ``(B, D, h, w)``; ``grid`` is its (h, w) at the probed image size."""

    name: str
    module: nn.Module
    grid: tuple[int, int]
    reshape: Callable | None = None


class TokenGrid:
    """``(B, extra + h*w, D)`` tokens -> ``(B, D, h, w)``: drops the leading class tokens (a picklable callable)."""

    def __init__(self, extra: int, h: int, w: int):
        self.extra, self.h, self.w = extra, h, w

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        grid = tokens[:, self.extra :, :]  # (B, h*w, D)
        return grid.reshape(grid.shape[0], self.h, self.w, grid.shape[2]).permute(0, 3, 1, 2)


def _spatial_view(out) -> tuple[torch.Tensor, TokenGrid | None] | None:
    """``(positions (B, P, ...), reshape)`` when ``out`` is a spatial map, else None."""
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        return None
    if out.dim() == 4 and out.shape[-2] > 1 and out.shape[-1] > 1:
        return out.flatten(2).transpose(1, 2), None  # (B, H*W, C)
    if out.dim() == 3:
        side = math.isqrt(int(out.shape[1]))
        extra = int(out.shape[1]) - side * side
        if side > 1 and 0 <= extra <= MAX_EXTRA_TOKENS:
            return out[:, extra:, :], TokenGrid(extra, side, side)
    return None


def find_spatial_layer(net: nn.Module, *, image_size: int, earlier: int = 0) -> SpatialLayer:
    """The last module of ``net`` with a spatial output whose positions reach the output (see module doc).

    ``earlier=k`` steps back ``k`` resolution stages: the last qualifying module whose grid is the
    ``k``-th finer one (``layer3`` instead of ``layer4`` for a ResNet with ``k=1``). Probes ``net`` with
    one random image of ``image_size`` pixels; parameters get no ``.grad`` (the gradient is taken with
    ``torch.autograd.grad`` with respect to the recorded outputs only).
    """
    seen: list[tuple[str, nn.Module, torch.Tensor, TokenGrid | None]] = []
    hooks = []

    def record(name):
        def hook(module, inputs, out):
            view = _spatial_view(out)
            if view is not None and out.requires_grad:
                seen.append((name, module, out, view[1]))

        return hook

    for name, module in net.named_modules():
        if name:
            hooks.append(module.register_forward_hook(record(name)))
    p = next(net.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, image_size, image_size, generator=g).to(p.device, p.dtype).requires_grad_(True)
    try:
        with torch.enable_grad():
            y = net(x)
            y = y[0] if isinstance(y, (tuple, list)) else y
            proj = torch.randn(y.shape, generator=g).to(y.device, y.dtype)  # no accidental cancellation
            score = (y * proj).sum()
            by_name = {}
            for name, module, out, reshape in seen:  # a module called twice: its last call counts
                by_name[name] = (module, out, reshape)
            order = sorted(by_name, key=lambda n: max(i for i, s in enumerate(seen) if s[0] == n))
            outs = [by_name[n][1] for n in order]
            grads = torch.autograd.grad(score, outs, allow_unused=True, retain_graph=False)
    finally:
        for h in hooks:
            h.remove()
    qualified: list[tuple[str, tuple[int, int]]] = []  # (name, grid), last first
    for name, grad in zip(reversed(order), reversed(grads)):
        module, out, reshape = by_name[name]
        if grad is None:
            continue
        if reshape is None:
            view = _spatial_view(grad)
            assert view is not None  # the layer's output was a spatial map: so is its gradient
            positions = view[0]  # (1, P, D)
        else:
            positions = grad[:, reshape.extra :, :]
        reach = (positions.abs().amax(dim=-1) > 0).float().mean().item()
        if reach >= REACH_SHARE:
            grid = (out.shape[-2], out.shape[-1]) if reshape is None else (reshape.h, reshape.w)
            qualified.append((name, (int(grid[0]), int(grid[1]))))
    if not qualified:
        raise UserError(
            f"{type(net).__name__}: no layer with a spatial output reaches the output at "
            f"{image_size} px, so there is no map to draw (is the image size too small for it?)"
        )
    grids = list(dict.fromkeys(grid for _, grid in qualified))  # coarsest (last) first
    if not 0 <= earlier < len(grids):
        raise UserError(
            f"--earlier {earlier}: {type(net).__name__} at {image_size} px has {len(grids)} "
            f"resolution stage(s) with a map ({', '.join(f'{h}x{w}' for h, w in grids)}); "
            f"valid: 0 to {len(grids) - 1}"
        )
    name, chosen = next((n, gr) for n, gr in qualified if gr == grids[earlier])
    module, _, reshape = by_name[name]
    log.debug("spatial layer: %s, %s grid", name, chosen)
    return SpatialLayer(name, module, chosen, reshape)


# ----------------------------------------------------------------------------------------- explaining
def _cam_class(method: str):
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM

    classes = {"gradcam": GradCAM, "hirescam": HiResCAM, "gradcam++": GradCAMPlusPlus, "layercam": LayerCAM}
    if method not in classes:
        raise UserError(f"unknown --method {method!r}; valid: {', '.join(METHODS)}")
    return classes[method]


def _as_leaf(module, inputs, out):
    """Forward hook: the layer's output becomes a leaf that wants a gradient, so backward stops there."""
    return out.detach().requires_grad_(True)


def members(model: nn.Module) -> list[tuple[nn.Module, float]]:
    """``(classifier, weight)`` pairs whose maps make ``model``'s map: the model itself with weight 1, or for
    an :class:`~tune_rice.features.model.Ensemble` one backbone + head classifier per head with the ensemble's weight."""
    from ..features.model import Classifier, Ensemble

    if isinstance(model, Ensemble):
        backbones = model.backbone_list()
        return [
            (Classifier(backbones[j], head), float(w))
            for head, j, w in zip(model.head_list(), model.backbone_index, model.weights)
        ]
    return [(model, 1.0)]


class Explainer:
    """Class activation maps and probabilities for a tune-rice model (a classifier or an ensemble).

    ``explainer(x)`` with normalised images ``x`` (B, 3, S, S) returns ``(probs (B, C), maps (B, S, S))``:
    the softmax of the model's output (calibrated when the model holds a fitted temperature) and, for the
    class in ``targets`` (default: the predicted class), the map scaled to [0, 1] per image. An ensemble's
    map is its members' maps averaged with the ensemble's weights. Every parameter of ``model`` is set to
    ``requires_grad=False`` (they are frozen in use anyway). ``earlier``: see :func:`find_spatial_layer`.
    """

    def __init__(self, model: nn.Module, *, image_size: int, method: str = DEFAULT_METHOD, earlier: int = 0):
        cam_class = _cam_class(method)
        if isinstance(model, torch.jit.ScriptModule):
            raise UserError(
                "a TorchScript export has no layers to hook: explain needs the tune-rice model file "
                "(runs/<name>/best/model.pt)"
            )
        self.model = model.eval()
        self.method = method
        for p in model.parameters():
            p.requires_grad_(False)
        parts = []
        for member, weight in members(model):
            backbone = getattr(member, "backbone", None)
            if backbone is None or not hasattr(backbone, "net"):
                raise UserError(f"{type(member).__name__}: not a frozen-backbone classifier; cannot explain it")
            parts.append((member, weight, find_spatial_layer(backbone.net, image_size=image_size, earlier=earlier)))
        # One leaf hook per layer (members may share a backbone), registered before any of the library's
        # hooks so that every one of them sees the leaf the rest of the forward pass uses.
        self._handles: dict[int, RemovableHandle] = {}
        for _, _, layer in parts:
            if id(layer.module) not in self._handles:
                self._handles[id(layer.module)] = layer.module.register_forward_hook(_as_leaf)
        self.parts = [
            (
                member,
                weight,
                layer,
                cam_class(model=member, target_layers=[layer.module], reshape_transform=layer.reshape),
            )
            for member, weight, layer in parts
        ]
        self.layers = [layer for _, _, layer in parts]

    def __call__(self, x: torch.Tensor, targets: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        with torch.no_grad():
            probs = torch.softmax(self.model(x).float(), dim=1).cpu().numpy()  # (B, C)
        chosen = probs.argmax(1) if targets is None else np.asarray(targets, dtype=np.int64)
        wanted = [ClassifierOutputTarget(int(c)) for c in chosen]
        total = sum(weight for _, weight, _, _ in self.parts)
        maps = np.zeros((x.shape[0], x.shape[-2], x.shape[-1]), dtype=np.float32)
        for _, weight, _, cam in self.parts:
            with torch.enable_grad():
                maps += weight * cam(input_tensor=x, targets=wanted).astype(np.float32)  # (B, S, S) in [0, 1]
            cam.activations_and_grads.clear()  # members sharing a layer also recorded each other's passes
        return probs, maps / total

    def close(self) -> None:
        for _, _, _, cam in self.parts:
            cam.activations_and_grads.release()
        for handle in self._handles.values():
            handle.remove()
        self.parts, self._handles = [], {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def denormalise(x: torch.Tensor, preprocessing: dict) -> np.ndarray:
    """Normalised images (B, 3, S, S) -> uint8 RGB (B, S, S, 3): the photos as the model saw them."""
    mean = torch.tensor(preprocessing["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"], dtype=torch.float32).view(1, 3, 1, 1)
    rgb = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    return (rgb.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def overlay(rgb: np.ndarray, heat: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """The map (S, S) in [0, 1] over the photo (S, S, 3) uint8, coloured with matplotlib's ``jet``."""
    from matplotlib import colormaps

    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]  # (S, S, 3) in [0, 1]
    mixed = (1 - alpha) * rgb.astype(np.float32) / 255 + alpha * colour
    return (np.clip(mixed, 0, 1) * 255 + 0.5).astype(np.uint8)


def mass_in_box(heat: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Share of the map's total mass inside ``box`` = (x0, y0, x1, y1), pixel bounds, x1/y1 exclusive."""
    x0, y0, x1, y1 = box
    total = float(heat.sum())
    return float(heat[y0:y1, x0:x1].sum()) / total if total > 0 else float("nan")


# ------------------------------------------------------------------------------------------- figures
def overlay_figure(rgb: np.ndarray, heat: np.ndarray, *, title: str, lines: Sequence[str], method: str = ""):
    """Photo | photo with its map; the prediction on top, the ranked classes underneath."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    axes[0].imshow(rgb)
    axes[0].set_title("photo, as the model sees it", fontsize=9)
    axes[1].imshow(overlay(rgb, heat))
    axes[1].set_title(f"activation map{f' ({method})' if method else ''}", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=12, fontweight="bold")
    fig.supxlabel("\n".join(lines), fontsize=9, family="monospace")
    return fig


def _output_names(files: Sequence[Path]) -> list[str]:
    """One PNG name per input file: its stem, with ``-2``, ``-3`` ... where stems repeat."""
    used: dict[str, int] = {}
    names = []
    for f in files:
        stem = f.stem or "image"
        used[stem] = used.get(stem, 0) + 1
        names.append(f"{stem}.png" if used[stem] == 1 else f"{stem}-{used[stem]}.png")
    return names


def explain_files(
    loaded,
    files: Sequence[Path],
    out_dir: Path,
    *,
    method: str = DEFAULT_METHOD,
    earlier: int = 0,
    topk: int | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Write one overlay PNG per readable file into ``out_dir``; returns the explain.csv table."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from .predict import PredictImages, collate_skipping_failures, eval_transform

    n_classes = len(loaded.classes)
    topk = min(DEFAULT_TOPK, n_classes) if topk is None else int(topk)
    if not 1 <= topk <= n_classes:
        raise UserError(f"--topk {topk}: must be between 1 and the model's {n_classes} classes")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    device = torch.device(device)
    if loaded.kind != "artifact":
        # The export keeps its layers, but torch refuses forward hooks on ScriptModules, which is how
        # Grad-CAM reads activations and their gradients.
        raise UserError(
            f"{loaded.path}: a TorchScript export has no layers to hook (TorchScript takes no module hooks): "
            "explain needs the tune-rice model file (runs/<name>/best/model.pt)"
        )
    model = loaded.module.to(device).eval()
    loader = DataLoader(
        PredictImages(files, eval_transform(loaded.preprocessing)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=0,
        collate_fn=collate_skipping_failures,
    )
    names = _output_names(files)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = [{} for _ in files]
    bar = tqdm(total=len(files), desc="explain", unit="img", disable=not progress, leave=False, dynamic_ncols=True)
    with Explainer(model, image_size=loaded.image_size, method=method, earlier=earlier) as explainer:
        for x, idx, failures in loader:
            for i, err in failures:
                rows[i] = {"path": str(files[i]), "overlay": "", "error": err}
            if x is not None:
                x = x.to(device)
                probs, maps = explainer(x)  # (B, C), (B, S, S)
                rgb = denormalise(x, loaded.preprocessing)
                for j, i in enumerate(idx):
                    rows[i] = _explain_row(
                        files[i], out_dir / names[i], rgb[j], maps[j], probs[j], loaded.classes, topk, method
                    )
            bar.update(len(idx) + len(failures))
        layer = explainer.layers[0]
    bar.close()
    table = pd.DataFrame(rows)
    cols = (
        ["path", "overlay", "label", "score"]
        + [f"top{k + 1}_{s}" for k in range(topk) for s in ("label", "score")]
        + ["peak_x", "peak_y", "error"]
    )
    table = table.reindex(columns=cols)
    table["error"] = table["error"].fillna("")
    table.attrs["layer"] = f"{layer.name} ({layer.grid[0]}x{layer.grid[1]})"
    return table


def _explain_row(path: Path, png: Path, rgb, heat, probs, classes, topk: int, method: str) -> dict:
    order = np.argsort(-probs)[:topk]
    width = max(len(classes[c]) for c in order)
    lines = [f"{k + 1}. {classes[c]:<{width}}  {probs[c]:.3f}" for k, c in enumerate(order)]
    fig = overlay_figure(
        rgb, heat, title=f"predicted: {classes[order[0]]}  (p = {probs[order[0]]:.2f})", lines=lines, method=method
    )
    fig.savefig(png)
    peak_y, peak_x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    row = {
        "path": str(path),
        "overlay": png.name,
        "label": classes[order[0]],
        "score": float(probs[order[0]]),
        "peak_x": round((peak_x + 0.5) / heat.shape[1], 4),
        "peak_y": round((peak_y + 0.5) / heat.shape[0], 4),
        "error": "",
    }
    for k, c in enumerate(order):
        row[f"top{k + 1}_label"] = classes[c]
        row[f"top{k + 1}_score"] = float(probs[c])
    return row


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=os.environ.get("TUNE_RICE_PROG", "python -m tune_rice explain"),
        description="Class activation maps: per photo an overlay PNG (where the model found its evidence, the "
        "predicted class, its probability, the top 3) and a row in explain.csv.",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PHOTO", help="image files or folders (searched recursively)")
    p.add_argument("--model", required=True, help="runs/<name>/best/model.pt or an experiment folder")
    p.add_argument("--out-dir", metavar="DIR", default="explain", help="the folder for the PNGs and explain.csv")
    cli.add_old_spelling(p, "--out", "--out-dir")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD, help="pytorch-grad-cam method")
    p.add_argument(
        "--earlier",
        type=int,
        default=0,
        metavar="K",
        help="take the map K resolution stages before the last spatial layer (finer; with a "
        "randomly initialised backbone the last layer's map hardly localises, see BENCHMARKS.md)",
    )
    p.add_argument(
        "--topk",
        type=int,
        help=f"ranked classes shown per photo (default: {DEFAULT_TOPK}, or the class count if smaller)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per batch")
    add_device_args(p, loader=False)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _main(argv: Sequence[str] | None) -> int:
    from ..data.images import IMAGE_EXTENSIONS, find_images
    from ..devices import device_from_arg
    from ..features.model import load_model

    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    device = device_from_arg(args.device)
    files = find_images(args.paths)
    if not files:
        raise UserError(f"no images found in {', '.join(args.paths)} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    loaded = load_model(args.model, device=device)
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out-dir {out}: exists and is not a folder")
    table = explain_files(
        loaded,
        files,
        out,
        method=args.method,
        earlier=args.earlier,
        topk=args.topk,
        batch_size=args.batch_size,
        device=device,
    )
    table.to_csv(out / "explain.csv", index=False, float_format="%.6f")
    skipped = table[table["error"] != ""]
    if len(skipped):
        print(f"skipped {len(skipped)} unreadable file(s) (rows with the error column filled):", file=sys.stderr)
        for err in skipped["error"].head(2):
            print(f"  {err}", file=sys.stderr)
        if len(skipped) > 2:
            print(f"  ... and {len(skipped) - 2} more in {out / 'explain.csv'}", file=sys.stderr)
    done = table[table["error"] == ""]
    print(f"{len(done)} of {len(table)} images explained ({args.method} on {table.attrs['layer']}) -> {out}/")
    for _, row in done.head(2).iterrows():
        print(f"  {row['overlay']}: {row['label']} {row['score']:.3f}")
    print(f"  table: {out / 'explain.csv'}")
    return 0 if len(done) else 1


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
