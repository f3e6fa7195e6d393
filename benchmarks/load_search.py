"""Load: many more trials than slots (default 60 samples, 2 at a time) on a tiny dataset; memory must not
grow with the number of trials.

One fresh ``python -m tune_rice.search`` process (its own local Ray) on a generated 3-class set of tiny
images, random-init resnet18 at 32 px, 2 epochs per trial. Reported: wall time, peak PSS of the whole
process tree (``procmem.run_measured``: Ray's GCS, raylet and workers included, shared pages counted
once), and the peak PSS while each third of the trials was running: a leak per trial shows as a peak that
climbs from the first third to the last.

    python benchmarks/load_search.py                       # 60 samples, 2 concurrent
    python benchmarks/load_search.py --num-samples 120 --max-concurrent 2

The figures also go to ``--out`` (default ``benchmarks/results/load_search.json``) with the date, the
versions and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procmem import Sampler, _children, pss_mb, run_measured  # noqa: E402
from run_info import run_info  # noqa: E402
from search_child import check_rc, search_command, search_env  # noqa: E402

SPACE = """\
metric: valid/acc
max_epochs: {epochs}
params:
  backbone: resnet18
  image_size: 32
  views: 1
  lr: {{loguniform: [1.0e-3, 3.0e-2]}}
  hidden: {{choice: [0, 32]}}
  dropout: {{uniform: [0.0, 0.5]}}
"""


def make_dataset(root: Path, per_class: int = 12, seed: int = 0) -> None:
    """3 class folders of 24 px textured JPEGs whose mean colour tells the class (no labels.csv: the search
    prepares it)."""
    rng = np.random.default_rng(seed)
    for label, colour in {"alpha": (200, 60, 50), "beta": (50, 170, 60), "gamma": (60, 80, 200)}.items():
        (root / label).mkdir(parents=True)
        for k in range(per_class):
            arr = np.clip(np.array(colour) + rng.normal(0, 35, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / label / f"{label}_{k:03d}.jpg", quality=92)


class Timeline(Sampler):
    """Every ``interval`` s: (seconds, trials started, PSS of this process's children and their trees)."""

    def __init__(self, exp: Path, interval: float = 1.0):
        super().__init__(interval)
        self.exp, self.samples, self._t0 = exp, [], time.perf_counter()

    def sample(self) -> None:
        kids = _children().get(os.getpid(), [])
        mb = sum(pss_mb(k) for k in kids)
        started = len(list(self.exp.glob("trial_*"))) if self.exp.is_dir() else 0
        self.samples.append((time.perf_counter() - self._t0, started, mb))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=60)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--max-epochs", type=int, default=2)
    p.add_argument("--work", help="folder for data, cache and runs (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_search.json"), help="JSON to write")
    args = p.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="load_search_"))
    data = work / "data"
    if not data.exists():
        make_dataset(data)
    space = work / "space.yaml"
    space.write_text(SPACE.format(epochs=args.max_epochs))
    name = f"load-{time.strftime('%H%M%S')}"
    exp = work / "runs" / name
    options = ["--num-samples", args.num_samples, "--max-concurrent", args.max_concurrent]
    options += ["--max-epochs", args.max_epochs, "--grace-period", 1, "--weights", "none"]
    cmd = search_command(data, space, work, name, *options)
    log = work / f"{name}.log"
    print(f"{len(os.sched_getaffinity(0))} CPUs; {' '.join(cmd[1:])}", flush=True)
    with Timeline(exp) as timeline:
        m = run_measured(cmd, env=search_env(work, TUNE_RICE_OFFLINE="1"), log_path=log)
    check_rc(m["rc"], log, "search")

    results = pd.read_csv(exp / "results.csv")
    if "kind" in results:  # the linear-probe baseline's rows are not trials
        results = results[results["kind"] != "probe"]
    test = json.loads((exp / "test_metrics.json").read_text())
    statuses = results["status"].value_counts().to_dict()
    stopped = int(results["stopped_early"].sum())
    print(
        f"trials: {len(results)} ({statuses}; {stopped} stopped early by ASHA), "
        f"best valid/acc {results['best/valid/acc'].max():.3f}, test accuracy {test['accuracy']:.3f}"
    )
    print(
        f"wall: {m['seconds']:.1f} s ({m['seconds'] / len(results):.2f} s per trial, {args.max_concurrent} at a time)"
    )
    print(f"peak PSS of the process tree: {m['peak_pss_mb']:.0f} MB")
    during = [(n, mb) for _, n, mb in timeline.samples if n > 0]
    thirds = np.array_split(np.arange(1, args.num_samples + 1), 3)
    peaks = []
    for part in thirds:
        lo, hi = int(part[0]), int(part[-1])
        peak = max((mb for n, mb in during if lo <= n <= hi), default=float("nan"))
        peaks.append({"trials": [lo, hi], "peak_pss_mb": peak})
        print(f"  peak PSS while trials {lo:>3}-{hi:<3} were starting: {peak:.0f} MB")
    checkpoints = sorted(exp.glob("trial_*/checkpoint_*"))
    checkpoint_mb = sum(f.stat().st_size for c in checkpoints for f in c.rglob("*") if f.is_file()) / 1e6
    print(f"checkpoints left after the search: {len(checkpoints)} ({checkpoint_mb:.1f} MB)")
    print(f"outputs: {exp}")
    record = {
        **run_info(),
        "args": vars(args),
        "trials": len(results),
        "statuses": statuses,
        "stopped_early": stopped,
        "best_valid_acc": float(results["best/valid/acc"].max()),
        "test_acc": float(test["accuracy"]),
        "wall_s": m["seconds"],
        "seconds_per_trial": m["seconds"] / len(results),
        "peak_pss_mb": m["peak_pss_mb"],
        "peak_pss_by_third": peaks,
        "checkpoints_left": len(checkpoints),
        "checkpoint_mb": checkpoint_mb,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
