"""The final model: single best vs the selected ensemble, before and after temperature scaling.

For each dataset a real search runs (``python -m tune_rice.search``, its own local Ray, random-init
backbone: no ImageNet weights on this machine) with ``--ensemble K``; then this script reads what the
search recorded (final.json: the choice on valid; test_metrics.json: the one test pass, deployed model,
single best and ensemble each with its own temperature; timings.json: the seconds of the final phase)
and times ``predict`` on the test images with the single best and with the selected ensemble, both
rebuilt from the trials' checkpoints (the same numbers the search used).

    python benchmarks/bench_final.py --out benchmarks/results/final.json
    python benchmarks/bench_final.py --families field --num-samples 8 --per-class 30   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tune_rice.data.images import preprocessing_spec, read_labels  # noqa: E402
from tune_rice.features.model import Classifier, Ensemble, resolve_weights  # noqa: E402
from tune_rice.heads import final  # noqa: E402
from tune_rice.heads.engine import TrialConfig  # noqa: E402
from tune_rice.tools.predict import LoadedModel, predict_files  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_child import run_logged, search_command, search_env  # noqa: E402


def dataset(family: str, per_class: int, root: Path) -> Path:
    """labels.csv of the demo set of ``family`` (generated once, outside the timed runs). The field set is
    prepared as a user would (``prepare``); the others get their split from the generator's own record of
    its near-duplicates (a group each, kept in one split), since today's ``prepare`` groups most of those
    near-identical layouts together."""
    from tune_rice.data.demo import MARKER, ensure_demo
    from tune_rice.data.prepare import prepare_dataset

    folder = ensure_demo(per_class=per_class, size=256, seed=0, family=family, root=root)
    if family == "field":
        csv = folder / "labels.csv"
        if not csv.is_file():
            prepare_dataset(folder, progress=False)
        return csv
    csv = folder / "labels-truth.csv"
    if csv.is_file():
        return csv
    marker = json.loads((folder / MARKER).read_text())
    source = {d["path"]: d["source"] for d in marker["near_duplicates"]}
    rng = np.random.default_rng(0)
    rows = []
    for label in marker["classes"]:
        files = sorted(p.relative_to(folder).as_posix() for p in (folder / label).glob("*.jpg"))
        groups: dict[str, list[str]] = {}
        for rel in files:
            groups.setdefault(source.get(rel, rel), []).append(rel)
        keys = sorted(groups)
        rng.shuffle(keys)
        done = 0
        for key in keys:  # 70 / 15 / 15 by images, a group whole in one split
            split = "train" if done < 0.7 * len(files) else "valid" if done < 0.85 * len(files) else "test"
            rows += [{"path": rel, "label": label, "split": split, "group": key} for rel in groups[key]]
            done += len(groups[key])
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def run_search(labels: Path, args, work: Path, name: str) -> Path:
    options = ["--num-samples", args.num_samples, "--seed", args.seed, "--weights", "none", "--ensemble", args.ensemble]
    if args.max_epochs:
        options += ["--max-epochs", args.max_epochs]
    cmd = search_command(labels, args.space, work, name, *options)
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    seconds = run_logged(cmd, search_env(work), work / f"{name}.log", f"search {name}")
    print(f"[{name}] {seconds:.0f}s", flush=True)
    return work / "runs" / name


def _best_state(trial_dir: Path, mode: str) -> dict:
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in trial_dir.glob("checkpoint_*/state.pt")]
    if not states:
        raise SystemExit(f"{trial_dir}: no checkpoint")
    return (max if mode == "max" else min)(states, key=lambda s: float(s["best"]))


def rebuilt_models(exp: Path, record: dict, seed: int):
    """The selected ensemble and the single best, from the selected trials' best checkpoints."""
    choice = final.FinalChoice.from_dict(record)
    choice.lead = {}  # the selected members only: not the probe the test pass also scores
    names = [choice.candidates[i] for i in choice.selection.members]
    pool = []
    for name in names:
        state = _best_state(exp / f"trial_{name}", record["mode"])
        pool.append(final.candidate_from_state(name, state, TrialConfig.from_dict(state["config"])))
    weights = {c.spec.backbone: resolve_weights(c.spec.backbone, "none", seed=seed) for c in pool}
    ensemble, _, _ = final.build_final_model(choice, pool, weights, selection=True)
    if isinstance(ensemble, Ensemble):
        single = Classifier(
            ensemble.backbones[ensemble.backbone_index[0]], ensemble.heads[0], temperature=choice.single_temperature
        )
    else:
        single = ensemble
    return single.eval(), ensemble.eval(), pool[0].spec.image_size


