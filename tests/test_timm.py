"""timm as a second backbone provider, and the EfficientNet-Lite0 ImageNet weights mapped onto timm's
``tf_efficientnet_lite0`` (the real pretrained features this machine can have without a download)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from tune_rice import UserError, cli
from tune_rice.features import backbones, model, timm_zoo
from tune_rice.features import bank as features

timm = pytest.importorskip("timm")


def test_without_timm_a_timm_backbone_is_one_line_saying_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(UserError, match=r"backbone timm:not_parsed_yet needs timm.*pip install 'tune-rice\[timm\]'"):
        backbones.validate("timm:not_parsed_yet")


# ------------------------------------------------------------------------ EfficientNet-Lite0 weights
def test_the_lite0_file_gives_the_logits_of_the_packages_own_model(tmp_path, capsys):
    """The mapped file in timm's network and the package's file in the package's network (the reference
    implementation it was made for) give the same ImageNet logits, to float32 rounding."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    out = tmp_path / "lite0.pth"
    assert cli.main(["backbones", "--write-lite0", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    ref = lite.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(model.safe_torch_load(timm_zoo.lite0_package_file()))
    ref.eval()
    resolved = model.resolve_weights(timm_zoo.LITE0_VALUE, str(out))
    assert resolved.pretrained and resolved.identity.startswith("file:lite0.pth:")
    ours, _ = model.build_backbone(timm_zoo.LITE0_VALUE, weights=resolved, feature_layer="logits")
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))  # (B, 3, 224, 224)
    with torch.no_grad():
        want, got = ref(x), ours(x)
    assert got.shape == (4, 1000)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # and they are ImageNet features, not noise: a wrong mapping would not keep the classes apart
    assert want.std() > 1.0


def test_mapping_in_order_refuses_tensors_that_do_not_pair():
    a = {"x.weight": torch.zeros(3, 2), "bn.num_batches_tracked": torch.tensor(5), "y": torch.ones(4)}
    b = {"p": torch.empty(3, 2), "q": torch.empty(4), "bn2.num_batches_tracked": torch.tensor(0)}
    mapped = timm_zoo.map_in_order(a, b)
    assert list(mapped) == ["p", "q", "bn2.num_batches_tracked"] and torch.equal(mapped["q"], torch.ones(4))
    with pytest.raises(ValueError, match=r"y \(4,\) does not map onto q \(5,\)"):
        timm_zoo.map_in_order(a, {"p": torch.empty(3, 2), "q": torch.empty(5)})
    with pytest.raises(ValueError, match="2 tensors to map onto 1"):
        timm_zoo.map_in_order(a, {"p": torch.empty(3, 2)})


# ----------------------------------------------------------------------------- the backbone, per family
# timm's test models (a few hundred kilobytes each), random init, at 48 px: one per kind of network.
TEST_MODELS = ("timm:test_resnet", "timm:test_efficientnet", "timm:test_vit", "timm:test_convnext")


def _reference(value: str, *, num_classes: int | None = None) -> torch.nn.Module:
    """timm's own network of ``value`` (random init from seed 0), as a user of timm would build it."""
    torch.manual_seed(0)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(value.removeprefix("timm:"), pretrained=False, **kwargs).eval()


@pytest.mark.parametrize("value", TEST_MODELS)
def test_pooled_features_are_timms_own_and_the_logits_come_from_one_pass(value):
    """The pooled backbone gives what timm's ``num_classes=0`` network gives, the logits backbone timm's
    logits, and one pass of the logits backbone yields both (what the feature bank extracts)."""
    full = _reference(value)
    state = {k: v.clone() for k, v in full.state_dict().items()}
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))  # (B, 3, S, S)
    resolved = model.ResolvedWeights(state, "file:x", True)
    pooled, _ = model.build_backbone(value, weights=resolved, feature_layer="pooled")
    logits, _ = model.build_backbone(value, weights=resolved, feature_layer="logits")
    headless = _reference(value, num_classes=0)
    headless.load_state_dict({k: v for k, v in state.items() if k in headless.state_dict()})
    with torch.no_grad():
        assert torch.equal(pooled(x), headless(x)) and pooled.out_dim == backbones.feature_dim(value)
        assert torch.equal(logits(x), full(x)) and logits.out_dim == 1000
        both = features._forward_layers(logits, x, ("logits", "pooled"))
        assert torch.equal(both["logits"], full(x)) and torch.allclose(both["pooled"], headless(x), atol=1e-6)
    # an unknown name or tag is one line with the close names
    with pytest.raises(UserError, match=r"not a timm model \(did you mean timm:test_resnet"):
        backbones.validate("timm:test_resnett")
    with pytest.raises(UserError, match="has no weights 'nope'; valid: r160_in1k"):
        backbones.validate("timm:test_resnet.nope")


