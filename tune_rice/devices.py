"""Which device a tool computes on and how many processes decode its images: one answer for every tool."""

from __future__ import annotations

import argparse
import os

import torch

from . import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or ``taskset``'s limit, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> the GPU when PyTorch sees one, else the CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_from_arg(name: str) -> torch.device:
    """A ``--device`` value (one of DEVICE_CHOICES) -> the device; ``cuda`` without a GPU is a UserError."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available to PyTorch here (use --device auto or cpu)")
    return resolve_device(name)


def default_num_workers(most: int = 8, *, batches: int | None = None) -> int:
    """Image-decoding worker processes: one CPU is left to the process that feeds the model, at most
    ``most``, and no more than there are ``batches`` to decode (0: decode in the calling process)."""
    n = max(1, min(most, usable_cpus() - 1))
    return n if batches is None else max(0, min(n, batches))


def add_device_args(p: argparse.ArgumentParser, *, loader: bool = True) -> None:
    """The ``--device`` option of a tool that runs a model; with ``loader``, also its batch size and
    image-decoding workers (the defaults above)."""
    if loader:
        p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto = GPU when present")
    if loader:
        p.add_argument("--num-workers", type=int, help="image-decoding worker processes (default: up to 4)")
