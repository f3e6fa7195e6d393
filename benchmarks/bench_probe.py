"""Does the search earn its cost? The linear probe, the search without CV and the search with CV, on
generated data sets of different character and size.

Per data set: the probe (fitted here on the same bank as the search's, C chosen on valid, and with C chosen
by K-fold CV on train+valid and refitted) scored on valid and test; then two fresh ``python -m
tune_rice.search.run`` runs (``--cv off`` and ``--cv K``) of the bundled quick space at 64 px, whose summary
files give the deployed model (the best trial or the probe, chosen on valid) and its one test score.
The winner's curse is the deployed model's valid figure minus its test accuracy. For the record, the
search's best trial is also scored here on the test bank (from its best checkpoint), whether or not it
was deployed: the search itself reads the test split only for its deployed model.

    python benchmarks/bench_probe.py                      # three sets, 12 trials per search
    python benchmarks/bench_probe.py --sets field-small --num-samples 6
    python benchmarks/bench_probe.py --sets plain-medium --num-samples 6 --merge   # one set at a time
    python benchmarks/bench_probe.py --backbone timm:tf_efficientnet_lite0 --weights lite0 --image-size 128 \
        --sets field-small plain-medium scans-large digits --out benchmarks/results/probe_lite0.json

Default: random-init resnet18 (quick.yaml). ``--weights lite0`` uses the EfficientNet-Lite0 ImageNet
weights a package ships (``timm_zoo.lite0_weights_file``, for ``timm:tf_efficientnet_lite0``): real
pretrained features; the probe is then also fitted on the same backbone at random init, beside them.
``digits`` is scikit-learn's ``load_digits`` (real handwriting, 8x8 px), upscaled. Each search also records
the single best trial against the selected ensemble and their calibration (ECE before and after the
temperature) from its test_metrics.json. Writes benchmarks/results/probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_info import run_info  # noqa: E402
from search_child import run_logged, search_command, search_env  # noqa: E402

# name: (demo family, per_class, seed). Sizes after the split (15% valid / 15% test): about 38, 96 and
# 158 valid images.
SETS = {
    "field-small": ("field", 60, 2),
    "plain-medium": ("plain", 150, 3),
    "scans-large": ("scans", 250, 4),
    "digits": ("digits", 40, 0),  # scikit-learn's handwritten digits: 10 classes, 40 of each (of ~180)
}
IMAGE_SIZE = 64


def make_digits(folder: Path, *, per_class: int, size: int, seed: int) -> Path:
    """scikit-learn's 8x8 handwritten digits (grey levels 0-16), ``per_class`` of each digit drawn with
    ``seed``, upscaled to ``size`` px (bicubic) as class folders of PNGs."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        picked = rng.choice(np.flatnonzero(digits.target == label), size=per_class, replace=False)
        for i in picked:
            grey = (255 - digits.images[i] * 255 / 16).astype(np.uint8)  # dark ink on white paper
            Image.fromarray(grey).convert("RGB").resize((size, size), Image.BICUBIC).save(
                folder / str(label) / f"d{i}.png"
            )
    return folder


def make_set(name: str, work: Path) -> Path:
    from tune_rice.data.demo import generate_demo
    from tune_rice.data.prepare import prepare_dataset

    family, per_class, seed = SETS[name]
    if family == "digits":
        folder = make_digits(work / "data" / name, per_class=per_class, size=IMAGE_SIZE, seed=seed)
    else:
        folder = generate_demo(
            work / "data" / name, per_class=per_class, size=IMAGE_SIZE, seed=seed, family=family, workers=1
        )
    # Exact copies grouped only, as when these sets were first measured (BENCHMARKS.md section 6): the same
    # splits from one run to the next, whatever the near-duplicate rules become.
    return prepare_dataset(folder, dedup_mode="exact", progress=False, workers=1).labels_csv


