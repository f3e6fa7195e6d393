"""export: TorchScript that reproduces the artifact's logits and that predict accepts; ONNX gated on `onnx`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tune_rice.data.images import build_transform, load_image
from tune_rice.features import model
from tune_rice.features.model import load_artifact
from tune_rice.tools import export, predict

# Shared session fixtures (tiny_model, real_search): registered once as a plugin so every module
# gets the same trained model and the same real search.
pytest_plugins = ["helpers_artifacts"]

# The stated tolerance: |exported - original| <= ATOL + RTOL * |original|, elementwise on the logits.
assert (export.ATOL, export.RTOL) == (1e-4, 1e-4)


@pytest.fixture(scope="module")
def torchscript(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model.ts"
    assert export.main(["--model", str(tiny_model.model_path), "--format", "torchscript", "--out", str(out)]) == 0
    return out


def test_torchscript_gives_the_artifacts_logits_and_carries_its_metadata(tiny_model, torchscript):
    original, meta = load_artifact(tiny_model.model_path)
    scripted, info = model.read_torchscript(torchscript)
    assert info["classes"] == meta["classes"]
    assert info["preprocessing"] == meta["preprocessing"]
    assert info["weights"] == meta["weights"] == "random:seed=0"
    assert info["config"]["backbone"] == "resnet18"
    size = meta["preprocessing"]["image_size"]
    tf = build_transform(size, train=False)
    images = torch.stack([tf(load_image(p)) for p in sorted(tiny_model.root.glob("*/*.png"))[:7]])  # (7, 3, S, S)
    noise = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for x in (images, noise):
            ref, got = original(x), scripted(x)
            assert got.shape == ref.shape == (len(x), len(meta["classes"]))
            assert torch.allclose(got, ref, rtol=export.RTOL, atol=export.ATOL), float((got - ref).abs().max())


def test_predict_accepts_the_torchscript_file_and_agrees(tiny_model, torchscript, tmp_path, capsys):
    a, b = tmp_path / "pt.csv", tmp_path / "ts.csv"
    folder = tiny_model.root / "beta"
    assert predict.main(["--model", str(tiny_model.model_path), str(folder), "--out", str(a)]) == 0
    assert predict.main(["--model", str(torchscript), str(folder), "--out", str(b)]) == 0
    capsys.readouterr()
    pa, pb = pd.read_csv(a), pd.read_csv(b)
    assert len(pa) == 12
    assert (pa["label"] == pb["label"]).all() and (pa["top3_label"] == pb["top3_label"]).all()
    assert (pa["score"] - pb["score"]).abs().max() < 1e-5
    loaded = model.load_model(torchscript)
    assert loaded.kind == "torchscript" and loaded.classes == ["alpha", "beta", "gamma"]


def test_existing_output_needs_force(tiny_model, torchscript, capsys):
    before = torchscript.stat().st_mtime_ns
    args = ["--model", str(tiny_model.model_path), "--out", str(torchscript)]
    assert export.main(args) == 2
    assert "already exists" in capsys.readouterr().err and torchscript.stat().st_mtime_ns == before
    assert export.main(args + ["--force"]) == 0
    assert "max difference" in capsys.readouterr().out
    assert model.load_model(torchscript).kind == "torchscript"  # the replaced file is whole


def test_default_out_is_next_to_the_model(tiny_model, tmp_path):
    assert export.default_out(tiny_model.model_path, "torchscript") == tiny_model.model_path.with_name("model.ts")
    assert export.default_out(tiny_model.model_path, "onnx") == tiny_model.model_path.with_name("model.onnx")


def test_exporting_a_torchscript_file_or_a_non_model_is_a_user_error(torchscript, tmp_path, capsys):
    assert export.main(["--model", str(torchscript), "--out", str(tmp_path / "again.ts")]) == 2
    assert "already a TorchScript export" in capsys.readouterr().err
    (tmp_path / "notes.pt").write_text("hello")
    assert export.main(["--model", str(tmp_path / "notes.pt")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "notes.ts").exists() and not (tmp_path / "again.ts").exists()


def test_onnx_without_onnx_installed_says_how_to_get_it(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "installed", lambda module: False)
    rc = export.main(["--model", str(tiny_model.model_path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert rc == 2
    assert "pip install tune-rice[onnx]" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


needs_onnx = pytest.mark.skipif(
    not (export.installed("onnx") and export.installed("onnxruntime")),
    reason="needs onnx and onnxruntime (the test extra installs both)",
)


@needs_onnx
def test_onnx_export_matches_and_writes_its_metadata(tiny_model, tmp_path, capsys):
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    assert export.main(["--model", str(tiny_model.model_path), "--format", "onnx", "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "m.onnx.json").read_text())
    assert meta["classes"] == ["alpha", "beta", "gamma"] and meta["export_format"] == "onnx"
    assert "max difference" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]  # no temporary left

    # What a user of the file does: real images, preprocessed as the metadata says, any batch size.
    original, art_meta = load_artifact(tiny_model.model_path)
    assert meta["preprocessing"] == art_meta["preprocessing"]
    tf = build_transform(meta["preprocessing"]["image_size"], train=False)
    images = torch.stack([tf(load_image(p)) for p in sorted(tiny_model.root.glob("*/*.png"))[:5]])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    (got,) = session.run(["logits"], {"image": images.numpy()})
    with torch.no_grad():
        want = original.eval()(images)
    assert got.shape == (5, 3)
    assert torch.allclose(torch.from_numpy(got), want, atol=export.ATOL, rtol=export.RTOL)


@needs_onnx
def test_onnx_without_onnxruntime_is_written_but_says_it_was_not_checked(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "installed", lambda module: module != "onnxruntime")
    out = tmp_path / "m.onnx"
    assert export.main(["--model", str(tiny_model.model_path), "--format", "onnx", "--out", str(out)]) == 0
    assert out.is_file() and (tmp_path / "m.onnx.json").is_file()
    assert "not checked (onnxruntime missing)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ ensembles
@pytest.fixture(scope="module")
def ensemble_artifact(tmp_path_factory):
    """Three heads on two resnet18s (two heads share one), weights and a temperature, as the search saves."""
    from tune_rice.features.model import Classifier, build_backbone, build_ensemble, build_head, save_artifact

    members, identities = [], []
    for seed, backbone_seed in ((0, 0), (1, 0), (2, 5)):
        backbone, resolved = build_backbone("resnet18", weights="none", seed=backbone_seed)
        torch.manual_seed(seed)
        head = build_head("pooled", in_dim=backbone.out_dim, n_classes=3, hidden=16 * (seed + 1))
        head.set_standardization(torch.rand(backbone.out_dim), torch.rand(backbone.out_dim) + 0.5)
        members.append(Classifier(backbone, head).eval())
        identities.append(resolved)
    ens = build_ensemble(members, weights=[0.4, 0.4, 0.2], temperature=1.6, names=["t0", "t1", "t2"])
    assert len(ens.backbones) == 2
    out = tmp_path_factory.mktemp("ensemble") / "model.pt"
    save_artifact(
        out,
        ens,
        classes=["alpha", "beta", "gamma"],
        preprocessing={"image_size": 32},
        weights=[identities[0], identities[2]],
    )
    return out, members


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=needs_onnx)])
def test_an_ensemble_exports_as_one_graph_with_its_weights_and_temperature(ensemble_artifact, fmt, tmp_path, capsys):
    path, members = ensemble_artifact
    out = tmp_path / ("m.ts" if fmt == "torchscript" else "m.onnx")
    assert export.main(["--model", str(path), "--format", fmt, "--out", str(out)]) == 0
    assert "max difference" in capsys.readouterr().out
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():  # the direct computation: each member alone, weighted, divided by the temperature
        want = (0.4 * members[0](x) + 0.4 * members[1](x) + 0.2 * members[2](x)) / 1.6
    if fmt == "torchscript":
        module, info = model.read_torchscript(out)
        with torch.no_grad():
            got = module(x)
    else:
        import onnxruntime as ort

        info = json.loads(out.with_name(out.name + ".json").read_text())
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])
    assert torch.allclose(got, want, atol=export.ATOL, rtol=export.RTOL), float((got - want).abs().max())
    assert info["temperature"] == 1.6 and [m["name"] for m in info["members"]] == ["t0", "t1", "t2"]
    assert [m["weight"] for m in info["members"]] == [0.4, 0.4, 0.2]


# --------------------------------------------------------------------------------- raw-pixel exports
@pytest.fixture(scope="module")
def photos(tiny_model, tmp_path_factory):
    """The data set's leaves as a user's photos: JPEG and PNG, non-square, at four sizes, one JPEG large
    enough for predict's draft-scale decode (2x the model's resize on its short side)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    sources = sorted(tiny_model.root.glob("*/*_01[01].png"))  # two leaves of each class
    sizes = [((97, 61), "png"), ((150, 110), "jpg"), ((45, 80), "jpg"), ((300, 200), "png")]
    files = []
    for i, src in enumerate(sources):
        (w, h), ext = sizes[i % len(sizes)]
        out = folder / f"{src.stem}_{w}x{h}.{ext}"
        Image.open(src).convert("RGB").resize((w, h), Image.BICUBIC).save(out, quality=90)
        files.append(out)
    return files


