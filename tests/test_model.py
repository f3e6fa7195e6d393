"""The frozen backbone, weights resolution, heads and the model artifact (resnet18, tiny inputs, CPU)."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from tune_rice import UserError
from tune_rice.features.model import (
    ARTIFACT_FORMAT,
    Classifier,
    Ensemble,
    ResolvedWeights,
    build_backbone,
    build_ensemble,
    build_head,
    hub_weights_file,
    load_artifact,
    resolve_weights,
    safe_torch_load,
    save_artifact,
)


def _random_resnet18_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}


def _assert_backbone_holds(backbone, state: dict) -> None:
    """Every tensor of the backbone equals ``state`` (the classifier layer may have been dropped)."""
    own = backbone.net.state_dict()
    assert own, "backbone has no state"
    for k, v in own.items():
        assert torch.equal(v, state[k]), k


class _Evil:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------ frozen means frozen
def test_frozen_backbone_survives_a_training_step_through_the_full_model():
    backbone, _ = build_backbone("resnet18", weights="none", seed=0)
    head = build_head("pooled", in_dim=backbone.out_dim, n_classes=3, hidden=16, dropout=0.1)
    model = Classifier(backbone, head)
    params0 = {k: v.detach().clone() for k, v in backbone.named_parameters()}
    buffers0 = {k: v.detach().clone() for k, v in backbone.named_buffers()}
    head0 = {k: v.detach().clone() for k, v in head.named_parameters()}
    # The check below must cover every kind of BatchNorm buffer, or it proves nothing.
    for suffix in ("running_mean", "running_var", "num_batches_tracked"):
        assert any(k.endswith(suffix) for k in buffers0), suffix

    model.train()  # what train_one_epoch does; must not switch BatchNorm to batch statistics
    assert head.training
    assert not backbone.training and not any(m.training for m in backbone.modules())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.0, weight_decay=0.1)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in head.parameters()}
    torch.manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32) * 3 + 1, torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for k, v in backbone.named_parameters():
        assert torch.equal(v, params0[k]), k
        assert not v.requires_grad and v.grad is None, k
    for k, v in backbone.named_buffers():
        assert torch.equal(v, buffers0[k]), k
    assert not any(m.training for m in backbone.modules())
    assert any(not torch.equal(v, head0[k]) for k, v in head.named_parameters()), "the head did not learn"

    # Control: the same batch through an unfrozen network in train mode does move its statistics,
    # so the equality above is a real check and not an artefact of the input.
    raw = torchvision.models.resnet18(weights=None).train()
    before = raw.bn1.running_mean.clone()
    raw(x)
    assert not torch.equal(raw.bn1.running_mean, before)


def test_backbone_train_call_cannot_unfreeze():
    backbone, _ = build_backbone("resnet18", weights="none")
    backbone.train(True)
    assert not any(m.training for m in backbone.modules())


# ---------------------------------------------------------------------------------------------- weights
def test_imagenet_weights_from_a_preseeded_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("TUNE_RICE_OFFLINE", "1")
    # torch.hub.get_dir() reads TORCH_HOME at call time (no set_dir in play), so the patch takes effect.
    assert Path(torch.hub.get_dir()) == tmp_path / "torch_home" / "hub"
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / os.path.basename(url)
    assert hub_weights_file("resnet18")[1] == cached
    cached.parent.mkdir(parents=True)
    state = _random_resnet18_state(123)
    torch.save(state, cached)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download although the weights are cached")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    for mode in ("auto", "imagenet"):
        resolved = resolve_weights("resnet18", mode)
        assert resolved.identity.startswith("imagenet:") and "ResNet18_Weights" in resolved.identity
        assert resolved.pretrained
        backbone, resolved2 = build_backbone("resnet18", weights=mode)
        assert resolved2.identity == resolved.identity
        _assert_backbone_holds(backbone, state)


def test_hub_cache_is_loaded_weights_only(tmp_path, monkeypatch, caplog):
    """A tampered file in the hub cache must not run code (torch.hub's own default is weights_only=False)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    _, cached = hub_weights_file("resnet18")
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Evil(marker)}, cached)
    with pytest.raises(UserError, match="--weights"):
        resolve_weights("resnet18", "imagenet")
    with caplog.at_level(logging.WARNING, logger="tune_rice.features.model"):
        assert resolve_weights("resnet18", "auto").identity == "random:seed=0"
    assert not marker.exists()


