"""Last-stage tuning: the stage bank against the frozen prefix, gradients that reach only the stage, the
memory check, the spaces, and a tuned stage's artifact through predict and both exports."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_separable_dataset
from torch.utils.data import DataLoader

from tune_rice import UserError
from tune_rice.data.images import build_transform, load_image, read_labels, to_model_input
from tune_rice.experiment.space import load_search_space
from tune_rice.features.bank import check_stage_memory, extract_bank, pass_dataset, stage_bank_bytes
from tune_rice.features.model import build_backbone, load_artifact, read_torchscript, save_artifact
from tune_rice.features.stage import StagePrefix, StageTail, stage_shape
from tune_rice.heads import final
from tune_rice.heads.engine import TrialConfig
from tune_rice.heads.finetune import StageRun, stage_valid_logits
from tune_rice.tools import evaluate, export, predict

CFG = dict(backbone="resnet18", image_size=32, views=2, aug_policy="standard", hidden=0, lr=1e-2, epochs=2, seed=0)


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    return make_separable_dataset(tmp_path_factory.mktemp("finetune") / "data", per_class=12, size=32)


@pytest.fixture(scope="module")
def banks(labels, tmp_path_factory):
    cache = tmp_path_factory.mktemp("bank_cache")
    cfg = TrialConfig(**CFG, tune_last_stage=True)
    kw = dict(weights="none", cache_dir=cache, device="cpu", num_workers=0, progress=False)
    stage = extract_bank(labels, cfg.feature_spec(), **kw)
    pooled = extract_bank(labels, TrialConfig(**CFG).feature_spec(), **kw)
    return stage, pooled, cache


def test_the_stage_bank_is_the_frozen_prefix_output_and_the_stage_gives_the_pooled_bank(labels, banks):
    stage, pooled, cache = banks
    assert stage.key != pooled.key and stage.spec.feature_layer == "stage"
    c, h, w = stage_shape("resnet18", 32)
    assert stage.info["stage_shape"] == [c, h, w] == [256, 2, 2]
    assert (
        stage.splits["train"].features.shape == (18, 2, c * h * w)
        and stage.splits["train"].features.dtype == np.float16
    )
    # the prefix of the frozen network run here on the same decoded valid images
    table = read_labels(labels)
    x, _, _ = next(iter(DataLoader(pass_dataset(table, [stage.spec], "valid"), batch_size=64)))
    x = to_model_input(x, torch.device("cpu"), stage.spec.preprocessing).contiguous(memory_format=torch.channels_last)
    backbone, _ = build_backbone("resnet18", weights="none")
    with torch.no_grad():
        prefix = StagePrefix(copy.deepcopy(backbone))(x).numpy()  # (9, C*H*W)
        pooled_here = backbone(x).numpy()
    rows = stage.splits["valid"].features[:, 0].astype(np.float32)
    np.testing.assert_allclose(rows, prefix, rtol=2**-10, atol=2**-10 * np.abs(prefix).max())
    # the pretrained stage the bank carries, on the bank's rows, gives the frozen backbone's pooled features
    tail = StageTail(backbone.net)
    tail.load_state_dict(stage.stage)
    with torch.no_grad():
        got = tail.eval()(torch.from_numpy(rows).reshape(-1, c, h, w)).numpy()
    scale = np.abs(pooled_here).max()
    np.testing.assert_allclose(got, pooled_here, atol=1e-2 * scale)
    np.testing.assert_allclose(pooled.splits["valid"].features[:, 0].astype(np.float32), pooled_here, atol=1e-3 * scale)
    # read back from the cache: the same rows and the same stage
    again = extract_bank(labels, stage.spec, weights="none", cache_dir=cache, device="cpu", progress=False)
    assert again.from_cache and np.array_equal(again.splits["valid"].features, stage.splits["valid"].features)
    assert all(torch.equal(again.stage[k], v) for k, v in stage.stage.items())


@pytest.mark.parametrize("bn", ["frozen", "update"])
def test_a_step_moves_the_stage_and_head_only(labels, bn):
    """The inline path, where the prefix is in the graph: its weights stay bit-equal and get no gradient."""
    run = StageRun(TrialConfig(**CFG, tune_last_stage=True, stage_bn=bn), table=read_labels(labels), device="cpu")
    prefix = run.model.prefix
    before = {k: v.clone() for k, v in prefix.net.state_dict().items()}
    stage_before = {k: v.clone() for k, v in run.tail.state_dict().items()}
    head_before = run.head.net[-1].weight.clone()
    run.train_epoch()
    after = prefix.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the frozen prefix changed"
    assert all(p.grad is None for p in prefix.net.parameters())
    stage_after = run.tail.state_dict()
    moved = [k for k in stage_before if not torch.equal(stage_before[k], stage_after[k])]
    assert any(k.endswith("conv1.weight") for k in moved)
    stats = [k for k in stage_before if k.endswith(("running_mean", "running_var"))]
    assert stats and (set(stats) & set(moved) == set() if bn == "frozen" else set(stats) <= set(moved))
    assert not torch.equal(head_before, run.head.net[-1].weight)


def test_decay_towards_the_pretrained_stage_or_to_zero(banks):
    """With no gradient to follow (lr on the head only matters for the head), the decoupled pull moves the
    stage towards its pretrained weights: a perturbed weight shrinks its distance by lr*wd per step."""
    stage, _, _ = banks
    cfg = TrialConfig(
        **{**CFG, "lr": 0.1}, tune_last_stage=True, weight_decay=0.5, stage_lr_fraction=1.0, schedule="constant"
    )
    run = StageRun(cfg, bank=stage, device="cpu")
    p = next(run.tail.parameters())
    p0 = run.anchor[0].clone()
    with torch.no_grad():
        p.add_(1.0)
    run._pull_to_pretrained(run.optimizer, (), {})
    assert torch.allclose(p - p0, torch.full_like(p, 1.0 - 0.1 * 0.5))
    plain = StageRun(
        TrialConfig(**CFG, tune_last_stage=True, stage_decay="zero", weight_decay=0.5), bank=stage, device="cpu"
    )
    assert plain.optimizer.param_groups[1]["weight_decay"] == 0.5 and not hasattr(plain, "anchor")
    assert plain.optimizer.param_groups[1]["lr"] == pytest.approx(CFG["lr"] * 0.1)


def test_stage_memory_is_stated_and_checked(labels, banks):
    stage, _, _ = banks
    table = read_labels(labels)
    need = stage_bank_bytes(table, stage.spec, ("train", "valid"))
    assert need == (18 * 2 + 9) * 256 * 2 * 2 * 2 == sum(s.features.nbytes for s in stage.splits.values())
    check_stage_memory(table, [stage.spec], ("train", "valid"), free=4 * need)
    with pytest.raises(UserError, match="stage banks need .* GB .*resnet18 at 32 px: 2 KB per image and view"):
        check_stage_memory(table, [stage.spec], ("train", "valid"), free=need)


def test_spaces_and_families(tmp_path):
    fine = load_search_space("finetune")
    layers = sorted(s.feature_layer for s in fine.feature_specs())
    assert layers == ["pooled", "stage"] and fine.distributions["tune_last_stage"][1] == [False, True]
    quick = load_search_space("quick")
    assert quick.constants["tune_last_stage"] is False
    assert [s.feature_layer for s in quick.feature_specs()] == ["pooled"]
    bad = tmp_path / "s.yaml"
    bad.write_text(
        "params:\n  backbone: mobilenet_v3_small\n  tune_last_stage: true\n  lr: {loguniform: [0.001, 0.01]}\n"
    )
    with pytest.raises(UserError, match=r"s.yaml: backbone mobilenet_v3_small: last-stage tuning supports torchvision"):
        load_search_space(bad)
    bad.write_text(
        "params:\n  head: {choice: [pooled, seed]}\n  tune_last_stage: {choice: [false, true]}\n  lr: 0.01\n"
    )
    with pytest.raises(UserError, match="takes head: pooled"):
        load_search_space(bad)


def test_a_tuned_stage_artifact_round_trips_through_predict_and_both_exports(labels, banks, tmp_path, capsys):
    stage, _, _ = banks
    cfg = TrialConfig(**CFG, tune_last_stage=True, stage_lr_fraction=1.0)
    run = StageRun(cfg, bank=stage, device="cpu")
    for _ in range(cfg.epochs):
        run.step()
    state = run.state_dict()
    candidate = final.candidate_from_state("t1", state, cfg)
    _, resolved = build_backbone("resnet18", weights="none")
    model, weights, _ = final._assemble([candidate], ["t1"], [1.0], 1.0, {"resnet18": resolved})
    # the deployed backbone: the frozen one with the tuned layer4, nothing else changed
    frozen, tuned = build_backbone("resnet18", weights="none")[0].net.state_dict(), model.backbone.net.state_dict()
    changed = {k.split(".")[0] for k in frozen if not torch.equal(frozen[k], tuned[k])}
    assert changed == {"layer4"} and weights[0].identity == "random:seed=0+stage:t1"
    path = save_artifact(
        tmp_path / "best" / "model.pt",
        model,
        classes=stage.classes,
        preprocessing=stage.spec.preprocessing.to_dict(),
        weights=weights,
        config=cfg.to_dict(),
    )
    loaded, meta = load_artifact(path)
    assert meta["weights"] == "random:seed=0+stage:t1"
    table = read_labels(labels)
    tf = build_transform(meta["preprocessing"]["image_size"], train=False)
    x = torch.stack([tf(load_image(p)) for p in table.paths("valid")])
    with torch.no_grad():
        logits = loaded(x)
    # the artifact on the images agrees with the trial's own valid logits on the stage bank (float16 rows)
    bank_logits = stage_valid_logits(candidate.heads, state["stage"], stage)
    assert (logits.argmax(1).numpy() == bank_logits.argmax(1)).mean() >= 8 / 9
    np.testing.assert_allclose(logits.numpy(), bank_logits, atol=0.05 * np.abs(bank_logits).max())
    # evaluate on valid gives the accuracy of those logits
    ev = tmp_path / "ev.json"
    args = ["--model", str(path), "--data", str(labels.parent), "--split", "valid", "--out", str(ev)]
    assert evaluate.main([*args, "--num-workers", "0"]) == 0
    y = table.targets("valid")
    assert json.loads(ev.read_text())["accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == y).mean()))
    # predict, TorchScript and ONNX (export checks each file against the artifact before it keeps it)
    out = tmp_path / "pred.csv"
    assert predict.main(["--model", str(path), str(labels.parent / "beta"), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 12
    for fmt, name in (("torchscript", "m.ts"), ("onnx", "m.onnx")):
        assert export.main(["--model", str(path), "--format", fmt, "--out", str(tmp_path / name)]) == 0
    assert json.loads((tmp_path / "m.onnx.json").read_text())["weights"] == "random:seed=0+stage:t1"
    scripted, info = read_torchscript(tmp_path / "m.ts")
    assert info["weights"] == "random:seed=0+stage:t1"
    with torch.no_grad():
        assert torch.allclose(scripted(x), logits, atol=export.ATOL, rtol=export.RTOL)
    capsys.readouterr()


def test_a_stage_bank_from_shards_is_the_whole_pass(labels, banks):
    """The sharded extraction (shards.py runs these as Ray tasks over the GPUs) assembles the same stage bank
    (at another batch size: equal to float16 rounding) and the same pretrained stage."""
    from tune_rice.features.bank import assemble_pass, extract_pass_shard, plan_banks, shard_align
    from tune_rice.search.shards import plan_shards

    stage, _, _ = banks
    table = read_labels(labels)
    plan = plan_banks(table, [stage.spec], weights="none", use_cache=False)
    (group,) = plan.todo.values()
    parts = {
        split: [
            extract_pass_shard(table, group, plan.resolved, split, a, b, device="cpu", batch_size=4)
            for a, b in plan_shards(len(table.split(split)), shard_align(group[0], split, 4), 3)
        ]
        for split in ("train", "valid")
    }
    (got,) = assemble_pass(table, group, plan.resolved, plan.keys, parts, 0.0, "cpu")
    assert got.key == stage.key and got.info["stage_shape"] == stage.info["stage_shape"]
    for split in ("train", "valid"):
        assert len(parts[split]) >= 2
        np.testing.assert_allclose(got.splits[split].features, stage.splits[split].features, rtol=2**-10, atol=1e-3)
    assert all(torch.equal(got.stage[k], v) for k, v in stage.stage.items())