def space_file(work: Path, backbone: str | None = None) -> Path:
    space = yaml.safe_load((ROOT / "search_spaces" / "quick.yaml").read_text())
    space["params"]["image_size"] = IMAGE_SIZE
    if backbone:
        space["params"]["backbone"] = backbone
    space["description"] = f"quick.yaml at {IMAGE_SIZE} px" + (f", backbone {backbone}" if backbone else "")
    path = work / f"quick{IMAGE_SIZE}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def weights_arg(value: str) -> str:
    """``--weights``: none (random init), lite0 (the mapped EfficientNet-Lite0 ImageNet file), or a file."""
    if value == "lite0":
        from tune_rice.features.timm_zoo import lite0_weights_file

        return str(lite0_weights_file())
    return value


def weights_label(value: str, backbone: str) -> str:
    what = "random init" if value == "none" else "Lite0 ImageNet" if value == "lite0" else f"file {Path(value).name}"
    return f"{what} ({backbone}, seed 0)"


def probe_only(csv: Path, space: Path, cache: Path, weights: str) -> dict:
    """The probe (C on valid) on ``weights``' bank: valid and test accuracy."""
    from tune_rice.experiment.space import load_search_space
    from tune_rice.features.bank import extract_banks
    from tune_rice.heads.engine import BankBatches, evaluate
    from tune_rice.heads.probe import probe_bank

    spec = load_search_space(space).feature_specs(seed=0)[0]
    bank = extract_banks(
        csv, [spec], weights=weights, splits=("train", "valid", "test"), cache_dir=cache, num_workers=1, progress=False
    )[spec.name]
    fit = probe_bank(bank)
    test = BankBatches(bank.splits["test"], batch_size=512, train=False)
    return {
        "C": fit.C,
        "valid_acc": fit.valid["acc"],
        "test_acc": evaluate(fit.head, test, n_classes=len(bank.classes))["acc"],
        "seconds": fit.seconds,
    }


def probe_figures(csv: Path, space: Path, cache: Path, folds_k: int, weights: str = "none"):
    """The probe's figures on the search's bank (C on valid, and by K-fold CV), and the bank."""
    from tune_rice.data.images import read_labels
    from tune_rice.experiment.space import load_search_space
    from tune_rice.features.bank import extract_banks
    from tune_rice.heads.cv import bank_folds
    from tune_rice.heads.engine import BankBatches, evaluate
    from tune_rice.heads.probe import probe_bank, probe_bank_cv

    spec = load_search_space(space).feature_specs(seed=0)[0]
    bank = extract_banks(
        csv, [spec], weights=weights, splits=("train", "valid", "test"), cache_dir=cache, num_workers=1, progress=False
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
    return out, bank


def trial_test_acc(exp: Path, trial_id: str, bank) -> float:
    """The test accuracy of a trial's best checkpoint (the only one kept after a search) on ``bank``'s test
    split: its head, or a cross-validated trial's fold heads averaged, as the final model would deploy it."""
    import numpy as np
    import torch

    from tune_rice.heads.engine import TrialConfig
    from tune_rice.heads.final import candidate_from_state

    (folder,) = (exp / f"trial_{trial_id}").glob("checkpoint_*")
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    cfg = TrialConfig.from_dict(json.loads((exp / f"trial_{trial_id}" / "params.json").read_text()))
    cand = candidate_from_state(trial_id, state, cfg)
    test = bank.splits["test"]
    with torch.no_grad():
        x = torch.as_tensor(np.asarray(test.features[:, 0], dtype=np.float32))
        z = torch.stack([h.eval()(x) for h in cand.heads]).mean(0)
    return float((z.argmax(1).numpy() == np.asarray(test.targets)).mean())


def search(csv: Path, space: Path, work: Path, name: str, cv: str, args, bank) -> dict:
    weights = weights_arg(args.weights)
    options = ["--num-samples", args.num_samples, "--seed", 0, "--weights", weights, "--cv", cv, "--max-concurrent", 2]
    cmd = search_command(csv, space, work, name, *options)
    seconds = run_logged(cmd, search_env(work), work / f"{name}.log", f"search {name}")
    exp = work / "runs" / name
    baseline = json.loads((exp / "baseline.json").read_text())
    test = json.loads((exp / "test_metrics.json").read_text())
    chosen = json.loads((exp / "final.json").read_text())
    best_trial = baseline["best_trial"]["trial_id"]
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
        "lead": chosen.get("lead", {}),
        "leader": chosen["candidates"][0],
        "best_trial_test_acc": trial_test_acc(exp, best_trial, bank),
        "test_acc": test["accuracy"],
        "test_count": test["test_count"],
        "gap": baseline["deployed_valid_acc"] - test["accuracy"],
        # single best trial vs the selected ensemble on test, each before and after its temperature
        "final_deployed": chosen.get("deployed"),
        "final_test": {
            kind: {
                when: {k: test[key]["calibration"][when][k] for k in ("acc", "ece", "nll")}
                for when in ("before", "after")
            }
            for kind, key in (("single", "single_best"), ("ensemble", "ensemble"))
            if test.get(key) and "calibration" in test[key]
        },
    }


