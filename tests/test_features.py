"""The feature bank against the inline reference, its views, its determinism and its cache (resnet18, 32 px)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import make_separable_dataset

import tune_rice.features.bank as features
from tune_rice.data.images import build_transform, load_image, read_labels
from tune_rice.features.bank import FeatureSpec, bank_key, extract_bank, load_bank, save_bank
from tune_rice.features.model import Classifier, FrozenBackbone, build_backbone
from tune_rice.heads.engine import HeadRun, TrialConfig, evaluate

SPEC = FeatureSpec(backbone="resnet18", image_size=32, views=3, policy="standard", seed=0)
QUICK = dict(weights="none", num_workers=0, progress=False, device="cpu")

# float16 has an 11-bit significand: a stored feature is within 2**-11 (relative) of the float32 value.
# Different batch compositions may also move float32 conv results by a few ulps on CPU.
FP16_RTOL, FP16_ATOL = 2e-3, 1e-4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_separable_dataset(tmp_path_factory.mktemp("separable") / "data")


@pytest.fixture(scope="module")
def bank(dataset):
    return extract_bank(dataset, SPEC, use_cache=False, **QUICK)


def _inline_features(table, split: str, image_size: int, *, seed: int = 0) -> torch.Tensor:
    """The reference: each image through the eval transform and the frozen backbone, float32. (N, D)"""
    backbone, _ = build_backbone("resnet18", weights="none", seed=seed)
    tf = build_transform(image_size, train=False)
    x = torch.stack([tf(load_image(p)) for p in table.paths(split)])  # (N, 3, S, S)
    with torch.no_grad():
        return backbone(x)


# ------------------------------------------------------------------------------------ bank vs inline
def test_bank_logits_match_the_inline_model(dataset, bank):
    table = read_labels(dataset)
    backbone, _ = build_backbone("resnet18", weights="none", seed=SPEC.seed)
    run = HeadRun(
        TrialConfig(
            backbone="resnet18", image_size=32, views=3, hidden=32, dropout=0.0, lr=1e-2, batch_size=8, epochs=2
        ),
        bank=bank,
        device="cpu",
    )
    run.step()  # a trained head: logits of a realistic scale, not the near-zero ones of a fresh init
    head = run.head.eval()
    model = Classifier(backbone, head).eval()
    tf = build_transform(SPEC.image_size, train=False)
    images = torch.stack([tf(load_image(p)) for p in table.paths("valid")])  # (N, 3, 32, 32)
    with torch.no_grad():
        inline = model(images)  # (N, C)
        banked = head(torch.from_numpy(bank.splits["valid"].features[:, 0]))  # (N, C) from float16 storage
    scale = float(inline.abs().max())
    diff = float((inline - banked).abs().max())
    # Measured: max |diff| 3.4e-4 to 6.8e-4 at a logit scale of 6.6 to 8.1 (resnet18, random init, 32 px,
    # CPU, three dataset seeds); the source is the float16 storage of the features (2**-11 relative).
    # Allowed: 2e-3 relative to the logit scale (>= 1), a margin of 20x or more.
    assert diff <= 2e-3 * max(1.0, scale), (diff, scale)
    assert torch.equal(inline.argmax(1), banked.argmax(1))


def test_bank_statistics_match_the_inline_run(dataset, bank):
    table = read_labels(dataset)
    cfg = TrialConfig(backbone="resnet18", image_size=32, views=3, hidden=32, dropout=0.0, epochs=1, seed=SPEC.seed)
    inline = HeadRun(cfg, table=table, weights="none", device="cpu", num_workers=0)
    banked = HeadRun(cfg, bank=bank, device="cpu")
    # The inline path computes train statistics itself; they must be the bank's (both from float16 features).
    np.testing.assert_allclose(inline.head.mean.numpy(), bank.mean, rtol=FP16_RTOL, atol=FP16_ATOL)
    np.testing.assert_allclose(inline.head.std.numpy(), banked.head.std.numpy(), rtol=FP16_RTOL, atol=FP16_ATOL)
    np.testing.assert_allclose(banked.head.mean.numpy(), bank.mean, rtol=0, atol=0)
    assert inline.weights == bank.weights == "random:seed=0"

    # The same head weights score the same on valid through both paths (engine.evaluate end to end).
    banked.head.load_state_dict(inline.head.state_dict())
    a = evaluate(inline.model, inline.valid_batches, n_classes=3)
    b = evaluate(banked.model, banked.valid_batches, n_classes=3)
    assert a["confusion"] == b["confusion"]
    assert a["loss"] == pytest.approx(b["loss"], abs=5e-3)


def test_standardised_views_stay_bounded(bank):
    """Statistics come from view 0; augmented views must not explode on dims that view 0 never moves."""
    cfg = TrialConfig(backbone="resnet18", image_size=32, views=3)
    head = HeadRun(cfg, bank=bank, device="cpu").head
    assert (bank.std == 0).any()  # dead units exist in this random-init bank: the case that matters
    z = (torch.from_numpy(bank.splits["train"].features).float() - head.mean) / head.std  # (N, K, D)
    assert float(z.abs().max()) < 100


def test_head_on_the_bank_learns_the_separable_dataset(bank):
    cfg = TrialConfig(
        backbone="resnet18", image_size=32, views=3, hidden=64, dropout=0.1, lr=3e-3, batch_size=8, epochs=4, seed=0
    )
    run = HeadRun(cfg, bank=bank, device="cpu")
    history = [run.step() for _ in range(cfg.epochs)]
    assert history[-1]["valid/acc"] > 0.95, [h["valid/acc"] for h in history]  # chance is 1/3
    assert history[-1]["train/loss"] < history[0]["train/loss"]
    assert set(history[-1]) >= {"train/loss", "valid/loss", "valid/acc", "valid/macro_f1", "valid/recall/alpha"}


# ---------------------------------------------------------------------------------------------- views
def test_views_shape_and_view0_is_the_unaugmented_image(dataset, bank):
    table = read_labels(dataset)
    train, valid = bank.splits["train"], bank.splits["valid"]
    n_train, n_valid = len(table.split("train")), len(table.split("valid"))
    assert train.features.shape == (n_train, 3, 512) and train.features.dtype == np.float16
    assert valid.features.shape == (n_valid, 1, 512)
    assert train.paths == list(table.split("train")["path"]) and np.array_equal(train.targets, table.targets("train"))
    assert bank.classes == ("alpha", "beta", "gamma") and bank.dim == 512

    reference = _inline_features(table, "train", SPEC.image_size).numpy()  # eval transform, float32
    np.testing.assert_allclose(train.features[:, 0].astype(np.float32), reference, rtol=FP16_RTOL, atol=FP16_ATOL)
    np.testing.assert_allclose(bank.mean, train.features[:, 0].astype(np.float32).mean(0), rtol=1e-6)
    for v in (1, 2):  # augmented views are other pictures of the same image
        assert all(not np.array_equal(train.features[i, v], train.features[i, 0]) for i in range(n_train))
    assert not np.array_equal(train.features[:, 1], train.features[:, 2])


def test_extraction_is_deterministic_whatever_the_workers(dataset, bank):
    spec = FeatureSpec(backbone="resnet18", image_size=32, views=3, seed=0)
    serial, parallel = (  # in this process, then in 2 DataLoader worker processes
        extract_bank(dataset, spec, splits=("train",), use_cache=False, batch_size=16, **{**QUICK, "num_workers": n})
        for n in (0, 2)
    )
    assert np.array_equal(serial.splits["train"].features, parallel.splits["train"].features)
    # Same seed, other batch size: the same augmentations (the views are a function of seed and image).
    np.testing.assert_allclose(
        serial.splits["train"].features.astype(np.float32),
        bank.splits["train"].features.astype(np.float32),
        rtol=FP16_RTOL,
        atol=FP16_ATOL,
    )


# ---------------------------------------------------------------------------------------------- cache
SMALL = FeatureSpec(backbone="resnet18", image_size=32, views=2, seed=0)


def _forbid_backbone(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the backbone was built although the bank is cached")

    monkeypatch.setattr(features, "build_backbone", boom)


def _count_backbone_builds(monkeypatch) -> list:
    calls = []
    real = features.build_backbone

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "build_backbone", counting)
    return calls


def test_banks_extracted_together_equal_banks_extracted_one_at_a_time(dataset, tmp_path, monkeypatch):
    """wide.yaml's case: several backbones and both feature layers at one image size share one decode and
    augmentation pass, and a backbone wanted for pooled features and logits runs once for both."""
    specs = [
        FeatureSpec(backbone=b, image_size=32, views=2, feature_layer=layer, seed=0)
        for b in ("resnet18", "resnet34")
        for layer in ("pooled", "logits")
    ]
    specs.append(FeatureSpec(backbone="resnet18", image_size=48, views=2, seed=0))  # another pass
    decoded, forwards = [], []
    real_load, real_forward = features.dataset_for_split, FrozenBackbone.forward

    def counting_dataset(*args, **kwargs):
        decoded.append(args[1])
        return real_load(*args, **kwargs)

    def counting_forward(self, x):
        forwards.append((self.name, self.feature_layer))
        return real_forward(self, x)

    monkeypatch.setattr(features, "dataset_for_split", counting_dataset)
    monkeypatch.setattr(FrozenBackbone, "forward", counting_forward)
    together = features.extract_banks(dataset, specs, cache_dir=tmp_path / "cache", **QUICK)
    assert list(together) == [s.name for s in specs]
    assert decoded == ["train", "valid"] * 2  # 2 passes over the images, not 5
    assert set(forwards) == {("resnet18", "logits"), ("resnet34", "logits"), ("resnet18", "pooled")}
    monkeypatch.undo()

    for spec in specs:
        alone = extract_bank(dataset, spec, use_cache=False, **QUICK)
        bank = together[spec.name]
        assert bank.spec == spec and bank.key == alone.key
        for split in ("train", "valid"):
            assert bank.splits[split].features.shape == alone.splits[split].features.shape
            assert np.array_equal(bank.splits[split].features, alone.splits[split].features), (spec.name, split)
        assert np.array_equal(bank.mean, alone.mean) and np.array_equal(bank.std, alone.std)
        # each is cached under its own key, as if extracted alone
        assert extract_bank(dataset, spec, cache_dir=tmp_path / "cache", **QUICK).from_cache
    assert together[specs[1].name].dim == 1000 and together[specs[0].name].dim == 512


def test_cache_hit_and_misses(separable, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = extract_bank(separable, SMALL, cache_dir=cache, **QUICK)
    assert not first.from_cache and (cache / first.key / "meta.json").is_file()
    assert json.loads((cache / first.key / "meta.json").read_text())["weights"] == "random:seed=0"

    with monkeypatch.context() as m:
        _forbid_backbone(m)
        hit = extract_bank(separable, SMALL, cache_dir=cache, **QUICK)
    assert hit.from_cache and hit.key == first.key and hit.spec == SMALL and hit.classes == first.classes
    for split in ("train", "valid"):
        assert np.array_equal(hit.splits[split].features, first.splits[split].features)
        assert np.array_equal(hit.splits[split].targets, first.splits[split].targets)
        assert hit.splits[split].paths == first.splits[split].paths
    assert np.array_equal(hit.mean, first.mean) and np.array_equal(hit.std, first.std)

    table = read_labels(separable)
    image = table.paths("valid")[0]
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched: same bytes, new mtime
    touched = extract_bank(separable, SMALL, cache_dir=cache, **QUICK)
    assert not touched.from_cache and touched.key != first.key

    resized = FeatureSpec(backbone="resnet18", image_size=40, views=2, seed=0)
    other = extract_bank(separable, resized, cache_dir=cache, **QUICK)
    assert not other.from_cache and other.key not in (first.key, touched.key)
    assert other.key != bank_key(table, SMALL, "random:seed=0", ("train", "valid"))
    assert bank_key(table, SMALL, "random:seed=1", ("train", "valid")) != touched.key  # weights identity counts
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_incomplete_folders_are_not_banks(separable, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    bank = extract_bank(separable, SMALL, cache_dir=cache, **QUICK)
    final = cache / bank.key

    # A crashed writer's temp folder, complete inside, is not the bank.
    leftover = cache / f".{bank.key}.tmp-999-deadbeef"
    os.rename(final, leftover)
    calls = _count_backbone_builds(monkeypatch)
    again = extract_bank(separable, SMALL, cache_dir=cache, **QUICK)
    assert not again.from_cache and len(calls) == 1 and (final / "meta.json").is_file()

    # A folder under the key without meta.json is not the bank either; extraction replaces it with one.
    (final / "meta.json").unlink()
    again = extract_bank(separable, SMALL, cache_dir=cache, **QUICK)
    assert not again.from_cache and len(calls) == 2
    assert (final / "meta.json").is_file()
    assert extract_bank(separable, SMALL, cache_dir=cache, **QUICK).from_cache and len(calls) == 2


def test_unreadable_bank_is_extracted_again_and_repaired(separable, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"
    bank = extract_bank(separable, SMALL, cache_dir=cache, **QUICK)
    features_file = cache / bank.key / "train_features.npy"
    features_file.write_bytes(features_file.read_bytes()[:200])  # truncated
    with caplog.at_level(logging.WARNING, logger="tune_rice.features.bank"):
        again = extract_bank(separable, SMALL, cache_dir=cache, **QUICK)
    assert not again.from_cache and "unreadable" in caplog.text
    assert np.array_equal(again.splits["train"].features, bank.splits["train"].features)
    repaired = load_bank(cache / bank.key)
    assert np.array_equal(repaired.splits["train"].features, bank.splits["train"].features)


def test_crash_while_saving_leaves_nothing(separable, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_save = np.save
    calls = []

    def failing_save(file, arr, *args, **kwargs):
        calls.append(file)
        if len(calls) == 3:  # after the train arrays, before valid: a half-written bank
            raise OSError(28, "No space left on device")
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        extract_bank(separable, SMALL, cache_dir=cache, **QUICK)
    assert len(calls) == 3
    assert list(cache.iterdir()) == []  # neither the final folder nor the temp folder

    monkeypatch.setattr(np, "save", real_save)
    bank = extract_bank(separable, SMALL, cache_dir=cache, **QUICK)
    assert not bank.from_cache and [p.name for p in cache.iterdir()] == [bank.key]


def test_save_bank_keeps_a_bank_another_process_finished_first(separable, tmp_path):
    cache = tmp_path / "cache"
    bank = extract_bank(separable, SMALL, cache_dir=cache, **QUICK)
    marker = cache / bank.key / "theirs"
    marker.write_text("x")
    save_bank(bank, cache / bank.key)
    assert marker.exists() and [p.name for p in cache.iterdir()] == [bank.key]


def test_temp_folders_of_killed_writes_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
    host = socket.gethostname()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)  # a process that has exited
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    idle, day = features.STALE_TEMP_S + 60, features.STALE_FOREIGN_TEMP_S + 60
    cases = {  # name -> (seconds untouched, swept?)
        f".a.tmp-{host}-{dead_pid}-0123abcd": (idle, True),  # its process is gone
        f".b.tmp-{host}-{dead_pid}-0123abcd": (60, False),  # gone, but touched a minute ago
        f".c.tmp-{host}-{live.pid}-0123abcd": (idle, False),  # still running
        f".d.tmp-{host}-{live.pid}-0123abcd": (day, True),  # "running" for a day: a reused pid
        f".e.tmp-{host}-{os.getpid()}-0123abcd": (idle, False),  # this process may be writing it
        ".f.tmp-other-node-7-0123abcd": (day, True),  # another host's, a day old
        ".g.tmp-other-node-8-0123abcd": (idle, False),  # another host's, recent
        f".h.tmp-{dead_pid}-0123abcd": (day, True),  # the older naming, a day old
        f".i.tmp-{dead_pid}-0123abcd": (idle, False),  # the older naming, recent
        "abc": (day, False),  # a bank
        ".abc.notes": (day, False),  # not ours
    }
    try:
        for name, (age, _) in cases.items():
            (tmp_path / name).mkdir()
            (tmp_path / name / "train_features.npy").write_bytes(b"x")
            t = time.time() - age
            os.utime(tmp_path / name, (t, t))
        removed = features.sweep_stale_temps(tmp_path)
        # the live check matters: the same folders with every process taken for dead
        monkeypatch.setattr(features, "_alive", lambda pid: False)
        for name in (f".c.tmp-{host}-{live.pid}-0123abcd",):
            assert features.sweep_stale_temps(tmp_path) == [tmp_path / name]
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in removed) == sorted(n for n, (_, swept) in cases.items() if swept)
    assert features.sweep_stale_temps(tmp_path / "missing") == []