def test_imagenet_unavailable_offline(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setenv("TUNE_RICE_OFFLINE", "1")
    _, cached = hub_weights_file("resnet18")
    assert not cached.exists()
    with pytest.raises(UserError) as err:
        resolve_weights("resnet18", "imagenet")
    message = str(err.value)
    assert str(cached) in message and "--weights" in message and "\n" not in message

    with caplog.at_level(logging.WARNING, logger="tune_rice.features.model"):
        resolved = resolve_weights("resnet18", "auto", seed=0)
    assert resolved.identity == "random:seed=0" and not resolved.pretrained and resolved.state_dict is None
    assert any(r.levelno == logging.WARNING and "RANDOMLY INITIALISED" in r.getMessage() for r in caplog.records)


def test_weights_from_a_state_dict_file(tmp_path):
    state = _random_resnet18_state(7)
    path = tmp_path / "mine.pth"
    torch.save(state, path)
    resolved = resolve_weights("resnet18", str(path))
    assert resolved.identity.startswith("file:mine.pth:") and resolved.pretrained
    backbone, _ = build_backbone("resnet18", weights=str(path))
    _assert_backbone_holds(backbone, state)

    wrapped = tmp_path / "wrapped.pth"  # {"state_dict": ...} as many training scripts save it
    torch.save({"state_dict": state, "epoch": 3}, wrapped)
    _assert_backbone_holds(build_backbone("resnet18", weights=str(wrapped))[0], state)

    # The classifier of a network fine-tuned on another class count: a clear error, not a traceback.
    other = dict(state, **{"fc.weight": torch.zeros(3, 512), "fc.bias": torch.zeros(3)})
    torch.save(other, tmp_path / "other_fc.pth")
    with pytest.raises(UserError, match="do not fit"):
        build_backbone("resnet18", weights=str(tmp_path / "other_fc.pth"))


def test_weights_file_with_wrong_keys(tmp_path):
    state = _random_resnet18_state(0)
    state["extra.weight"] = state.pop("layer1.0.conv1.weight")
    torch.save(state, tmp_path / "wrong.pth")
    with pytest.raises(UserError) as err:
        build_backbone("resnet18", weights=str(tmp_path / "wrong.pth"))
    message = str(err.value)
    assert "missing keys [layer1.0.conv1.weight]" in message and "unexpected keys [extra.weight]" in message

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(UserError, match="not a state dict"):
        resolve_weights("resnet18", str(tmp_path / "list.pth"))
    with pytest.raises(UserError, match="not 'auto', 'imagenet', 'none' or an existing file"):
        resolve_weights("resnet18", str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_malicious_pickle_is_refused(tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"conv1.weight": torch.zeros(1), "x": _Evil(marker)}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        # Protocol 2, as torch.load expects; no tensor, which a raw pickle would store as another global.
        path.write_bytes(pickle.dumps({"x": _Evil(marker)}, protocol=2))
    with pytest.raises(UserError, match="refused to load") as err:
        safe_torch_load(path)
    # One line naming what was refused, without torch's advice to retry with weights_only=False.
    message = str(err.value)
    assert "\n" not in message and "weights_only` set to `False`" not in message
    assert "GLOBAL" in message and "system" in message  # names the global it refused (posix.system)
    with pytest.raises(UserError, match="refused to load"):
        resolve_weights("resnet18", str(path))
    with pytest.raises(UserError, match="refused to load"):
        load_artifact(path)
    assert not marker.exists()


def test_random_init_is_a_function_of_the_seed():
    def weights(seed):
        return build_backbone("resnet18", weights="none", seed=seed)[0].net.state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])
    assert resolve_weights("resnet18", "none", seed=5) == ResolvedWeights(None, "random:seed=5", False)


def test_unknown_backbone_is_a_user_error():
    with pytest.raises(UserError, match="unknown backbone 'resnet19'.*resnet18"):
        build_backbone("resnet19", weights="none")


