"""Backbones (with weights resolution), a truly frozen backbone, heads, and the model artifact (saved and
loaded here, with the loader of TorchScript exports for inference).

No Ray here. The artifact written by :func:`save_artifact` is a plain dict of tensors and primitives so
that it loads with ``torch.load(..., weights_only=True)``: nothing in it can run code on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from .. import UserError
from ..records import MODEL_FILE, MODEL_PATH
from ..torchutil import safe_torch_load
from . import timm_zoo
from .backbones import (
    classifier_dims,
    create_network,
    cut_classifier,
    drop_aux,
    empty_network,
    load_state,
    parse_backbone,
    validate,
    weights_file,
)

log = logging.getLogger(__name__)

FEATURE_LAYERS = ("pooled", "logits", "stage")  # stage: the input of the last stage (stage.StagePrefix)
HEAD_KINDS = ("pooled", "seed")
ARTIFACT_FORMAT = "tune-rice-model"
ARTIFACT_VERSION = 2  # 2: backbones/heads lists, ensemble weights and temperature; 1 (one head) still loads


# -------------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class ResolvedWeights:
    """Where a backbone's numbers come from.

    ``identity`` is a short stable string that goes into cache keys, results and artifacts, e.g.
    ``imagenet:ResNet34_Weights.IMAGENET1K_V1``, ``random:seed=0`` or ``file:my.pth:3f2a...``.
    """

    state_dict: dict | None
    identity: str
    pretrained: bool


def _offline() -> bool:
    return os.environ.get("TUNE_RICE_OFFLINE", "") not in ("", "0") or os.environ.get("HF_HUB_OFFLINE") == "1"


def hub_weights_file(name: str) -> tuple[WeightsEnum, Path]:
    """The torchvision ``Weights`` enum member for backbone ``name`` (``arch`` or ``arch:WEIGHTS``) and
    where torch's hub cache keeps its file."""
    weights = parse_backbone(name).weights
    if not isinstance(weights, WeightsEnum):  # parse_backbone takes its members from torchvision's enums
        raise TypeError(f"{name}: {weights!r} is not a torchvision weights enum member")
    return weights, weights_file(name)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def fetch_hint(name: str) -> str:
    """Where the published weights of backbone ``name`` are looked for and how to put them there."""
    if timm_zoo.is_timm(name):
        return timm_zoo.fetch_hint(name)
    w, cached = hub_weights_file(name)
    return (
        f"fetch {w.url} to {cached} on a machine with internet (or set TORCH_HOME to a cache that has it), "
        "or pass --weights FILE, --weights none (random init) or --weights auto (random init when missing)"
    )


def _random(name: str, reason: str, seed: int) -> ResolvedWeights:
    log.warning(
        "ImageNet weights for %s unavailable (%s): using a RANDOMLY INITIALISED backbone "
        "(seed %d). Results will be far below what pretrained weights give; every result "
        "and artifact records this.",
        name,
        reason,
        seed,
    )
    return ResolvedWeights(None, f"random:seed={seed}", False)


def _network_state(net: nn.Module) -> dict:
    return {k: v.detach() for k, v in net.state_dict().items()}


def _resolve_timm(name: str, weights: str, *, seed: int) -> ResolvedWeights:
    """:func:`resolve_weights` for a ``timm:NAME`` backbone: the published weights from the local caches
    (the HF hub cache, torch's hub cache; downloaded only when not offline), or a file, loaded by timm."""
    if weights in ("auto", "imagenet"):
        path = timm_zoo.cached_file(name)
        reason = "offline (TUNE_RICE_OFFLINE or HF_HUB_OFFLINE is set)"
        if path is None and not _offline():
            try:
                path = timm_zoo.download(name)
            except UserError as e:
                reason = str(e)
            except Exception as e:  # network and hub errors come in many types
                reason = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
        if path is not None:
            return ResolvedWeights(_network_state(timm_zoo.load_network(name, path)), timm_zoo.hub_identity(name), True)
        if weights == "imagenet":
            tried = ", ".join(str(p) for _, p in timm_zoo.hub_files(name)) or "no published file"
            raise UserError(
                f"pretrained weights for {name} are not in the local caches (looked for {tried}) and could not "
                f"be downloaded: {reason}. To fetch them: {timm_zoo.fetch_hint(name)}"
            )
        return _random(name, reason, seed)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"--weights {weights!r}: not 'auto', 'imagenet', 'none' or an existing file")
    net = timm_zoo.load_network(name, path)
    return ResolvedWeights(_network_state(net), f"file:{path.name}:{_file_digest(path)}", True)


