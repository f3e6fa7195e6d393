"""Does the search earn its cost? The linear probe, the search without CV and the search with CV, on
generated data sets of different character and size.

Per data set: the probe (fitted here on the same bank as the search's, C chosen on valid, and with C chosen
by K-fold CV on train+valid and refitted) scored on valid and test; then two fresh ``python -m
tune_rice.search`` runs (``--cv off`` and ``--cv K``) of the bundled quick space at 64 px, whose summary
files give the deployed model (the best trial or the probe, chosen on valid) and its one test score.
The winner's curse is the deployed model's valid figure minus its test accuracy.

    python benchmarks/bench_probe.py                      # three sets, 12 trials per search
    python benchmarks/bench_probe.py --sets field-small --num-samples 6

Random-init resnet18 (no ImageNet weights on this machine). Writes benchmarks/results/probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_child import run_logged, search_command, search_env  # noqa: E402

# name: (demo family, per_class, seed). Sizes after the split (15% valid / 15% test): about 38, 96 and
# 158 valid images.
SETS = {"field-small": ("field", 60, 2), "plain-medium": ("plain", 150, 3), "scans-large": ("scans", 250, 4)}
IMAGE_SIZE = 64


def make_set(name: str, work: Path) -> Path:
    from tune_rice.demo import generate_demo
    from tune_rice.prepare import prepare_dataset

    family, per_class, seed = SETS[name]
    folder = generate_demo(
        work / "data" / name, per_class=per_class, size=IMAGE_SIZE, seed=seed, family=family, workers=1
    )
    # Exact copies grouped only: at 64 px the difference hash groups most drawings of the plain and scans
    # families together (distinct images of near-identical layout), which would leave no stratified split.
    return prepare_dataset(folder, dup_threshold=0, progress=False, workers=1).labels_csv


def space_file(work: Path) -> Path:
    space = yaml.safe_load((ROOT / "search_spaces" / "quick.yaml").read_text())
    space["params"]["image_size"] = IMAGE_SIZE
    space["description"] = f"quick.yaml at {IMAGE_SIZE} px"
    path = work / "quick64.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def probe_figures(csv: Path, space: Path, cache: Path, folds_k: int) -> dict:
    from tune_rice.data import read_labels
    from tune_rice.engine import BankBatches, evaluate
    from tune_rice.features import extract_banks
    from tune_rice.probe import bank_folds, probe_bank, probe_bank_cv
    from tune_rice.space import load_search_space

    spec = load_search_space(space).feature_specs(seed=0)[0]
    bank = extract_banks(
        csv, [spec], weights="none", splits=("train", "valid", "test"), cache_dir=cache, num_workers=1, progress=False
    )[spec.name]
    test = BankBatches(bank.splits["test"], batch_size=512, train=False)
    n_classes = len(bank.classes)
    out = {"sizes": {k: len(s) for k, s in bank.splits.items()}, "classes": len(bank.classes)}
    plain = probe_bank(bank)
    out["probe"] = {
        "C": plain.C,
        "valid_acc": plain.valid["acc"],
        "valid_count": plain.valid["count"],
        "test_acc": evaluate(plain.head, test, n_classes=n_classes)["acc"],
        "seconds": plain.seconds,
    }
    table = read_labels(csv)
    folds = bank_folds(bank, dict(zip(table.frame["path"], table.frame["group"])), folds_k)
    cv = probe_bank_cv(bank, folds)
    out["probe_cv"] = {
        "C": cv.C,
        "valid_acc": cv.valid["acc"],
        "valid_count": cv.valid["count"],
        "test_acc": evaluate(cv.head, test, n_classes=n_classes)["acc"],
        "seconds": cv.seconds,
    }
    return out


def search(csv: Path, space: Path, work: Path, name: str, cv: str, args) -> dict:
    options = ["--num-samples", args.num_samples, "--seed", 0, "--weights", "none", "--cv", cv, "--max-concurrent", 2]
    cmd = search_command(csv, space, work, name, *options)
    seconds = run_logged(cmd, search_env(work), work / f"{name}.log", f"search {name}")
    exp = work / "runs" / name
    baseline = json.loads((exp / "baseline.json").read_text())
    test = json.loads((exp / "test_metrics.json").read_text())
    keep = (
        "cv_folds",
        "best_trial",
        "best_probe",
        "search_beat_probe",
        "single_best",
        "deployed",
        "members",
        "deployed_valid_acc",
        "deployed_valid_count",
    )
    return {
        "cv": cv,
        "seconds": seconds,
        **{k: baseline.get(k) for k in keep},
        "probe_C": {n: p["C"] for n, p in baseline["probes"].items()},
        "test_acc": test["accuracy"],
        "test_count": test["test_count"],
        "gap": baseline["deployed_valid_acc"] - test["accuracy"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--num-samples", type=int, default=12)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--work", default="/tmp/tune_rice_bench_probe")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "probe.json"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    space = space_file(work)
    stamp = time.strftime("%H%M%S")
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "weights": "random init (resnet18, seed 0)",
        "space": f"quick.yaml at {IMAGE_SIZE} px",
        "num_samples": args.num_samples,
        "folds": args.folds,
        "sets": {},
    }
    for name in args.sets:
        csv = make_set(name, work)
        res = probe_figures(csv, space, work / "cache" / "features", args.folds)
        print(
            f"{name}: {res['sizes']}  probe valid {res['probe']['valid_acc']:.3f} test {res['probe']['test_acc']:.3f}"
            f" | CV probe oof {res['probe_cv']['valid_acc']:.3f} test {res['probe_cv']['test_acc']:.3f}",
            flush=True,
        )
        for cv in ("off", str(args.folds)):
            r = search(csv, space, work, f"{name}-cv{cv}-{stamp}", cv, args)
            res[f"search_cv_{cv}"] = r
            print(
                f"  search --cv {cv}: beat probe {r['search_beat_probe']}, deployed {r['deployed']} valid "
                f"{r['deployed_valid_acc']:.3f} on "
                f"{r['deployed_valid_count']}, test {r['test_acc']:.3f}, gap {r['gap']:+.3f} ({r['seconds']:.0f}s)",
                flush=True,
            )
        out["sets"][name] = res
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
