"""``python -m tune_rice.export``: a trained model as TorchScript or ONNX, for serving without this package.

    python -m tune_rice.export --model runs/<name>/best/model.pt --format torchscript   # -> best/model.ts

The exported model takes a NORMALISED image batch ``(B, 3, S, S)`` float32 (see the preprocessing saved
with it: resize the short side to ``resize``, centre-crop ``image_size``, pixel/255, ``(x - mean) / std``)
and returns the logits ``(B, C)`` in the order of ``classes``, already divided by the model's temperature
(softmax gives the calibrated probabilities). An ensemble exports as one graph: each distinct backbone
once, every head, the weighted mean of their logits and the temperature. Every export is checked before
it is kept: its logits must equal the original model's within ``|a - b| <= ATOL + RTOL * |b|`` (1e-4, 1e-4) on a random
normalised batch whose size differs from the one used to trace it.

TorchScript files carry their metadata inside (``_extra_files={"tune_rice.json": ...}``), so
``tune_rice.predict`` accepts them; ONNX files get it in ``FILE.json`` next to them.
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

from . import UserError, cli
from .model import TORCHSCRIPT_META, is_torchscript, load_artifact, read_torchscript, resolve_model_path

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


def export_model(
    model_path: str | os.PathLike, fmt: str, *, out: str | os.PathLike | None = None, force: bool = False
) -> tuple[Path, float | None]:
    """Export a tune-rice artifact; returns (written file, checked max logit difference or None)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "onnx" and not installed("onnx"):
        raise UserError(ONNX_MISSING)
    model_path = resolve_model_path(model_path)
    if is_torchscript(model_path):
        raise UserError(f"{model_path}: already a TorchScript export; export the model.pt it came from")
    model, meta = load_artifact(model_path)
    out = Path(out) if out else default_out(model_path, fmt)
    if out.resolve() == model_path.resolve():
        raise UserError(f"--out {out}: that is the model file itself")
    written = [out] + ([out.with_name(out.name + ".json")] if fmt == "onnx" else [])
    cli.refuse_overwrite(written, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    diff: float | None
    try:
        if fmt == "torchscript":
            diff = export_torchscript(model, meta, tmp)
        else:
            diff = export_onnx(model, meta, tmp)
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
        prog=os.environ.get("TUNE_RICE_PROG", "python -m tune_rice.export"),
        description="Export a trained tune-rice model (best/model.pt) to TorchScript or ONNX. The export takes "
        "a normalised image batch (B, 3, S, S) float32 and returns logits (B, C).",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("--model", required=True, help="runs/<name>/best/model.pt (or the experiment folder)")
    p.add_argument("--format", choices=tuple(FORMATS), default="torchscript", help="what to write")
    p.add_argument(
        "--out", metavar="FILE", help="the file to write (default: next to the model, model.ts / model.onnx)"
    )
    cli.add_force_arg(p, "--out")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    out, diff = export_model(args.model, args.format, out=args.out, force=args.force)
    check = (
        f"logits match the original within {ATOL:g} + {RTOL:g}*|logit| (max difference {diff:.2g})"
        if diff is not None
        else "not checked (onnxruntime missing)"
    )
    extra = f"; metadata in {out.name}.json" if args.format == "onnx" else f"; metadata inside ({TORCHSCRIPT_META})"
    print(f"wrote {out} ({args.format}): {check}{extra}")
    print(
        "input: normalised image batch (B, 3, S, S) float32; output: logits (B, C). "
        f"Classify with: python -m tune_rice.predict --model {out} IMAGES..."
        if args.format == "torchscript"
        else "input: normalised image batch (B, 3, S, S) float32, name 'image'; output: 'logits' (B, C)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