def resolve_weights(name: str, weights: str = "auto", *, seed: int = 0) -> ResolvedWeights:
    """Turn the user's ``--weights`` value into a state dict (or None for random init) and an identity.

    ``name`` is a backbone value: ``arch`` (its default weights), ``arch:WEIGHTS`` (those weights) or
    ``timm:NAME`` (timm's model; its published weights come from the HF hub cache, see ``timm_zoo``).
    ``auto``: ImageNet weights through torchvision's weights API when they are in the torch hub cache
    or can be downloaded, else random initialisation with a loud warning. ``imagenet``: the same but
    failing when they cannot be had. ``none``: random init from ``seed``. Anything else: a state-dict file.
    """
    if weights == "none":
        return ResolvedWeights(None, f"random:seed={seed}", False)
    if timm_zoo.is_timm(name):
        return _resolve_timm(name, weights, seed=seed)
    if weights in ("auto", "imagenet"):
        w, cached = hub_weights_file(name)
        if cached.is_file() or not _offline():
            try:
                # Reads the hub cache, downloads only if absent. weights_only: torch.hub's default is
                # False, which would let a tampered cache file run code.
                sd = w.get_state_dict(progress=False, weights_only=True)
                return ResolvedWeights(sd, f"imagenet:{w}", True)
            except Exception as e:  # network errors come in many types (URLError, socket, HTTP)
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        else:
            reason = "offline (TUNE_RICE_OFFLINE is set)"
        if weights == "imagenet":
            raise UserError(
                f"ImageNet weights {w} for {name} are not in the torch hub cache ({cached}) and could not be "
                f"downloaded: {reason}. To fetch them: {fetch_hint(name)}."
            )
        return _random(name, reason, seed)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"--weights {weights!r}: not 'auto', 'imagenet', 'none' or an existing file")
    sd = safe_torch_load(path, what="state dict")
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return ResolvedWeights(sd, f"file:{path.name}:{_file_digest(path)}", True)


# ------------------------------------------------------------------------------------------- backbone
class FrozenBackbone(nn.Module):
    """A torchvision classification network, frozen: no gradients and always in eval mode.

    ``feature_layer="pooled"`` returns the input of the network's final classifier layer, which is cut
    (``backbones.cut_classifier``: 512-d for resnet18/34, 2048-d for resnet50, 768-d for vit_b_16);
    ``"logits"`` returns the 1000 ImageNet logits (what the seed recipe's head consumes).
    ``train()`` is overridden so that BatchNorm running statistics never drift, whatever calls it.
    """

    def __init__(self, net: nn.Module, *, name: str, feature_layer: str = "pooled"):
        super().__init__()
        if feature_layer not in FEATURE_LAYERS:
            raise UserError(f"unknown feature layer {feature_layer!r}; valid: {', '.join(FEATURE_LAYERS)}")
        self.name = name
        self.feature_layer = feature_layer
        if feature_layer == "stage":  # a network already cut, whose forward stage.StagePrefix replaces
            self._out_dim = 0
        else:
            self._out_dim = cut_classifier(net) if feature_layer == "pooled" else classifier_dims(net)[1]
        if (
            not self._out_dim and feature_layer != "stage"
        ):  # a timm network built for feature-only weights (DINOv2): no classifier
            raise UserError(f"backbone {name} has no classifier, so no logits: use a pooled head (head: pooled)")
        self.net = net
        for p in self.net.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenBackbone:
        return super().train(False)  # frozen means frozen: BatchNorm stays in eval mode

    @property
    def out_dim(self) -> int:
        return self._out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, D)
        if x.is_cuda:
            # bf16 on CUDA for every caller (bank extraction, inline training, test scoring, predict), so
            # the features a head was trained on and those it is scored on come from the same arithmetic.
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.net(x).float()
        return self.net(x)