# ------------------------------------------------------------------------------------------------ heads
def test_pooled_feature_dims():
    r18, _ = build_backbone("resnet18", weights="none")
    assert r18.out_dim == 512
    assert r18(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    r50, _ = build_backbone("resnet50", weights="none")
    assert r50.out_dim == 2048
    assert r50(torch.randn(1, 3, 32, 32)).shape == (1, 2048)


def test_head_shapes():
    linear = build_head("pooled", in_dim=512, n_classes=4, hidden=0, dropout=0.3)
    linears = [m for m in linear.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and (linears[0].in_features, linears[0].out_features) == (512, 4)
    mlp = build_head("pooled", in_dim=512, n_classes=4, hidden=32)
    assert [(m.in_features, m.out_features) for m in mlp.modules() if isinstance(m, nn.Linear)] == [(512, 32), (32, 4)]
    assert mlp(torch.randn(5, 512)).shape == (5, 4)

    logits_backbone, _ = build_backbone("resnet18", weights="none", feature_layer="logits")
    assert logits_backbone.out_dim == 1000
    seed = build_head("seed", in_dim=logits_backbone.out_dim, n_classes=3, hidden=64)
    kinds = [type(m) for m in seed.net]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear]
    assert (seed.net[0].in_features, seed.net[0].out_features) == (1000, 64)
    assert (seed.net[2].in_features, seed.net[2].out_features) == (64, 3)
    assert Classifier(logits_backbone, seed).eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    # dropout (searched by wide.yaml for both heads) reaches the seed head's hidden units
    dropped = build_head("seed", in_dim=1000, n_classes=3, hidden=64, dropout=0.5)
    assert dropped.hidden_dropout.p == 0.5
    x = torch.randn(4, 1000)
    assert not torch.equal(dropped.train()(x), dropped(x)) and torch.equal(dropped.eval()(x), dropped(x))
    # dropout changes no weight name: a seed head saved with one dropout loads into any other
    plain = build_head("seed", in_dim=1000, n_classes=3, hidden=64, dropout=0.0).eval()
    assert [type(m) for m in plain.net] == [nn.Linear, nn.ReLU, nn.Linear] and plain.hidden_dropout is None
    plain.load_state_dict(dropped.state_dict())
    assert torch.equal(plain(x), dropped.eval()(x))
    h = torch.relu(dropped.net[0]((x - dropped.mean) / dropped.std))
    assert torch.allclose(dropped(x), dropped.net[2](h))  # eval: Linear -> ReLU -> Linear

    with pytest.raises(UserError, match="valid: pooled, seed"):
        build_head("transformer", in_dim=8, n_classes=2)


def test_standardisation_is_saved_with_the_head():
    head = build_head("pooled", in_dim=8, n_classes=2, hidden=4).eval()
    mean, std = torch.arange(8.0), torch.linspace(0.5, 2.0, 8)
    head.set_standardization(mean.numpy(), std.numpy())
    state = head.state_dict()
    assert torch.equal(state["mean"], mean) and torch.equal(state["std"], std)
    x = torch.randn(3, 8) * std + mean
    # The head sees standardised features: the same as a plain head fed (x - mean) / std.
    plain = build_head("pooled", in_dim=8, n_classes=2, hidden=4).eval()
    plain.load_state_dict({**state, "mean": torch.zeros(8), "std": torch.ones(8)})
    assert torch.allclose(head(x), plain((x - mean) / std), atol=1e-6)
    again = build_head("pooled", in_dim=8, n_classes=2, hidden=4).eval()
    again.load_state_dict(state)
    assert torch.equal(again(x), head(x))

    # Dims that were constant on the training images (dead units) are not blown up by a ~0 std.
    head.set_standardization(torch.zeros(8), torch.tensor([0.0, 1e-7, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    assert torch.allclose(head.std[:2], torch.full((2,), 0.1 * 6 / 8))
    assert torch.equal(head.std[2:], torch.ones(6))
    # ... and features of a tiny scale (random-init EfficientNet: ~1e-14) keep theirs: the floor is relative
    head.set_standardization(torch.zeros(8), torch.full((8,), 1e-15))
    assert torch.equal(head.std, torch.full((8,), 1e-15))


# --------------------------------------------------------------------------------------------- artifact
@pytest.mark.parametrize("kind", ["pooled", "seed"])
def test_artifact_round_trip(tmp_path, kind):
    layer = "logits" if kind == "seed" else "pooled"
    backbone, resolved = build_backbone("resnet18", weights="none", seed=3, feature_layer=layer)
    head = build_head(kind, in_dim=backbone.out_dim, n_classes=3, hidden=16, dropout=0.2)
    head.set_standardization(torch.rand(backbone.out_dim), torch.rand(backbone.out_dim) + 0.5)
    model = Classifier(backbone, head).eval()
    path = save_artifact(
        tmp_path / "best" / "model.pt",
        model,
        classes=["a", "b", "c"],
        preprocessing={"image_size": 32},
        weights=resolved,
        config={"lr": 1e-3, "path": tmp_path},
        metrics={"valid/acc": torch.tensor(0.5)},
    )
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind

    loaded, meta = load_artifact(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not any(m.training for m in loaded.modules())
    assert meta["classes"] == ["a", "b", "c"] and meta["weights"] == "random:seed=3" and not meta["pretrained"]
    assert meta["backbone"] == "resnet18" and meta["feature_layer"] == layer and meta["head"]["kind"] == kind
    assert meta["preprocessing"] == {"image_size": 32} and meta["metrics"] == {"valid/acc": 0.5}
    assert meta["config"] == {"lr": 1e-3, "path": str(tmp_path)}

    raw = torch.load(path, weights_only=True)  # the contract: plain tensors and primitives only
    assert raw["format"] == "tune-rice-model" and "mean" in raw["heads"][0]["state_dict"]


def _member(name: str, seed: int, layer: str = "pooled", *, hidden: int = 16):
    backbone, resolved = build_backbone(name, weights="none", seed=seed, feature_layer=layer)
    torch.manual_seed(seed + 100)
    head = build_head("seed" if layer == "logits" else "pooled", in_dim=backbone.out_dim, n_classes=3, hidden=hidden)
    head.set_standardization(torch.rand(backbone.out_dim), torch.rand(backbone.out_dim) + 0.5)
    return Classifier(backbone, head).eval(), resolved


def test_ensemble_shares_backbones_and_round_trips(tmp_path):
    # Three heads: two on one resnet18 (built twice, equal numbers), one on that resnet18's logits layer.
    (a, wa), (b, _), (c, _) = _member("resnet18", 0), _member("resnet18", 0, hidden=8), _member("resnet18", 0, "logits")
    b.head.load_state_dict({k: v + 0.01 for k, v in b.head.state_dict().items()})  # a different head
    weights, temperature = [0.5, 0.3, 0.2], 1.7
    ens = build_ensemble([a, b, c], weights=weights, temperature=temperature, names=["t1", "t2", "t3"]).eval()
    assert isinstance(ens, Ensemble) and len(ens.backbones) == 2 and ens.backbone_index == [0, 0, 1]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        direct = (0.5 * a(x) + 0.3 * b(x) + 0.2 * c(x)) / temperature  # each member on its own backbone
        assert torch.allclose(ens(x), direct, atol=1e-5)

    path = save_artifact(
        tmp_path / "model.pt",
        ens,
        classes=["a", "b", "c"],
        preprocessing={"image_size": 32},
        weights=[wa, wa],
        config={"k": 3},
        metrics={"valid/acc": 0.5},
        calibration={"method": "temperature", "fitted_on": "valid"},
    )
    loaded, meta = load_artifact(path)
    assert meta["calibration"] == {"method": "temperature", "fitted_on": "valid"}
    assert isinstance(loaded, Ensemble) and len(loaded.backbones) == 2
    with torch.no_grad():
        assert torch.equal(loaded(x), ens(x))
    assert meta["temperature"] == temperature and [m["name"] for m in meta["members"]] == ["t1", "t2", "t3"]
    assert [m["weight"] for m in meta["members"]] == weights
    assert [m["feature_layer"] for m in meta["members"]] == ["pooled", "pooled", "logits"]
    assert meta["weights"] == "random:seed=0" and not meta["pretrained"] and meta["head"]["kind"] == "ensemble"
    raw = torch.load(path, weights_only=True)
    assert len(raw["backbones"]) == 2 and [h["backbone"] for h in raw["heads"]] == [0, 0, 1]

    # Different numbers are different backbones, each kept.
    (d, _) = _member("resnet18", 1)
    assert len(build_ensemble([a, d], weights=[0.5, 0.5]).backbones) == 2
    # One member: a Classifier that carries the temperature through save and load.
    single = build_ensemble([a], weights=[1.0], temperature=2.0, names=["t1"])
    assert isinstance(single, Classifier)
    path = save_artifact(
        tmp_path / "single.pt", single, classes=["a", "b", "c"], preprocessing={"image_size": 32}, weights=wa
    )
    loaded, meta = load_artifact(path)
    assert isinstance(loaded, Classifier) and meta["temperature"] == 2.0 and meta["head"]["kind"] == "pooled"
    with torch.no_grad():
        assert torch.allclose(loaded(x), a(x) / 2.0, atol=1e-6)


def test_version_1_single_head_files_still_load(tmp_path):
    model, resolved = _member("resnet18", 2)
    # The layout version 1 wrote (before ensembles): one "backbone", one "head", no temperature.
    v1 = {
        "format": ARTIFACT_FORMAT,
        "version": 1,
        "backbone": {"name": "resnet18", "feature_layer": "pooled", "state_dict": model.backbone.net.state_dict()},
        "head": {**model.head.spec(), "state_dict": model.head.state_dict()},
        "classes": ["a", "b", "c"],
        "preprocessing": {"image_size": 32},
        "weights": resolved.identity,
        "pretrained": False,
        "config": {"lr": 0.1},
        "metrics": {},
        "torch_version": "2.1",
        "torchvision_version": "0.16",
    }
    torch.save(v1, tmp_path / "v1.pt")
    loaded, meta = load_artifact(tmp_path / "v1.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert isinstance(loaded, Classifier) and torch.equal(loaded(x), model(x))
    assert meta["temperature"] == 1.0 and meta["backbone"] == "resnet18" and meta["head"]["kind"] == "pooled"
    assert meta["weights"] == resolved.identity and meta["config"] == {"lr": 0.1}
    torch.save({**v1, "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(UserError, match="format version 99"):
        load_artifact(tmp_path / "v99.pt")


def test_non_artifact_file_is_a_user_error(tmp_path):
    torch.save(_random_resnet18_state(0), tmp_path / "plain.pth")
    with pytest.raises(UserError, match="not a tune-rice model artifact"):
        load_artifact(tmp_path / "plain.pth")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UserError, match="cannot read"):
        load_artifact(tmp_path / "text.pt")
    with pytest.raises(UserError, match="not found"):
        load_artifact(tmp_path / "absent.pt")


def test_a_search_on_user_data_refuses_missing_pretrained_weights_before_any_work(tmp_path, monkeypatch, capsys):
    """No silent fallback: with --data and no --weights, weights that cannot be had stop the search with
    one line (what was looked for, how to fetch it) before the data is read or anything is written;
    --weights auto keeps the fallback, and the demo set's default is auto (it must run offline)."""
    from conftest import SMALL_SPACE, error_line, make_separable_dataset

    from tune_rice.search import run as search
    from tune_rice.search import tune_glue

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    monkeypatch.setattr(tune_glue, "init_ray", lambda address: pytest.fail("Ray started"))
    labels = make_separable_dataset(tmp_path / "data", per_class=2)
    (tmp_path / "space.yaml").write_text(SMALL_SPACE)
    argv = [
        "--data",
        str(labels),
        "--search-space",
        str(tmp_path / "space.yaml"),
        "--storage-path",
        str(tmp_path / "runs"),
    ]
    read = []
    monkeypatch.setattr(search, "load_data", lambda args: read.append(args) or pytest.fail("data read"))
    assert search.main([*argv, "--name", "x"]) == 2
    line = error_line(capsys.readouterr().err)
    _, cached = hub_weights_file("resnet18")
    assert str(cached) in line and "--weights FILE" in line and "--weights auto" in line, line
    assert not read and not (tmp_path / "runs").exists()
    assert search.default_weights(search.parse_config([])) == "auto"  # the demo set
    config = search.parse_config([*argv, "--weights", "auto"])
    assert search.backbone_weights(config, [], None) == {} and config.weights == "auto"
