"""The same search with the feature bank and with the backbone inline (``--bank off``).

Each run is a fresh ``python -m tune_rice.search`` process (its own local Ray) on the demo dataset with
the same space, seed, sample count and epochs; the feature cache is emptied before each run so the bank
run pays its extraction. Reported: wall time, phase breakdown, trials stopped by ASHA, best valid and
test accuracy, peak memory (PSS of the whole process tree, Ray workers included).

    python benchmarks/bench_search.py                                   # quick.yaml, 30 samples, on vs off
    python benchmarks/bench_search.py --modes on --space default        # what `make demo` runs
    python benchmarks/bench_search.py --modes on --concurrency 1 2 4    # memory vs concurrent trials
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from procmem import run_measured  # noqa: E402
from run_info import run_info  # noqa: E402
from search_child import check_rc, search_command, search_env  # noqa: E402


def one_run(mode: str, args, work: Path, concurrency: int) -> dict:
    name = f"bench-{Path(args.space).stem}-{mode}-c{concurrency}-{time.strftime('%H%M%S')}"
    shutil.rmtree(work / "cache" / "features", ignore_errors=True)  # every run pays its own extraction
    options = ["--num-samples", args.num_samples, "--seed", args.seed, "--weights", args.weights]
    options += ["--bank", mode, "--cpus-per-trial", args.cpus_per_trial, "--max-concurrent", concurrency]
    if args.max_epochs:
        options += ["--max-epochs", args.max_epochs]
    if args.gpus_per_trial:
        options += ["--gpus-per-trial", args.gpus_per_trial]
    cmd = search_command(args.data, args.space, work, name, *options)
    log = work / f"{name}.log"
    print(f"[{mode}] {' '.join(cmd[1:])}", flush=True)
    m = run_measured(cmd, env=search_env(work), log_path=log)
    check_rc(m["rc"], log, f"run {mode}")
    exp = work / "runs" / name
    timings = json.loads((exp / "timings.json").read_text())
    results = pd.read_csv(exp / "results.csv")
    if "kind" in results:  # the linear-probe baseline's rows are not trials
        results = results[results["kind"] != "probe"]
    test = json.loads((exp / "test_metrics.json").read_text())
    metric = [c for c in results.columns if c.startswith("best/")][0]
    per_trial = json.loads((exp / "timings.json").read_text()).get("trial_seconds", [])
    return {
        "mode": mode,
        "concurrency": concurrency,
        "wall_s": m["seconds"],
        "peak_pss_mb": m["peak_pss_mb"],
        "phases": timings["phases"],
        "trials": len(results),
        "stopped_early": int(results["stopped_early"].fillna(False).astype(bool).sum()),
        "errored": int((results["status"] == "ERROR").sum()),
        "epochs_total": int(results["epochs"].sum()),
        "best_valid": float(results[metric].max()),
        "test_acc": float(test["accuracy"]),
        "trial_compute_s": float(sum(per_trial)),
        "log": str(log),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", default="quick")
    p.add_argument("--num-samples", type=int, default=30)
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="none")
    p.add_argument("--modes", nargs="+", default=["on", "off"], choices=["on", "off"])
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[2],
        help="max concurrent trials; several values = one run each (memory scaling)",
    )
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", default=None)
    p.add_argument("--per-class", type=int, default=200, help="demo set size (images per class)")
    p.add_argument("--work", help="work folder (default: a temp folder; the demo set is generated there)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="tune-rice-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["TUNE_RICE_CACHE"] = str(work / "cache")
    from bench_extract import demo_labels

    labels = demo_labels(args.per_class)  # generate + prepare once, outside the timed runs
    args.data = str(labels)
    rows = [one_run(mode, args, work, c) for c in args.concurrency for mode in args.modes]

    print(f"\nsearch space {args.space}, {args.num_samples} samples, seed {args.seed}, weights {args.weights}")
    print(
        f"{'mode':5} {'conc':>4} {'wall s':>8} {'extract':>8} {'trials':>8} {'test':>6} {'ASHA-stopped':>12} "
        f"{'epochs':>6} {'best valid':>10} {'test acc':>8} {'peak MB':>8}"
    )
    for r in rows:
        ph = r["phases"]
        print(
            f"{r['mode']:5} {r['concurrency']:4d} {r['wall_s']:8.1f} {ph.get('extract', 0):8.1f} "
            f"{ph.get('trials', 0):8.1f} {ph.get('test', 0):6.1f} {r['stopped_early']:12d} {r['epochs_total']:6d} "
            f"{r['best_valid']:10.4f} {r['test_acc']:8.4f} {r['peak_pss_mb']:8.0f}"
        )
    by_mode = {r["mode"]: r for r in rows if r["concurrency"] == args.concurrency[0]}
    if "on" in by_mode and "off" in by_mode:
        print(f"\nspeed-up (off wall / on wall): {by_mode['off']['wall_s'] / by_mode['on']['wall_s']:.1f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**run_info(), "args": vars(args), "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
