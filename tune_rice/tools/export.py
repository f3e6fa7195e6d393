"""``python -m tune_rice export``: a trained model as TorchScript or ONNX, for serving without this package.

    python -m tune_rice export --model runs/<name>/best/model.pt --format torchscript   # -> best/model.ts

The exported model takes a NORMALISED image batch ``(B, 3, S, S)`` float32 (see the preprocessing saved
with it: resize the short side to ``resize``, centre-crop ``image_size``, pixel/255, ``(x - mean) / std``)
and returns the logits ``(B, C)`` in the order of ``classes``, already divided by the model's temperature
(softmax gives the calibrated probabilities). An ensemble exports as one graph: each distinct backbone
once, every head, the weighted mean of their logits and the temperature. Every export is checked before
it is kept: its logits must equal the original model's within ``|a - b| <= ATOL + RTOL * |b|`` (1e-4, 1e-4) on a random
normalised batch whose size differs from the one used to trace it.

``--raw-input`` writes a graph for phones and servers instead: it takes 8-bit RGB pixels ``(B, H, W, 3)``
uint8 at any H and W, does predict's resize, centre crop and normalisation inside (``pixels.py``) and
returns the calibrated probabilities ``(B, C)``; it is checked against predict's probabilities on random
images of two other sizes (within ``RAW_ATOL``) and written as ``model-raw.ts`` / ``model-raw.onnx``.

TorchScript files carry their metadata inside (``_extra_files={"tune_rice.json": ...}``), so
``tune_rice.tools.predict`` accepts them; ONNX files get it in ``FILE.json`` next to them.
(``torch.jit`` is deprecated in favour of ``torch.export`` but still the format most servers load.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import UserError, cli
from ..features.model import TORCHSCRIPT_META, is_torchscript, load_artifact, read_torchscript, resolve_model_path

log = logging.getLogger(__name__)

FORMATS = {"torchscript": ".ts", "onnx": ".onnx"}
RTOL = 1e-4
ATOL = 1e-4
EXPORT_FORMAT = "tune-rice-export"
ONNX_MISSING = "ONNX export needs `pip install tune-rice[onnx]` (onnx, onnxruntime)"


def export_metadata(meta: dict, fmt: str) -> dict:
    """What a server needs besides the weights: classes, preprocessing, provenance, input/output contract."""
    size = int(meta["preprocessing"]["image_size"])
    return {
        "format": EXPORT_FORMAT,
        "version": 1,
        "export_format": fmt,
        "classes": list(meta["classes"]),
        "preprocessing": meta["preprocessing"],
        "input": {"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32", "normalised": True},
        "output": {
            "name": "logits",
            "shape": ["batch", len(meta["classes"])],
            "note": "softmax over the last axis gives class probabilities",
        },
        "weights": meta.get("weights"),
        "pretrained": meta.get("pretrained"),
        "backbone": meta.get("backbone"),
        "head": meta.get("head"),
        # An ensemble is one graph: each backbone once, every head, the weighted mean and the temperature.
        "members": meta.get("members", []),
        "temperature": meta.get("temperature", 1.0),
        "calibration": meta.get("calibration"),
        "config": meta.get("config", {}),
        "metrics": meta.get("metrics", {}),
        "tolerance": {"rtol": RTOL, "atol": ATOL},
    }


def default_out(model_path: Path, fmt: str) -> Path:
    return model_path.with_suffix(FORMATS[fmt])


def check_close(reference: torch.Tensor, got: torch.Tensor, *, what: str) -> float:
    """Max |difference|; raises if any element is outside ``ATOL + RTOL * |reference|``."""
    reference, got = reference.detach().float().cpu(), torch.as_tensor(got).detach().float().cpu()
    if reference.shape != got.shape:
        raise RuntimeError(f"{what}: output shape {tuple(got.shape)} differs from {tuple(reference.shape)}")
    diff = (reference - got).abs()
    if not bool((diff <= ATOL + RTOL * reference.abs()).all()):
        raise RuntimeError(
            f"{what}: logits differ from the original by up to {float(diff.max()):.3g} "
            f"(tolerance {ATOL:g} + {RTOL:g} * |logit|)"
        )
    return float(diff.max())


def _probe(image_size: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, image_size, image_size, generator=g)  # (B, 3, S, S), like normalised pixels


def export_torchscript(model: nn.Module, meta: dict, out: Path) -> float:
    """Trace ``model`` to ``out`` with the metadata inside; returns the checked max logit difference."""
    size = int(meta["preprocessing"]["image_size"])
    model = model.cpu().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        # check_trace would re-run and compare at the traced batch size; the check below is stricter
        # (another batch size, after the save/load round trip) and costs one run instead of three.
        traced = torch.jit.trace(model, _probe(size, 2, seed=0), check_trace=False)
        torch.jit.save(
            traced, str(out), _extra_files={TORCHSCRIPT_META: json.dumps(export_metadata(meta, "torchscript"))}
        )
    loaded, _ = read_torchscript(out)  # the round trip the user will make, extra files included
    x = _probe(size, 3, seed=1)
    with torch.no_grad():
        return check_close(model(x), loaded(x), what=f"{out} (TorchScript)")


def installed(module: str) -> bool:
    """Whether an optional dependency (onnx, onnxruntime) can be imported."""
    return importlib.util.find_spec(module) is not None


def export_onnx(model: nn.Module, meta: dict, out: Path) -> float | None:
    """``model`` to ONNX (dynamic batch axis) plus ``out.json``; returns the checked difference, or None
    when onnxruntime is not installed to check it."""
    if not installed("onnx"):
        raise UserError(ONNX_MISSING)
    size = int(meta["preprocessing"]["image_size"])
    model = model.cpu().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        try:
            # The TorchScript-based exporter: needs only `onnx` (the dynamo one also wants onnxscript).
            torch.onnx.export(
                model,
                (_probe(size, 2, seed=0),),
                str(out),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        except Exception as e:  # the exporter raises many types; the first line says what it could not do
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"ONNX export failed: {reason}") from None
    sidecar = out.with_name(out.name + ".json")
    sidecar.write_text(json.dumps(export_metadata(meta, "onnx"), indent=1))
    if not installed("onnxruntime"):
        log.warning(
            "onnxruntime is not installed: the ONNX file was not checked against the original "
            "(pip install tune-rice[onnx])"
        )
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _probe(size, 3, seed=1)
    (got,) = session.run(["logits"], {"image": x.numpy()})
    with torch.no_grad():
        return check_close(model(x), torch.from_numpy(np.asarray(got)), what=f"{out} (ONNX)")


# ------------------------------------------------------------------------------ raw-pixel input exports
# A raw-input export's probabilities against predict's on the same pixels: the graph's resize rounds each
# pass to 8 bits as PIL does, and float sums put a pixel one level off now and then (measured: at most one
# level, which moved a probability by at most a few 1e-4 on the test models; docs/after-search.md).
RAW_ATOL = 2e-3
RAW_SUFFIX = "-raw"  # model-raw.ts, model-raw.onnx: beside the normalised-input exports, never over them


def default_raw_out(model_path: Path, fmt: str) -> Path:
    return model_path.with_name(model_path.stem + RAW_SUFFIX + FORMATS[fmt])


def raw_export_metadata(meta: dict, fmt: str) -> dict:
    """:func:`export_metadata` for a graph that takes 8-bit RGB pixels and returns probabilities."""
    info = export_metadata(meta, fmt)
    info["input"] = {
        "name": "image",
        "shape": ["batch", "height", "width", 3],
        "dtype": "uint8",
        "raw": True,
        "note": "RGB, upright (EXIF orientation applied), any height and width; resized, centre-cropped "
        "and normalised inside as `preprocessing` says",
    }
    info["output"] = {
        "name": "probabilities",
        "shape": ["batch", len(meta["classes"])],
        "note": "calibrated class probabilities (softmax of the logits divided by the temperature)",
    }
    info["tolerance"] = {"probability_atol": RAW_ATOL, "against": "tune_rice.tools.predict on the same decoded pixels"}
    return info


def raw_input_graph(model: nn.Module, meta: dict) -> torch.jit.ScriptModule:
    """The classifier traced at the crop size inside a scripted :class:`pixels.RawInputModel`, whose
    preprocessing depends on H and W (a trace would fix them)."""
    from ..data.pixels import RawInputModel

    size = int(meta["preprocessing"]["image_size"])
    model = model.cpu().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        traced = torch.jit.trace(model, _probe(size, 2, seed=0), check_trace=False)
        return torch.jit.script(RawInputModel(traced, meta["preprocessing"]).eval())


def raw_probe_images(seed: int = 2) -> list[np.ndarray]:
    """Random 8-bit RGB images (H, W, 3) of odd sizes, one portrait and one landscape: the export check's input."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in ((157, 93), (71, 130))]