def test_preprocessing_size_and_cost_come_from_timm():
    pre = backbones.preprocessing_for("timm:tf_efficientnet_lite0")
    assert (pre.crop, pre.resize, pre.interpolation, pre.mean, pre.std) == (224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
    assert backbones.preprocessing_for("timm:test_vit", 48).resize == int(48 * 168 / 160)
    # DINOv2's weights are for 518 px; built with dynamic_img_size it takes 224 (a multiple of its patch)
    assert backbones.preprocessing_for("timm:vit_small_patch14_dinov2.lvd142m").crop == 518
    assert backbones.preprocessing_for("timm:vit_small_patch14_dinov2.lvd142m", 224).crop == 224
    with pytest.raises(UserError, match="cannot take 64 px images"):
        backbones.preprocessing_for("timm:vit_small_patch14_dinov2.lvd142m", 64)
    # measured multiply-adds: a 3x3 conv at full resolution is easy to count by hand for the ResNet stem
    lite0 = backbones.gflops_at("timm:tf_efficientnet_lite0")
    assert 0.35 < lite0 < 0.42  # EfficientNet-Lite0's published 0.4 G multiply-adds (TF's figure: 407 M)
    assert backbones.gflops_at("timm:tf_efficientnet_lite0", 112) == pytest.approx(lite0 / 4)


def test_frozen_timm_backbone_survives_a_training_step():
    """Bit-equal parameters and BatchNorm statistics after training steps through the full model."""
    backbone, _ = model.build_backbone("timm:test_efficientnet", weights="none", seed=0)
    head = model.build_head("pooled", in_dim=backbone.out_dim, n_classes=3, hidden=8)
    clf = model.Classifier(backbone, head)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    assert any(k.endswith("running_mean") for k in before)
    clf.train()
    assert not any(m.training for m in backbone.modules())
    opt = torch.optim.SGD([p for p in clf.parameters() if p.requires_grad], lr=1.0)
    x, y = torch.randn(6, 3, 48, 48) * 3 + 1, torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(clf(x), y).backward()
        opt.step()
    after = backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.grad is None for p in backbone.parameters())


def test_published_weights_load_from_a_preseeded_hub_cache_and_offline_misses_are_one_line(tmp_path, monkeypatch):
    """A file in the Hugging Face hub cache layout (as timm's download leaves it) is found offline; a
    missing one under ``imagenet`` is an error naming where it was looked for and how to fetch it."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    value = "timm:test_convnext"
    snap = tmp_path / "hf" / "hub" / "models--timm--test_convnext.r160_in1k"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("abc123")
    (snap / "snapshots" / "abc123").mkdir(parents=True)
    want = _reference(value)
    from safetensors.torch import save_file

    save_file(want.state_dict(), snap / "snapshots" / "abc123" / "model.safetensors")
    resolved = model.resolve_weights(value, "imagenet")
    assert resolved.identity == "hub:timm/test_convnext.r160_in1k" and resolved.pretrained
    ours, _ = model.build_backbone(value, weights=resolved, feature_layer="logits")
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x), want(x))
    with pytest.raises(UserError) as err:
        model.resolve_weights("timm:test_resnet", "imagenet")
    line = str(err.value)
    assert "\n" not in line and "models--timm--test_resnet.r160_in1k" in line and "--weights FILE" in line
    assert model.resolve_weights("timm:test_resnet", "auto").identity == "random:seed=0"  # auto: loudly random


@pytest.mark.parametrize("value", ["timm:test_efficientnet", "timm:test_vit"])
def test_the_artifact_the_exports_and_the_maps_of_a_timm_model(value, tmp_path, capsys):
    """best/model.pt of a timm backbone loads weights-only and bit-equal, exports to TorchScript and ONNX
    (each checked against the model by export itself), and explain draws its maps."""
    from PIL import Image

    from tune_rice.tools import explain, export, predict

    backbone, resolved = model.build_backbone(value, weights="none", seed=0)
    torch.manual_seed(0)
    clf = model.Classifier(backbone, model.build_head("pooled", in_dim=backbone.out_dim, n_classes=2, hidden=0))
    pre = backbones.preprocessing_for(value, 48)
    path = model.save_artifact(
        tmp_path / "model.pt", clf.eval(), classes=["a", "b"], preprocessing=pre.to_dict(), weights=resolved
    )
    payload = torch.load(path, weights_only=True)
    assert payload["backbones"][0]["timm_version"] == timm.__version__
    loaded = predict.load_model(path)
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.module(x), clf(x))
    out, diff = export.export_model(path, "torchscript")
    assert out.is_file() and diff is not None and diff <= 1e-4
    if value.endswith("vit"):
        # a ViT away from its native size resamples its position embedding in every forward (bicubic with
        # antialias), which the ONNX exporter has no operator for: a clear line, nothing written
        with pytest.raises(UserError, match="ONNX export failed: .*_upsample_bicubic2d_aa"):
            export.export_model(path, "onnx")
        assert not path.with_name("model.onnx").exists()
    else:
        out, diff = export.export_model(path, "onnx")
        assert out.is_file() and diff is not None and diff <= 1e-4
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    assert explain.main(["--model", str(path), str(photos), "--out-dir", str(tmp_path / "maps")]) == 0
    table = pd.read_csv(tmp_path / "maps" / "explain.csv", keep_default_na=False)
    assert (table["error"] == "").all() and len(table) == 2 and (tmp_path / "maps" / "p0.png").is_file()
    assert "2 of 2 images explained" in capsys.readouterr().out


def test_the_timm_table_is_offline_grouped_and_measured(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cli.main(["backbones", "--provider", "timm"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["family", "models", "e.g."] and "pretrained timm models" in text[-1]
    assert max(len(line) for line in text) < 240  # one line per family, a few examples each
    assert any(line.startswith("vision_transformer ") for line in text)
    assert cli.main(["backbones", "--provider", "timm", "--family", "test_res*", "--json"]) == 0
    rows = {r["backbone"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"timm:test_resnet.r160_in1k"}
    row = rows["timm:test_resnet.r160_in1k"]
    built, _ = model.build_backbone("timm:test_resnet", weights="none")
    assert row["feature_dim"] == built.out_dim and row["crop"] == 160 and not row["cached"]
    assert row["params_m"] == pytest.approx(
        sum(p.numel() for p in _reference("timm:test_resnet").parameters()) / 1e6, abs=0.01
    )
    assert row["gflops"] == pytest.approx(backbones.gflops_at("timm:test_resnet"))
    assert cli.main(["backbones", "--provider", "timm", "--family", "nosuchnet"]) == 2
    assert "no pretrained timm model matches" in capsys.readouterr().err
