"""When, where and with what a benchmark ran: the fields every JSON in benchmarks/results/ starts with."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform


def run_info() -> dict:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpus": cpus,
        "load_average": list(os.getloadavg()),
        "python": platform.python_version(),
        "versions": {d: version(d) for d in ("torch", "torchvision", "ray", "optuna", "numpy", "pandas")},
    }