def reference_probabilities(model: nn.Module, preprocessing: dict, image: np.ndarray) -> torch.Tensor:
    """``predict``'s probabilities (1, C) for decoded pixels ``image`` (H, W, 3): its sized decode's
    resize, the evaluation transform (PIL), the normalisation and the softmax."""
    from PIL import Image

    from ..data.images import build_transform, to_model_input

    tf = build_transform(preprocessing, train=False, normalize=False)
    x = tf(tf.decode.working(Image.fromarray(image))).unsqueeze(0)  # (1, 3, S, S) uint8
    with torch.no_grad():
        return torch.softmax(model.eval()(to_model_input(x, "cpu", preprocessing)).float(), dim=1)


def check_raw(model: nn.Module, meta: dict, run, *, what: str) -> float:
    """Max |probability difference| of ``run`` (uint8 (1, H, W, 3) array -> (1, C) probabilities) from
    :func:`reference_probabilities` over :func:`raw_probe_images`; raises past :data:`RAW_ATOL`."""
    worst = 0.0
    for image in raw_probe_images():
        want = reference_probabilities(model, meta["preprocessing"], image)
        got = torch.as_tensor(np.asarray(run(image[None]))).float()
        if got.shape != want.shape:
            raise RuntimeError(f"{what}: output shape {tuple(got.shape)} differs from {tuple(want.shape)}")
        worst = max(worst, float((got - want).abs().max()))
    if worst > RAW_ATOL:
        raise RuntimeError(f"{what}: probabilities differ from predict's by up to {worst:.3g} (tolerance {RAW_ATOL:g})")
    return worst