def build_backbone(
    name: str = "resnet34", *, weights: str | ResolvedWeights = "auto", seed: int = 0, feature_layer: str = "pooled"
) -> tuple[FrozenBackbone, ResolvedWeights]:
    """Build a frozen torchvision backbone; returns it and where its weights came from.

    ``name`` is a backbone value (``arch`` or ``arch:WEIGHTS``, see ``tune_rice.features.backbones``); the network
    is built for those weights (e.g. ViT at 384 px for ``IMAGENET1K_SWAG_E2E_V1``) whatever ``weights``
    says, so its preprocessing and its architecture always agree.
    """
    validate(name)  # a clear error for an unknown name before any weights are looked for
    resolved = weights if isinstance(weights, ResolvedWeights) else resolve_weights(name, weights, seed=seed)
    if resolved.state_dict is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = create_network(name)
    else:
        net = empty_network(name)  # no random init for numbers about to be replaced
        try:
            missing, unexpected = load_state(net, resolved.state_dict, strict=False)
        except RuntimeError as e:  # shape mismatches, e.g. a classifier fine-tuned on another class count
            detail = "; ".join(ln.strip() for ln in str(e).splitlines()[1:4] if ln.strip())
            raise UserError(f"weights {resolved.identity} do not fit {name}: {detail[:300]}") from None
        if missing or unexpected:

            def show(keys):
                return ", ".join(list(keys)[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

            raise UserError(
                f"weights {resolved.identity} do not fit {name}: "
                f"missing keys [{show(missing)}], unexpected keys [{show(unexpected)}]"
            )
    return FrozenBackbone(drop_aux(net), name=name, feature_layer=feature_layer), resolved


# ----------------------------------------------------------------------------------------------- head
class Head(nn.Module):
    """The trainable classifier on top of frozen features.

    Features are standardised with the training bank's per-dimension ``mean``/``std`` (buffers, saved
    with the head): random-init resnet features have mean ~10 and std ~7 and an unscaled head trains badly.
    ``kind="seed"``: ``Linear(D, H) -> ReLU -> Linear(H, C)`` (the seed recipe, on the 1000 logits), with
    ``Dropout`` after the ReLU when ``dropout > 0``.
    ``kind="pooled"``: ``Dropout -> Linear(D, H) -> ReLU -> Dropout -> Linear(H, C)``; ``H = 0`` gives a
    linear classifier ``Dropout -> Linear(D, C)``.
    """

    mean: torch.Tensor  # (D,) buffers: nn.Module's attribute lookup would type them Tensor | Module
    std: torch.Tensor

    def __init__(self, in_dim: int, n_classes: int, *, hidden: int = 256, dropout: float = 0.0, kind: str = "pooled"):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise UserError(f"unknown head {kind!r}; valid: {', '.join(HEAD_KINDS)}")
        self.in_dim, self.n_classes, self.hidden, self.dropout, self.kind = in_dim, n_classes, hidden, dropout, kind
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        # The seed head's dropout (on its hidden units) sits outside ``net``: it has no weights, and ``net``
        # keeps the recipe's layer indices whatever the dropout, so every saved seed head loads.
        self.hidden_dropout = nn.Dropout(dropout) if kind == "seed" and hidden and dropout else None
        if kind == "seed":
            layers = (
                [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_classes)]
                if hidden
                else [nn.Linear(in_dim, n_classes)]
            )
        elif hidden:
            layers = [
                nn.Dropout(dropout),
                nn.Linear(in_dim, hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, n_classes),
            ]
        else:
            layers = [nn.Dropout(dropout), nn.Linear(in_dim, n_classes)]
        self.net = nn.Sequential(*layers)

    def set_standardization(self, mean, std) -> None:
        mean = torch.tensor(np.asarray(mean, dtype=np.float32))
        std = torch.tensor(np.asarray(std, dtype=np.float32))
        # A dim constant on the un-augmented train images (dead ReLU units: dozens with random weights) still
        # moves on augmented views and new images; dividing by its ~0 std made values of 1e4-1e5 and train
        # losses of ~50. So no dim is amplified more than 10x an average one. The floor is relative only:
        # random-init EfficientNets give features of ~1e-14, which an absolute floor (1e-6) would flatten.
        std = std.clamp_min(max(0.1 * float(std.mean()), torch.finfo(torch.float32).tiny))
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, C)
        z = (features.float() - self.mean) / self.std
        if self.hidden_dropout is not None:  # seed head: Linear -> ReLU -> Dropout -> Linear
            return self.net[2](self.hidden_dropout(self.net[1](self.net[0](z))))
        return self.net(z)

    def spec(self) -> dict:
        return {
            "kind": self.kind,
            "in_dim": self.in_dim,
            "n_classes": self.n_classes,
            "hidden": self.hidden,
            "dropout": self.dropout,
        }


