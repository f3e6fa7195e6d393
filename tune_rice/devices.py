"""Which device a tool computes on and how many processes decode its images: one answer for every tool."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from . import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or ``taskset``'s limit, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def assigned_cpus() -> int:
    """CPUs this process may use for its work: those Ray assigned to the task or actor it runs in (Ray
    pins no CPUs, so the affinity mask would name the whole node), else :func:`usable_cpus`."""
    ray = sys.modules.get("ray")  # imported by whoever runs under Ray; never imported here
    if ray is not None and ray.is_initialized():
        try:
            ctx = ray.get_runtime_context()
            if ctx.worker.mode == ray.WORKER_MODE:  # a task or actor, not the driver
                return max(1, int(ctx.get_assigned_resources().get("CPU", 1)))
        except Exception:  # noqa: BLE001 - an older or newer Ray without these: fall back to the mask
            pass
    return usable_cpus()


# A GPU's loader gets every CPU but the one feeding the GPU, up to this many worker processes (each holds
# a torch import, a few hundred MB).
MAX_GPU_WORKERS = 32


def loader_workers(
    device: str | torch.device = "cpu", *, cpus: int | None = None, batches: int | None = None, most: int = 8
) -> int:
    """Image-decoding worker processes for a loader that feeds ``device``, given ``cpus`` (default
    :func:`assigned_cpus`: Ray's share inside a task, else the affinity mask).

    CUDA: one CPU feeds the GPU and every other one decodes (up to ``MAX_GPU_WORKERS``): a 16-core node
    with one GPU decodes on 15 worker processes. CPU: the forward needs the cores too, so as before, one
    CPU is left and at most ``most`` decode. One CPU: decoding in the calling process (0). Never more
    than there are ``batches`` to decode."""
    cpus = assigned_cpus() if cpus is None else int(cpus)
    cap = MAX_GPU_WORKERS if torch.device(device).type == "cuda" else most
    n = max(0, min(cap, cpus - 1))
    return n if batches is None else max(0, min(n, batches))


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
