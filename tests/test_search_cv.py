"""Cross-validated searches end to end (with --resume), the probe in a search's outputs, and the deployed
model of a cross-validated trial."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import local_ray, make_separable_dataset, search_argv
from search_driver import kill_mid_search, terminated
from test_engine import synthetic_bank

from tune_rice.data.images import build_transform, load_image, read_labels
from tune_rice.features.model import Ensemble, load_artifact
from tune_rice.heads.cv import CVHeadRun
from tune_rice.heads.engine import TrialConfig
from tune_rice.search import run as search

SPACE = """\
metric: valid/acc
max_epochs: 3
params:
  backbone: resnet18
  image_size: 32
  views: 2
  lr: {loguniform: [1.0e-3, 3.0e-2]}
  hidden: {choice: [0, 32]}
"""


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    with local_ray(tmp_path_factory):
        import ray

        yield ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    """24 train / 12 valid / 12 test images, 32 px, 3 classes."""
    return make_separable_dataset(tmp_path_factory.mktemp("cv") / "data", per_class=16, size=32)


@pytest.mark.slow
def test_cv_search_end_to_end_with_resume(ray_local, labels, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    storage, space = tmp_path / "runs", tmp_path / "space.yaml"
    space.write_text(SPACE)
    exp = storage / "cv"
    argv = search_argv(
        labels,
        space,
        storage,
        "cv",
        "--num-samples",
        4,
        "--max-concurrent",
        1,
        "--cv",
        3,
        "--address",
        ray_local,
        "--metric",
        "balanced_acc",  # overrides the space's valid/acc, end to end, and survives the resume
    )
    # the third trial is held after its first epoch until the driver is killed, so the kill lands
    # mid-search however fast or loaded the machine is
    kill_mid_search(
        argv, work=tmp_path, trial=2, after_epoch=1, ready=lambda: len(terminated(exp)) >= 2, what="2 finished trials"
    )
    assert not (exp / "results.csv").exists()
    assert search.main(["--resume", "--name", "cv", "--storage-path", str(storage)]) == 0

    table = read_labels(labels)
    pooled = len(table.split("train")) + len(table.split("valid"))
    df = pd.read_csv(exp / "results.csv", dtype={"trial_id": str})
    trials, probes = df[df["kind"] == "trial"], df[df["kind"] == "probe"]
    assert len(trials) == 4 and trials["trial_id"].is_unique and set(trials["status"]) == {"TERMINATED"}
    # every trial scored out of fold on all train+valid images, 3 folds
    assert (trials["valid_count"] == pooled).all() and (trials["cv_folds"] == 3).all()
    assert len(probes) == 1 and probes["cv_folds"].item() == 3 and probes["valid_count"].item() == pooled
    # TensorBoard: the mean and the spread over folds, each epoch once
    for _, row in trials.iterrows():
        acc = EventAccumulator(str(row["trial_dir"]))
        acc.Reload()
        tags = acc.Tags()["scalars"]
        assert {"valid/acc", "valid/acc_sd", "valid/acc_min", "valid/acc_max"} <= set(tags), row["trial_id"]
        assert [e.step for e in acc.Scalars("valid/acc")] == list(range(1, int(row["epochs"]) + 1))
    # the final model, chosen on the out-of-fold logits over train+valid: led by the best trial when it
    # beats the probe by more than picking the best of 4 trials explains, else by the probe; a single model or an
    # ensemble; a CV trial joins it as its 3 fold heads averaged.
    # It classifies the test images as test_metrics.json says.
    baseline = json.loads((exp / "baseline.json").read_text())
    test = json.loads((exp / "test_metrics.json").read_text())
    assert baseline["cv_folds"] == 3 and baseline["single_best"] == test["trial_id"]
    assert baseline["deployed_valid_count"] == pooled
    assert trials["best/valid/balanced_acc"].notna().all() and probes["best/valid/balanced_acc"].notna().all()
    assert baseline["metric"] == "valid/balanced_acc" == json.loads((exp / "final.json").read_text())["metric"]
    lead = json.loads((exp / "final.json").read_text())["lead"]  # the one verdict against the probe
    assert lead["count"] == pooled and lead["trials"] == 4 and lead["probe"] == probes["trial_id"].item()
    assert lead["leader"] == (lead["trial"] if lead["clear"] else lead["probe"]) and lead["clear"] == (
        lead["p_value"] <= lead["alpha"]
    )
    assert baseline["search_beat_probe"] == lead["clear"] and baseline["lead"] == lead
    assert test["trial_id"].startswith("probe:") == lead["leader"].startswith("probe:")
    model, _ = load_artifact(exp / "best" / "model.pt")
    heads = len(model.heads) if isinstance(model, Ensemble) else 1
    assert heads == sum(1 if m.startswith("probe:") else 3 for m in test["members"])
    x = torch.stack([build_transform(32, train=False)(load_image(p)) for p in table.paths("test")])
    with torch.inference_mode():
        accuracy = float((model(x).argmax(1).numpy() == table.targets("test")).mean())
    assert accuracy == pytest.approx(test["accuracy"])
    summary = (exp / "summary.txt").read_text()
    assert "cross-validated: 3 folds" in summary and f"on {pooled} [" in summary
    assert ("did NOT beat the linear probe" in summary) == (not lead["clear"])


def test_a_cv_trial_deploys_its_fold_heads_averaged():
    """The final model's candidate for a cross-validated checkpoint: its K fold heads (averaged) and the
    out-of-fold logits of that epoch, on which the choice is made."""
    from tune_rice.heads import final

    bank = synthetic_bank(n_train=40, n_valid=20, d=16)
    folds = (np.arange(60) // 3) % 3
    cfg = TrialConfig(hidden=8, epochs=2, batch_size=8)
    run = CVHeadRun(cfg, bank=bank, folds=folds, device="cpu")
    run.step()
    state = {**run.state_dict(), "best": 0.5}
    cand = final.candidate_from_state("t", state, cfg, score=0.5)
    assert len(cand.heads) == 3
    np.testing.assert_allclose(cand.oof_logits, run.out_of_fold_logits().numpy(), atol=1e-6)
    x = torch.from_numpy(bank.splits["valid"].features[:, 0].astype(np.float32))
    with torch.inference_mode():
        expected = torch.stack([run.fold_head(f)(x) for f in range(3)]).mean(0).double().numpy()
    np.testing.assert_allclose(final.head_valid_logits(cand.heads, bank), expected, atol=1e-5)