def build_head(kind: str = "pooled", *, in_dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.0) -> Head:
    return Head(in_dim, n_classes, hidden=int(hidden), dropout=float(dropout), kind=kind)


def feature_layer_for(head_kind: str) -> str:
    """The seed head eats the 1000 ImageNet logits; the pooled head the penultimate features."""
    return "logits" if head_kind == "seed" else "pooled"


class Classifier(nn.Module):
    """Frozen backbone + head: images (B, 3, S, S) -> logits (B, C), divided by ``temperature`` (1 while
    training; the deployed model's is fitted on valid, see ``calibration.fit_temperature``)."""

    def __init__(self, backbone: FrozenBackbone, head: Head, *, temperature: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        return logits if self.temperature == 1.0 else logits / self.temperature


def _same_backbone(a: FrozenBackbone, b: FrozenBackbone) -> bool:
    if a is b:
        return True
    if (a.name, a.feature_layer) != (b.name, b.feature_layer):
        return False
    sa, sb = a.net.state_dict(), b.net.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Ensemble(nn.Module):
    """Frozen backbones, each distinct one held once, and the heads on them: images (B, 3, S, S) ->
    ``sum_i weights[i] * head_i(backbone_of_i(x)) / temperature`` (B, C).

    Heads that share a backbone share its forward pass, so an ensemble of M heads on one backbone costs
    one backbone pass plus M small heads. ``names`` say where each head came from (trial ids).
    """

    def __init__(
        self,
        backbones: Sequence[FrozenBackbone],
        heads: Sequence[Head],
        *,
        backbone_index: Sequence[int],
        weights: Sequence[float],
        temperature: float = 1.0,
        names: Sequence[str] | None = None,
    ):
        super().__init__()
        if not heads or not (len(heads) == len(backbone_index) == len(weights)):
            raise ValueError("an ensemble needs one backbone index and one weight per head, and a head")
        if not all(0 <= i < len(backbones) for i in backbone_index) or set(backbone_index) != set(
            range(len(backbones))
        ):
            raise ValueError(f"backbone_index {list(backbone_index)} does not cover {len(backbones)} backbones")
        self.backbones = nn.ModuleList(backbones)
        self.heads = nn.ModuleList(heads)
        self.backbone_index = [int(i) for i in backbone_index]
        self.weights = [float(w) for w in weights]
        self.temperature = float(temperature)
        self.names = [str(n) for n in names] if names is not None else [f"head{i}" for i in range(len(heads))]

    # nn.ModuleList registers its items (state_dict, .to) but types each as Module; these say what they are.
    def backbone_list(self) -> list[FrozenBackbone]:
        return [cast(FrozenBackbone, b) for b in self.backbones]

    def head_list(self) -> list[Head]:
        return [cast(Head, h) for h in self.heads]

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each head's own logits (B, C), before weighting and temperature; one pass per backbone."""
        features = [b(x) for b in self.backbones]  # one (B, D_j) per distinct backbone
        return [head(features[j]) for head, j in zip(self.heads, self.backbone_index)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.member_logits(x)
        out = logits[0] * self.weights[0]
        for z, w in zip(logits[1:], self.weights[1:]):
            out = out + z * w
        return out if self.temperature == 1.0 else out / self.temperature


def build_ensemble(
    members: Sequence[Classifier],
    *,
    weights: Sequence[float],
    temperature: float = 1.0,
    names: Sequence[str] | None = None,
) -> Classifier | Ensemble:
    """The deployed model from (backbone, head) members: a :class:`Classifier` for one member, else an
    :class:`Ensemble` that keeps each distinct backbone (same network, layer and numbers) once."""
    if len(members) != len(weights):
        raise ValueError("one weight per member")
    if len(members) == 1:
        return Classifier(members[0].backbone, members[0].head, temperature=temperature)
    backbones: list[FrozenBackbone] = []
    index = []
    for m in members:
        j = next((j for j, b in enumerate(backbones) if _same_backbone(b, m.backbone)), None)
        if j is None:
            backbones.append(m.backbone)
            j = len(backbones) - 1
        index.append(j)
    return Ensemble(
        backbones,
        [m.head for m in members],
        backbone_index=index,
        weights=weights,
        temperature=temperature,
        names=names,
    )


# ------------------------------------------------------------------------------------------- artifact
def _plain(value):
    """Config values reduced to what ``weights_only`` unpickling accepts."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _identities(weights: ResolvedWeights | str | Sequence[ResolvedWeights | str]) -> list[str]:
    if isinstance(weights, (ResolvedWeights, str)):
        return [weights.identity if isinstance(weights, ResolvedWeights) else weights]
    return [w.identity if isinstance(w, ResolvedWeights) else str(w) for w in weights]


def save_artifact(
    path: str | os.PathLike,
    model: Classifier | Ensemble,
    *,
    classes,
    preprocessing: dict,
    weights: ResolvedWeights | str | Sequence[ResolvedWeights | str],
    config: dict | None = None,
    metrics: dict | None = None,
    calibration: dict | None = None,
) -> Path:
    """Write a self-contained model file: backbone weights, heads, classes, preprocessing, config.

    One layout for a single head and for an ensemble: ``backbones`` (each distinct one once), ``heads``
    (each naming its backbone), ``ensemble`` (weights, member names, temperature). ``weights``: where
    the backbones' numbers came from, one per backbone (or one for all). ``calibration``: how the
    model's temperature was fitted (None: it was not, the temperature is whatever the model holds).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(model, Ensemble):
        backbones, heads, index = model.backbone_list(), model.head_list(), model.backbone_index
        mix, names = model.weights, model.names
    else:
        backbones, heads, index, mix, names = [model.backbone], [model.head], [0], [1.0], ["head0"]
    identities = _identities(weights)
    if len(identities) == 1:
        identities = identities * len(backbones)
    if len(identities) != len(backbones):
        raise ValueError(f"{len(identities)} weights identities for {len(backbones)} backbones")
    payload = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "backbones": [
            {
                "name": b.name,
                "feature_layer": b.feature_layer,
                "weights": w,
                "state_dict": _state(b.net),
                # what rebuilds it: the value names the network; a timm one also depends on timm's version
                **({"timm_version": timm_zoo.version()} if timm_zoo.is_timm(b.name) else {}),
            }
            for b, w in zip(backbones, identities)
        ],
        "heads": [{**h.spec(), "backbone": int(j), "state_dict": _state(h)} for h, j in zip(heads, index)],
        "ensemble": {
            "weights": [float(w) for w in mix],
            "members": [str(n) for n in names],
            "temperature": float(model.temperature),
        },
        "classes": list(classes),
        "preprocessing": _plain(preprocessing),
        "weights": " + ".join(dict.fromkeys(identities)),
        "pretrained": not any(i.startswith("random:") for i in identities),
        "config": _plain(config or {}),
        "metrics": _plain(metrics or {}),
        "calibration": _plain(calibration) if calibration else None,
        "torch_version": str(torch.__version__),  # TorchVersion is not a weights_only-loadable type
        "torchvision_version": str(torchvision.__version__),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def _upgrade_v1(payload: dict) -> dict:
    """A version-1 file (one ``backbone``, one ``head``, no temperature) in today's layout."""
    b, h = payload["backbone"], payload["head"]
    rest = {k: v for k, v in payload.items() if k not in ("backbone", "head")}
    return {
        **rest,
        "backbones": [{**b, "weights": payload.get("weights")}],
        "heads": [{**h, "backbone": 0}],
        "ensemble": {"weights": [1.0], "members": ["head0"], "temperature": 1.0},
    }


def load_artifact(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> tuple[Classifier | Ensemble, dict]:
    """Load a model file written by :func:`save_artifact` (``weights_only=True``); returns (model, meta).

    A file with one head gives a :class:`Classifier`, one with several an :class:`Ensemble`; both map
    images to (calibrated) logits. Files of format version 1 (a single head) still load.
    """
    payload = safe_torch_load(path, what="model file")
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise UserError(
            f"{path}: not a tune-rice model artifact (expected a file written by the search, "
            "e.g. runs/<name>/best/model.pt)"
        )
    version = payload.get("version")
    if version == 1:
        payload = _upgrade_v1(payload)
    elif version != ARTIFACT_VERSION:
        raise UserError(
            f"{path}: model format version {version!r}; this tune-rice reads versions 1 and "
            f"{ARTIFACT_VERSION} (a newer tune-rice wrote it?)"
        )
    backbones = []
    for b in payload["backbones"]:
        # built on the meta device and given the saved tensors themselves: no random init, one copy in memory
        backbone = FrozenBackbone(drop_aux(empty_network(b["name"])), name=b["name"], feature_layer=b["feature_layer"])
        load_state(backbone.net, b["state_dict"])
        backbones.append(backbone)
    heads = []
    for h in payload["heads"]:
        with torch.device("meta"):  # the saved numbers replace the init: none is drawn
            head = build_head(
                h["kind"], in_dim=h["in_dim"], n_classes=h["n_classes"], hidden=h["hidden"], dropout=h["dropout"]
            )
        head.load_state_dict(h["state_dict"], assign=True)
        heads.append(head)
    ens = payload["ensemble"]
    index = [int(h["backbone"]) for h in payload["heads"]]
    model: Classifier | Ensemble
    if len(heads) == 1:
        model = Classifier(backbones[index[0]], heads[0], temperature=ens["temperature"])
    else:
        model = Ensemble(
            backbones,
            heads,
            backbone_index=index,
            weights=ens["weights"],
            temperature=ens["temperature"],
            names=ens["members"],
        )
    model = model.to(map_location).eval()
    meta = {k: v for k, v in payload.items() if k not in ("backbones", "heads", "ensemble")}
    specs = [{k: v for k, v in h.items() if k != "state_dict"} for h in payload["heads"]]
    meta["members"] = [
        {
            "name": n,
            "weight": float(w),
            "backbone": payload["backbones"][s["backbone"]]["name"],
            "feature_layer": payload["backbones"][s["backbone"]]["feature_layer"],
            "weights": payload["backbones"][s["backbone"]].get("weights"),
            "head": {k: v for k, v in s.items() if k != "backbone"},
        }
        for n, w, s in zip(ens["members"], ens["weights"], specs)
    ]
    meta["temperature"] = float(ens["temperature"])
    meta["backbone"] = " + ".join(dict.fromkeys(m["backbone"] for m in meta["members"]))
    meta["feature_layer"] = " + ".join(dict.fromkeys(m["feature_layer"] for m in meta["members"]))
    meta["head"] = meta["members"][0]["head"] if len(heads) == 1 else {"kind": "ensemble", "members": len(heads)}
    return model, meta


# ------------------------------------------------------------------------- loading for inference
TORCHSCRIPT_META = "tune_rice.json"  # the extra file inside an archive written by tune_rice.tools.export


@dataclass
class LoadedModel:
    """A model ready for inference: normalised images (B, 3, S, S) float32 -> logits (B, C)."""

    module: nn.Module
    classes: list[str]
    preprocessing: dict
    weights: str
    path: Path
    kind: str  # "artifact" | "torchscript"
    meta: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int:
        return int(self.preprocessing["image_size"])


def resolve_model_path(path: str | os.PathLike) -> Path:
    """``--model`` may also name an experiment folder (``runs/<name>``) or its ``best/`` folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / MODEL_PATH, p / MODEL_FILE):
            if candidate.is_file():
                return candidate
        raise UserError(f"{p}: a folder without best/model.pt or model.pt; pass the model file")
    return p


def is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("constants.pkl") or "/code/" in name for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def read_torchscript(path: str | os.PathLike, *, map_location="cpu") -> tuple[nn.Module, dict]:
    """Load a TorchScript file written by ``tune_rice.tools.export``; returns (module, its tune_rice.json).

    TorchScript holds its own graph code, which runs when the module is called: load only exports you trust.
    """
    extra = {TORCHSCRIPT_META: ""}
    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export; still supported
        warnings.simplefilter("ignore", FutureWarning)
        try:
            module = torch.jit.load(str(path), map_location=map_location, _extra_files=extra)
        except Exception as e:  # torch.jit raises RuntimeError (and others) with multi-line messages
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise UserError(f"{path}: cannot load as TorchScript ({reason})") from None
    raw = extra[TORCHSCRIPT_META]
    if not raw:
        raise UserError(
            f"{path}: a TorchScript file without {TORCHSCRIPT_META}: not written by "
            "tune_rice.tools.export, so its classes and preprocessing are unknown"
        )
    try:
        meta = json.loads(raw)
        meta["classes"], meta["preprocessing"]["image_size"]  # noqa: B018 (presence check)
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: its {TORCHSCRIPT_META} is not valid tune-rice metadata") from None
    return module.eval(), meta


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a tune-rice artifact, or failing that a TorchScript export, onto ``device``.

    The artifact format is tried first (``weights_only=True``; a pickle that would run code is refused,
    never retried unsafely). Only a file that is a TorchScript archive goes to ``torch.jit.load``.
    """
    path = resolve_model_path(path)
    device = torch.device(device)
    module: nn.Module
    try:
        with warnings.catch_warnings():  # torch.load's note on meeting a TorchScript archive: handled below
            warnings.filterwarnings("ignore", message=".*TorchScript archive", category=UserWarning)
            module, meta = load_artifact(path, map_location=device)
        return LoadedModel(
            module, list(meta["classes"]), dict(meta["preprocessing"]), str(meta["weights"]), path, "artifact", meta
        )
    except UserError as e:
        if not is_torchscript(path):
            if "cannot read as" in str(e):  # not a torch file at all: say what would have been one
                raise UserError(
                    f"{e}; --model wants a tune-rice model (runs/<name>/best/model.pt) or a "
                    "TorchScript file written by tune_rice.tools.export"
                ) from None
            raise  # refused pickles and foreign torch files: model.py's message says it all
    module, meta = read_torchscript(path, map_location=device)
    if meta.get("input", {}).get("raw"):
        raise UserError(
            f"{path}: a raw-pixel export (export --raw-input: uint8 pixels in, probabilities out) is for "
            "serving; here pass best/model.pt or an export without --raw-input"
        )
    return LoadedModel(
        module,
        list(meta["classes"]),
        dict(meta["preprocessing"]),
        str(meta.get("weights", "?")),
        path,
        "torchscript",
        meta,
    )
