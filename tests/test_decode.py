"""The sized decode: JPEGs decoded at the draft scale their views need, one resize to a working size, and
every image-reading path going through it (data.decode_for); loader sizing and device normalisation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

from tune_rice import devices
from tune_rice.data import images as data
from tune_rice.data.images import FULL_DECODE, Decode, Preprocessing, build_transform, decode_for, view_short_side
from tune_rice.features import bank as features
from tune_rice.search import shards

pytest_plugins = ["helpers_artifacts"]

W, H = 1200, 900  # photo-like enough for the draft logic; 12 MP would make the suite slow


def _photo(path, size=(W, H), seed=0, fmt=None):
    """A photo-like JPEG: a smooth random scene upscaled, plus sensor noise (not a smooth upscale alone)."""
    rng = np.random.default_rng(seed)
    scene = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noise = rng.normal(0, 5, size=(size[1], size[0], 3))
    Image.fromarray(np.clip(np.asarray(scene) + noise, 0, 255).astype(np.uint8)).save(path, format=fmt, quality=90)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """labels.csv of six 1200x900 JPEG photos in two classes (train 4, valid 2)."""
    root = tmp_path_factory.mktemp("photos")
    rows = []
    for i in range(6):
        label = "ab"[i % 2]
        (root / label).mkdir(exist_ok=True)
        _photo(root / label / f"{i}.jpg", seed=i)
        rows.append({"path": f"{label}/{i}.jpg", "label": label, "split": "train" if i < 4 else "valid", "group": i})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


# ------------------------------------------------------------------------------ the decode per preprocessing
QUICK = Preprocessing.for_size(128)  # the quick space: resnet18 at 128 px (resize 146)
DEFAULT = Preprocessing.for_size(224)  # resize 256
ZOO = Preprocessing(crop=240, resize=274, interpolation="bicubic")  # a zoo model's own transforms


@pytest.mark.parametrize(
    "pre, policy, short, decoded, working",
    [
        # short side needed; the 1200x900 JPEG decoded at its draft scale; then resized to the working size
        (QUICK, None, 146, (300, 225), (194, 146)),  # eval: resize 146; 900 // 146 = 6 -> 1/4
        (QUICK, "none", 146, (300, 225), (194, 146)),
        (QUICK, "light", 177, (300, 225), (236, 177)),  # 128 / sqrt(0.7 * 3/4) = 176.7
        (QUICK, "standard", 210, (300, 225), (280, 210)),  # 128 / sqrt(0.5 * 3/4) = 209.0
        (QUICK, "strong", 270, (600, 450), (360, 270)),  # 128 / sqrt(0.3 * 3/4) = 269.9; 900 // 270 = 3 -> 1/2
        (DEFAULT, None, 256, (600, 450), (341, 256)),
        (DEFAULT, "standard", 366, (600, 450), (488, 366)),  # 224 / sqrt(0.375) = 365.8
        (DEFAULT, "strong", 473, (1200, 900), (630, 473)),  # 900 // 473 = 1: no draft scaling
        (ZOO, None, 274, (600, 450), (365, 274)),
        (ZOO, "standard", 392, (600, 450), (522, 392)),
    ],
)
def test_the_draft_scale_chosen_for_each_preprocessing(photos, pre, policy, short, decoded, working):
    path = photos.parent / "a" / "0.jpg"
    decode = decode_for(pre, policy)
    assert decode == Decode(short, pre.interpolation) and view_short_side(pre, policy) == short
    assert build_transform(pre, train=policy is not None, policy=policy or "standard").decode == decode
    draft = decode.open(path)
    assert draft.size == decoded and min(draft.size) >= short
    assert decode(path).size == working
    assert FULL_DECODE(path).size == (W, H)


def test_other_formats_take_the_plain_path_then_the_working_resize(tmp_path):
    decode = decode_for(QUICK, "standard")
    for fmt in ("PNG", "TIFF", "WEBP"):
        path = _photo(tmp_path / f"p.{fmt.lower()}", fmt=fmt)
        assert decode.open(path).size == (W, H)  # no draft scaling outside JPEG
        assert decode(path).size == (280, 210)


def test_small_images_are_never_upscaled(tmp_path):
    path = _photo(tmp_path / "small.jpg", size=(256, 192))
    assert decode_for(DEFAULT, "standard")(path).size == (256, 192)
    assert decode_for(QUICK)(path).size == (194, 146)  # down to the eval resize, as T.Resize(146) would


@pytest.mark.parametrize("policy", ["light", "standard", "strong"])
@pytest.mark.parametrize("pre", [QUICK, DEFAULT, ZOO])
@pytest.mark.parametrize("size", [(1200, 900), (900, 1200), (1600, 600), (4000, 3000)])
def test_an_augmented_view_never_gets_fewer_source_pixels_than_it_needs(pre, policy, size):
    """Every RandomResizedCrop of the working image keeps >= crop px on its short side (the view then only
    downscales), as a crop of the full-size image of the same area share would."""
    decode = decode_for(pre, policy)
    w, h = size
    scale = min(8, min(w, h) // decode.size)  # the JPEG draft: the largest power of two that keeps the size
    scale = 1 << (scale.bit_length() - 1) if scale >= 1 else 1
    dw, dh = math.ceil(w / scale), math.ceil(h / scale)
    assert min(dw, dh) >= decode.size
    f = decode.size / min(dw, dh)  # the working resize
    ww, wh = (round(dw * f), round(dh * f)) if f < 1 else (dw, dh)
    image = torch.empty(3, wh, ww)
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=gen)))
        for _ in range(400):
            _, _, ch, cw = torchvision.transforms.RandomResizedCrop.get_params(
                image, scale=list(data.CROP_SCALE[policy]), ratio=list(data.CROP_RATIO)
            )
            assert min(ch, cw) >= pre.crop, (ch, cw, ww, wh)
    # and the evaluation view: the short side is at least the resize before the centre crop
    assert min(ww, wh) >= pre.resize


def test_view0_of_a_training_item_is_the_evaluation_view(photos):
    """View 0 is cut from the decoded image before the working resize: with the same draft scale (here
    1/4 for both), the bank's un-augmented view is the evaluation path's, pixel for pixel."""
    table = data.read_labels(photos)
    eval_tf = build_transform(QUICK, normalize=False)
    train_tf = build_transform(QUICK, train=True, policy="standard", normalize=False)
    views = data.dataset_for_split(table, "train", train_tf, views=3, first_transform=eval_tf, seed=0)
    plain = data.dataset_for_split(table, "train", eval_tf)
    assert views.decode == decode_for(QUICK, "standard") and plain.decode == decode_for(QUICK)
    for i in range(len(plain)):
        x, _, _ = views[i]
        assert x.shape == (3, 3, 128, 128) and x.dtype == torch.uint8
        assert torch.equal(x[0], plain[i][0])


# --------------------------------------------------------------------------- every reading path, spied
@pytest.fixture
def spy(monkeypatch):
    """Every file decode (data.load_image, which Decode.open calls) as (file name, draft_size)."""
    calls: list[tuple[str, int | None]] = []
    real = data.load_image

    def spying(path, *, draft_size=None):
        calls.append((str(path), draft_size))
        return real(path, draft_size=draft_size)

    monkeypatch.setattr(data, "load_image", spying)
    return calls


def _drafts(calls):
    return {d for _, d in calls}


def test_extraction_passes_use_the_sized_decode(photos, spy):
    table = data.read_labels(photos)
    spec = features.FeatureSpec(backbone="resnet18", image_size=64, views=2, policy="standard")
    resolved = {spec: features.resolve_weights("resnet18", "none", seed=0)}
    for split in ("train", "valid"):
        n = len(table.split(split))
        out = features.extract_pass_shard(table, [spec], resolved, split, 0, n, device="cpu", num_workers=0)
        assert next(iter(out.values())).shape[:2] == (n, 2 if split == "train" else 1)
    pre = spec.preprocessing
    assert [d for _, d in spy] == [decode_for(pre, "standard").size] * 4 + [decode_for(pre).size] * 2


def test_the_inline_path_uses_the_sized_decode(photos, spy):
    from tune_rice.heads.engine import HeadRun, TrialConfig

    cfg = TrialConfig(backbone="resnet18", image_size=64, views=1, aug_policy="standard", batch_size=4, epochs=1)
    run = HeadRun(cfg, table=data.read_labels(photos), weights="none", device="cpu", num_workers=0)
    run.step()
    pre = cfg.feature_spec().preprocessing
    # statistics over train (eval view), one epoch of train (augmented), then valid (eval view)
    assert [d for _, d in spy] == [decode_for(pre).size] * 4 + [decode_for(pre, "standard").size] * 4 + [
        decode_for(pre).size
    ] * 2


def test_evaluate_and_the_test_pass_use_the_sized_decode(photos, spy):
    from tune_rice.features.model import build_backbone
    from tune_rice.heads.engine import split_logits

    backbone, _ = build_backbone("resnet18", weights="none", seed=0)
    z, y = split_logits(backbone, data.read_labels(photos), "valid", 64, "cpu", num_workers=0)
    assert z.shape == (2, 512) and len(y) == 2
    assert _drafts(spy) == {decode_for(64).size} and len(spy) == 2  # final.score_final reads the test split so


def test_predict_and_explain_use_the_sized_decode(tiny_model, photos, spy, tmp_path):
    from tune_rice.features.model import load_model
    from tune_rice.tools.explain import explain_files
    from tune_rice.tools.predict import predict_files
    from tune_rice.tools.report_gallery import build_gallery

    loaded = load_model(tiny_model.model_path)
    want = decode_for(Preprocessing.from_dict(loaded.preprocessing)).size
    files = sorted(photos.parent.glob("*/*.jpg"))
    pred = predict_files(loaded, files, batch_size=4, progress=False)
    assert (pred.table["error"] == "").all()
    explain_files(loaded, files[:1], tmp_path / "maps", progress=False)
    build_gallery(loaded, data.read_labels(tiny_model.labels_csv), n_mistakes=1, per_class=1)
    assert _drafts(spy) == {want} and len(spy) >= len(files) + 1


def test_prepare_decodes_at_a_draft_scale(photos, spy):
    from tune_rice.data.prepare import inspect_image

    info = inspect_image(photos.parent / "a" / "0.jpg")
    assert (info.width, info.height) == (W, H)  # the full size is still reported
    assert _drafts(spy) == {128}


# ------------------------------------------------------------------------------- how far features move
@torch.inference_mode()
def test_features_move_little_against_the_full_size_path(photos):
    """Pooled features of the evaluation view (resnet18 at 128 px, random init) on the same 1200x900 photos:
    sized decode against the full-size decode. Measured: cosine 0.999998 (0.9996-0.9998 once the mean
    feature is taken out, since random-init pooled features share a large positive mean), each photo's
    sized features nearest to its own full-size ones. BENCHMARKS.md section 10: the same at 2 and 12 MP."""
    from tune_rice.features.model import build_backbone

    table = data.read_labels(photos)
    backbone, _ = build_backbone("resnet18", weights="none", seed=0)
    tf = build_transform(QUICK)
    paths = table.paths("train") + table.paths("valid")
    sized = backbone(torch.stack([tf(tf.decode(p)) for p in paths])).double()
    full = backbone(torch.stack([tf(FULL_DECODE(p)) for p in paths])).double()
    raw = torch.nn.functional.cosine_similarity(sized, full)
    mean = full.mean(0)
    centred = torch.nn.functional.cosine_similarity(sized - mean, full - mean)
    assert raw.min() > 0.9999, raw
    assert centred.min() > 0.995, centred
    assert torch.equal(torch.cdist(sized, full).argmin(1), torch.arange(len(paths)))


# ------------------------------------------------------------------------------------------ cache keys
def test_the_decode_policy_is_in_the_bank_key(photos, monkeypatch):
    table = data.read_labels(photos)
    spec = features.FeatureSpec(backbone="resnet18", image_size=64, views=2, policy="standard")
    key = features.bank_key(table, spec, "random-init", ("train", "valid"))
    assert features.decode_policy(spec) == {
        "train": decode_for(spec.preprocessing, "standard").to_dict(),
        "eval": decode_for(spec.preprocessing).to_dict(),
    }
    monkeypatch.setattr(data, "DECODE_VERSION", data.DECODE_VERSION + 1)  # decoding changed: banks are new
    assert features.bank_key(table, spec, "random-init", ("train", "valid")) != key


# ------------------------------------------------------------------------------- loaders and the device
def test_uint8_items_normalised_on_the_device_equal_the_cpu_transform(photos):
    table = data.read_labels(photos)
    on_cpu = data.dataset_for_split(table, "train", build_transform(QUICK))
    as_uint8 = data.dataset_for_split(table, "train", build_transform(QUICK, normalize=False))
    x = next(iter(DataLoader(as_uint8, batch_size=4)))[0]
    assert x.dtype == torch.uint8
    want = torch.stack([on_cpu[i][0] for i in range(4)])
    assert torch.equal(data.to_model_input(x, "cpu", QUICK), want)
    assert data.to_model_input(want, "cpu") is want  # already normalised: only moved
    with pytest.raises(ValueError, match="preprocessing"):
        data.to_model_input(x, "cpu")


def test_loaders_pin_memory_only_for_cuda():
    assert features.loader_options("cuda", 4) == {"pin_memory": True, "persistent_workers": False, "prefetch_factor": 4}
    assert features.loader_options("cpu", 0)["pin_memory"] is False
    assert features.loader_options("cpu", 0)["prefetch_factor"] is None


@pytest.mark.parametrize(
    "device, cpus, batches, want",
    [
        ("cuda", 16, None, 15),  # a 16-core GPU node decodes on 15 processes, one feeds the GPU
        ("cuda", 64, None, devices.MAX_GPU_WORKERS),
        ("cuda", 16, 3, 3),  # never more than there are batches
        ("cuda", 1, None, 0),  # one CPU: decode in the process itself
        ("cpu", 2, None, 1),  # the forward needs the cores too: as before
        ("cpu", 16, None, 8),
        ("cpu", 1, None, 0),
    ],
)
def test_loader_workers_follow_the_cpus_a_node_or_task_has(device, cpus, batches, want):
    assert devices.loader_workers(device, cpus=cpus, batches=batches) == want


def test_loader_workers_default_to_the_affinity_mask_outside_ray(monkeypatch):
    monkeypatch.setattr(devices, "usable_cpus", lambda: 6)
    assert devices.assigned_cpus() == 6
    assert devices.loader_workers("cuda") == 5


def test_shard_tasks_ask_for_the_cpus_they_decode_on():
    def node(cpu, gpu, alive=True):
        return {"Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}

    assert shards.shard_cpus([node(16, 1)]) == 15  # 14 decoding workers and the process feeding the GPU
    assert shards.shard_cpus([node(96, 8), node(16, 1)]) == 11  # the smallest share: every GPU can be used
    assert shards.shard_cpus([node(2, 0), node(16, 1), node(4, 1, alive=False)]) == 15
    assert shards.shard_cpus([node(2, 1)]) == 2 and shards.shard_cpus([node(1, 1)]) == 1  # never above a node's
    assert shards.shard_cpus([node(8, 0)]) == 1.0  # no GPU node