def images_per_s(module, classes, image_size: int, files, *, repeats: int) -> float:
    loaded = LoadedModel(module, list(classes), preprocessing_spec(image_size), "random", Path("bench"), "artifact")
    predict_files(loaded, files[:8], batch_size=64, progress=False)  # warm-up
    best = 0.0
    for _ in range(repeats):  # the best of a few: the machine is shared
        t = time.perf_counter()
        predict_files(loaded, files, batch_size=64, num_workers=1, progress=False)
        best = max(best, len(files) / (time.perf_counter() - t))
    return best


def pick(m: dict) -> dict:
    return {k: m[k] for k in ("acc", "macro_f1", "ece", "nll", "brier")}


def one_set(family: str, args, work: Path) -> dict:
    labels = dataset(family, args.per_class, work / "data")
    table = read_labels(labels)
    exp = run_search(labels, args, work, f"final-{family}-{time.strftime('%H%M%S')}")
    record = json.loads((exp / "final.json").read_text())
    test = json.loads((exp / "test_metrics.json").read_text())
    timings = json.loads((exp / "timings.json").read_text())
    single, ensemble, size = rebuilt_models(exp, record, args.seed)
    files = table.paths("test")
    files = (files * (1 + args.predict_images // max(1, len(files))))[: args.predict_images]
    torch.set_num_threads(args.threads)
    speed = {
        "single": images_per_s(single, table.classes, size, files, repeats=args.repeats),
        "ensemble": images_per_s(ensemble, table.classes, size, files, repeats=args.repeats),
    }
    v = record["valid"]
    scored = {"single": test["single_best"], "ensemble": test.get("ensemble")}
    row = {
        "family": family,
        "labels": str(labels),
        "sizes": {s: len(table.split(s)) for s in ("train", "valid", "test")},
        "exp": str(exp),
        "candidates": len(record["candidates"]),
        "deployed": record["deployed"],
        "selection": {
            "members": record["selection"]["members"],
            "weights": record["selection"]["weights"],
            "picks": len(record["selection"]["picks"]),
        },
        "temperature": {"single": record["single_temperature"], "ensemble": record["ensemble_temperature"]},
        "valid": {
            "single": pick(v["single"]),
            "single_calibrated": pick(v["single_calibrated"]),
            "ensemble": pick(v["ensemble"]),
            "ensemble_calibrated": pick(v["ensemble_calibrated"]),
        },
        "test": {
            k: {"before": pick(s["calibration"]["before"]), "after": pick(s["calibration"]["after"])}
            for k, s in scored.items()
            if s
        },
        "threshold": record["threshold"],
        "final_seconds": record.get("seconds", {}),
        "final_phase_s": timings["phases"].get("final"),
        "phases": timings["phases"],
        "predict_images_per_s": speed,
        "predict_images": len(files),
        "ensemble_backbones": len(ensemble.backbones) if isinstance(ensemble, Ensemble) else 1,
        "ensemble_heads": len(ensemble.heads) if isinstance(ensemble, Ensemble) else 1,
    }
    te = row["test"]
    print(
        f"{family}: {row['candidates']} candidates, deployed {row['deployed']}, selection "
        f"{len(row['selection']['members'])} members; valid acc single {v['single']['acc']:.3f} ensemble "
        f"{v['ensemble']['acc']:.3f}; test acc single {te['single']['after']['acc']:.3f}"
        + (f" ensemble {te['ensemble']['after']['acc']:.3f}" if "ensemble" in te else "")
        + f"; final phase {row['final_phase_s']:.2f}s; predict {speed['single']:.0f} vs {speed['ensemble']:.0f} img/s",
        flush=True,
    )
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["field", "plain"], help="demo families (tune_rice.data.demo)")
    p.add_argument("--per-class", type=int, default=200, help="demo set size (images per class)")
    p.add_argument("--space", default="quick")
    p.add_argument("--num-samples", type=int, default=30)
    p.add_argument("--max-epochs", type=int)
    p.add_argument("--ensemble", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--predict-images", type=int, default=256, help="test images (repeated) timed through predict")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch threads while timing predict")
    p.add_argument("--work", help="work folder (default: a temp folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "final.json"))
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="tune-rice-final-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = [one_set(f, args, work) for f in args.families]
    out = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "weights": "random init (--weights none)",
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "sets": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