def _calibrated_bicubic_copy(tiny_model, folder):
    """The tiny model with a temperature of 1.7 and bicubic resizing, as a timm backbone's preset has."""
    from tune_rice.features.model import save_artifact

    net, meta = load_artifact(tiny_model.model_path)
    net.temperature = 1.7
    pre = dict(meta["preprocessing"], interpolation="bicubic")
    return save_artifact(
        folder / "model.pt",
        net,
        classes=meta["classes"],
        preprocessing=pre,
        weights=meta["weights"],
        config=meta["config"],
    )


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=needs_onnx)])
def test_raw_input_export_agrees_with_predict_on_photo_files(tiny_model, photos, fmt, tmp_path, capsys):
    from tune_rice.data.images import decode_for

    # TorchScript: the tiny model (bilinear, temperature 1); ONNX: its calibrated bicubic copy.
    path = tiny_model.model_path if fmt == "torchscript" else _calibrated_bicubic_copy(tiny_model, tmp_path)
    out = tmp_path / ("raw.ts" if fmt == "torchscript" else "raw.onnx")
    assert export.main(["--model", str(path), "--format", fmt, "--raw-input", "--out", str(out)]) == 0
    assert "probabilities match predict's" in capsys.readouterr().out
    csv = tmp_path / "pred.csv"
    assert predict.main(["--model", str(path), *map(str, photos), "--out", str(csv)]) == 0
    table = pd.read_csv(csv)
    if fmt == "torchscript":
        graph, info = model.read_torchscript(out)
        run = lambda x: graph(torch.from_numpy(x.copy())).detach().numpy()  # noqa: E731
    else:
        import onnxruntime as ort

        info = json.loads(out.with_name(out.name + ".json").read_text())
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        run = lambda x: session.run(["probabilities"], {"image": x})[0]  # noqa: E731
    assert info["input"]["raw"] and info["input"]["dtype"] == "uint8" and info["output"]["name"] == "probabilities"
    if fmt == "torchscript":  # predict takes the normalised exports; this one is refused in one line
        assert predict.main(["--model", str(out), str(photos[0])]) == 2
        assert "a raw-pixel export" in capsys.readouterr().err
    classes = info["classes"]
    decode = decode_for(info["preprocessing"])  # the pixels predict sees: a large JPEG at its draft scale
    worst = 0.0
    for path_, row in zip(photos, table.itertuples()):
        pixels = np.asarray(decode.open(path_))[None]  # (1, H, W, 3) uint8
        probs = run(pixels)[0]
        assert probs.shape == (3,) and abs(float(probs.sum()) - 1) < 1e-5
        want = {getattr(row, f"top{k}_label"): getattr(row, f"top{k}_score") for k in (1, 2, 3)}
        assert classes[int(np.argmax(probs))] == row.label
        worst = max(worst, max(abs(float(p) - want[c]) for c, p in zip(classes, probs)))
    print(f"{fmt}: max |probability difference| from predict over {len(photos)} photos: {worst:.2g}")
    assert worst <= export.RAW_ATOL


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_graphs_preprocessing_gives_predicts_pixels_within_one_level(interpolation):
    from PIL import Image

    from tune_rice.data.images import Preprocessing, build_transform
    from tune_rice.data.pixels import RawPreprocess

    pre = Preprocessing(crop=32, resize=37, interpolation=interpolation)
    tf = build_transform(pre, train=False, normalize=False)  # predict's transform, on PIL images
    graph = torch.jit.script(RawPreprocess(pre))
    mean, std = torch.tensor(pre.mean).view(3, 1, 1), torch.tensor(pre.std).view(3, 1, 1)
    rng = np.random.default_rng(0)
    for h, w in ((90, 120), (120, 90), (37, 50), (41, 41), (400, 301)):  # down, equal and up to the short side
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        want = tf(tf.decode.working(Image.fromarray(pixels))).float()  # (3, S, S) 0..255
        got = (graph(torch.from_numpy(pixels)[None])[0] * std + mean) * 255  # back to 0..255
        off = (got - want).abs()
        assert float(off.max()) < 1.001 and float((off > 0.5).float().mean()) < 0.02, (h, w, float(off.max()))


def test_nearest_resizing_is_refused_for_raw_input():
    from tune_rice import UserError
    from tune_rice.data.pixels import RawPreprocess

    with pytest.raises(UserError, match="only bilinear and bicubic"):
        RawPreprocess({"image_size": 32, "interpolation": "nearest"})