def export_raw_torchscript(model: nn.Module, meta: dict, out: Path) -> float:
    """The raw-pixel graph as TorchScript with its metadata inside; returns the checked max difference."""
    graph = raw_input_graph(model, meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(
            graph, str(out), _extra_files={TORCHSCRIPT_META: json.dumps(raw_export_metadata(meta, "torchscript"))}
        )
    loaded, _ = read_torchscript(out)
    with torch.no_grad():
        return check_raw(model, meta, lambda x: loaded(torch.from_numpy(x)), what=f"{out} (TorchScript)")


def export_raw_onnx(model: nn.Module, meta: dict, out: Path) -> float | None:
    """The raw-pixel graph as ONNX (batch, height and width axes free) plus ``out.json``; returns the
    checked max difference, or None when onnxruntime is not installed to check it."""
    if not installed("onnx"):
        raise UserError(ONNX_MISSING)
    graph = raw_input_graph(model, meta)
    example = torch.from_numpy(raw_probe_images(seed=0)[0][None])  # (1, H, W, 3) uint8
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        try:
            torch.onnx.export(
                graph,
                (example,),
                str(out),
                input_names=["image"],
                output_names=["probabilities"],
                dynamic_axes={"image": {0: "batch", 1: "height", 2: "width"}, "probabilities": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        except Exception as e:  # the exporter raises many types; the first line says what it could not do
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"ONNX export failed: {reason}") from None
    out.with_name(out.name + ".json").write_text(json.dumps(raw_export_metadata(meta, "onnx"), indent=1))
    if not installed("onnxruntime"):
        log.warning("onnxruntime is not installed: the ONNX file was not checked (pip install tune-rice[onnx])")
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return check_raw(model, meta, lambda x: session.run(["probabilities"], {"image": x})[0], what=f"{out} (ONNX)")


def export_model(
    model_path: str | os.PathLike,
    fmt: str,
    *,
    out: str | os.PathLike | None = None,
    force: bool = False,
    raw_input: bool = False,
) -> tuple[Path, float | None]:
    """Export a tune-rice artifact; returns (written file, checked max logit difference or None).
    ``raw_input``: the graph takes uint8 pixels and returns probabilities (the difference is then of
    probabilities, from predict's)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "onnx" and not installed("onnx"):
        raise UserError(ONNX_MISSING)
    model_path = resolve_model_path(model_path)
    if is_torchscript(model_path):
        raise UserError(f"{model_path}: already a TorchScript export; export the model.pt it came from")
    model, meta = load_artifact(model_path)
    out = Path(out) if out else (default_raw_out if raw_input else default_out)(model_path, fmt)
    if out.resolve() == model_path.resolve():
        raise UserError(f"--out {out}: that is the model file itself")
    written = [out] + ([out.with_name(out.name + ".json")] if fmt == "onnx" else [])
    cli.refuse_overwrite(written, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    diff: float | None
    try:
        if fmt == "torchscript":
            diff = (export_raw_torchscript if raw_input else export_torchscript)(model, meta, tmp)
        else:
            diff = (export_raw_onnx if raw_input else export_onnx)(model, meta, tmp)
            os.replace(tmp.with_name(tmp.name + ".json"), written[1])
        os.replace(tmp, out)
    except RuntimeError as e:  # check_close: an export that does not reproduce the model is not kept
        raise UserError(f"export not written: {e}") from None
    finally:
        for p in (tmp, tmp.with_name(tmp.name + ".json")):
            p.unlink(missing_ok=True)
    return out, diff


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=os.environ.get("TUNE_RICE_PROG", "python -m tune_rice export"),
        description="Export a trained tune-rice model (best/model.pt) to TorchScript or ONNX. The export takes "
        "a normalised image batch (B, 3, S, S) float32 and returns logits (B, C); with --raw-input, RGB pixels "
        "(B, H, W, 3) uint8 at any size, and returns calibrated probabilities (B, C).",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("--model", required=True, help="runs/<name>/best/model.pt (or the experiment folder)")
    p.add_argument("--format", choices=tuple(FORMATS), default="torchscript", help="what to write")
    p.add_argument(
        "--raw-input",
        action="store_true",
        help="a graph that takes 8-bit RGB pixels (B, H, W, 3) uint8 at any size, resizes, crops and normalises "
        "them inside as predict does, and returns calibrated probabilities (B, C)",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="the file to write (default: next to the model, model.ts / model.onnx; with --raw-input model-raw.*)",
    )
    cli.add_force_arg(p, "--out")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    out, diff = export_model(args.model, args.format, out=args.out, force=args.force, raw_input=args.raw_input)
    if diff is None:
        check = "not checked (onnxruntime missing)"
    elif args.raw_input:
        check = f"probabilities match predict's within {RAW_ATOL:g} (max difference {diff:.2g})"
    else:
        check = f"logits match the original within {ATOL:g} + {RTOL:g}*|logit| (max difference {diff:.2g})"
    extra = f"; metadata in {out.name}.json" if args.format == "onnx" else f"; metadata inside ({TORCHSCRIPT_META})"
    print(f"wrote {out} ({args.format}): {check}{extra}")
    if args.raw_input:
        print("input: 'image' RGB pixels (B, H, W, 3) uint8, any H and W; output: 'probabilities' (B, C), calibrated")
    elif args.format == "torchscript":
        print(
            "input: normalised image batch (B, 3, S, S) float32; output: logits (B, C). "
            f"Classify with: python -m tune_rice predict --model {out} IMAGES..."
        )
    else:
        print("input: normalised image batch (B, 3, S, S) float32, name 'image'; output: 'logits' (B, C)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