def main(argv=None) -> int:
    global IMAGE_SIZE
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    p.add_argument("--num-samples", type=int, default=12)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--work", default="/tmp/tune_rice_bench_probe")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "probe.json"))
    p.add_argument("--merge", action="store_true", help="keep the other sets already in --out (run one set at a time)")
    p.add_argument("--backbone", help="the backbone (default: quick.yaml's resnet18), e.g. timm:tf_efficientnet_lite0")
    p.add_argument(
        "--weights", default="none", help="none (random init), lite0 (EfficientNet-Lite0 ImageNet) or a file"
    )
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="generated images and the space's image_size")
    p.add_argument("--searches", nargs="+", default=["off", "cv"], help="which searches to run per set (off, cv)")
    args = p.parse_args(argv)
    IMAGE_SIZE = args.image_size  # the module's size for make_set and space_file
    import torch

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    space = space_file(work, args.backbone)
    stamp = time.strftime("%H%M%S")
    out = {
        **run_info(),
        "weights": weights_label(args.weights, args.backbone or "resnet18"),
        "space": f"quick.yaml at {IMAGE_SIZE} px" + (f", backbone {args.backbone}" if args.backbone else ""),
        "num_samples": args.num_samples,
        "folds": args.folds,
        "sets": {},
    }
    if args.merge and Path(args.out).is_file():
        out["sets"] = json.loads(Path(args.out).read_text()).get("sets", {})
    for name in args.sets:
        started = run_info()
        csv = make_set(name, work)
        res, bank = probe_figures(csv, space, work / "cache" / "features", args.folds, weights_arg(args.weights))
        if args.weights != "none":  # the same backbone at random init, beside the real features
            res["probe_random_init"] = probe_only(csv, space, work / "cache" / "features", "none")
            print(f"{name}: probe at random init: test {res['probe_random_init']['test_acc']:.3f}", flush=True)
        print(
            f"{name}: {res['sizes']}  probe valid {res['probe']['valid_acc']:.3f} test {res['probe']['test_acc']:.3f}"
            f" | CV probe oof {res['probe_cv']['valid_acc']:.3f} test {res['probe_cv']['test_acc']:.3f}",
            flush=True,
        )
        runs = [cv for cv, key in (("off", "off"), (str(args.folds), "cv")) if key in args.searches]
        for cv in runs:
            r = search(csv, space, work, f"{name}-cv{cv}-{stamp}", cv, args, bank)
            res[f"search_cv_{cv}"] = r
            print(
                f"  search --cv {cv}: beat probe {r['search_beat_probe']}, deployed {r['deployed']} valid "
                f"{r['deployed_valid_acc']:.3f} on "
                f"{r['deployed_valid_count']}, test {r['test_acc']:.3f}, gap {r['gap']:+.3f} ({r['seconds']:.0f}s); "
                f"led by {r['leader']}; best trial test {r['best_trial_test_acc']:.3f}",
                flush=True,
            )
        # Each set with its own date and load: with --merge, the sets of one file ran one after another.
        out["sets"][name] = {
            "run": {**started, "load_average_end": list(os.getloadavg())},
            "seconds": sum(res[f"search_cv_{cv}"]["seconds"] for cv in runs),
            **res,
        }
        # Written after every set: a run cut short keeps the sets it finished.
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
