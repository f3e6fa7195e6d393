"""Torch helpers that both backbone providers (``backbones``, ``timm_zoo``) and the model artifact
(``model``) use: weights-only loading with one-line errors, and networks built without memory. A module of
its own so that the providers and the artifact need not import each other."""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from . import UserError


def safe_torch_load(path: str | os.PathLike, *, what: str = "file"):
    """``torch.load(weights_only=True)`` with errors turned into one clear line; never unsafe loading."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's first line is generic advice to retry unsafely; the line naming the refused global is the news.
        text = str(e).split("WeightsUnpickler error:", 1)[-1]
        lines = [
            ln.strip()
            for ln in text.splitlines()
            if ln.strip() and not ln.strip().startswith(("Weights only load failed", "Check the documentation"))
        ]
        first = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else type(e).__name__)
        raise UserError(
            f"{path}: refused to load: it is not a weights-only file and unpickling it could run code ({first[:160]})"
        ) from None
    except Exception as e:  # garbage bytes surface as KeyError, EOFError, RuntimeError, ... from the unpickler
        reason = (str(e).splitlines() or [""])[0][:160] or type(e).__name__
        raise UserError(f"{path}: cannot read as a torch {what} ({reason})") from None


_LOCK = threading.Lock()


@contextmanager
def weightless() -> Iterator[None]:
    """Build networks with every parameter and buffer on the meta device: shapes without memory or
    initialisation (the builders' init functions do nothing on meta tensors), for sizes, for checking
    which input sizes a network takes, and for a network whose weights are loaded next. The patch is
    module-global while active, so it acts on this thread only (a network another thread builds
    meanwhile is real) and one thread at a time holds it. ``torch.device("meta")`` would be the plain
    way, but RegNet's builder computes its widths with tensors, which cannot leave the meta device."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer
    owner = threading.get_ident()

    def parameter(self, name, param):
        if param is not None and param.device.type != "meta" and threading.get_ident() == owner:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer(self, name, tensor, persistent=True):
        if tensor is not None and threading.get_ident() == owner:
            tensor = tensor.to("meta")
        register_buffer(self, name, tensor, persistent)

    with _LOCK:
        nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer  # type: ignore[method-assign]
        try:
            yield
        finally:
            nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer  # type: ignore[method-assign]
