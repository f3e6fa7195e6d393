"""The feature bank: a frozen backbone's outputs, computed once and cached on disk.

A frozen backbone in eval mode gives the same output for the same input, so running it in every epoch of
every trial repeats identical arithmetic. Here each image is decoded once and passed through the backbone
once per view: valid/test get one deterministic view, train gets view 0 un-augmented plus ``views - 1``
augmented views that epochs draw among. Arrays are float16 ``(N, K, D)`` (float32 for features out of
float16's range: :func:`fits_float16`).

No Ray here. Banks are keyed by a hash of everything that changes their numbers, written atomically, and
reused by later runs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import UserError
from ..data.images import (
    AUG_POLICIES,
    ImageDataset,
    LabelTable,
    Preprocessing,
    build_transform,
    dataset_for_split,
    decode_for,
    read_labels,
    to_model_input,
)
from ..devices import default_num_workers as default_num_workers  # re-exported: benchmarks import it here
from ..devices import loader_workers, resolve_device
from ..records import cache_root
from ..torchutil import safe_torch_load
from .backbones import final_layer, pool_classifier_input, preprocessing_for, shape_network
from .model import FEATURE_LAYERS, FrozenBackbone, ResolvedWeights, build_backbone, resolve_weights
from .stage import StagePrefix, StageTail, bank_bytes_per_view, stage_shape

log = logging.getLogger(__name__)

# 2: a bank whose features float16 cannot hold is kept in float32 (format 1 stored inf or zeros for them),
# so banks cached by format 1 are not found again and are re-extracted.
BANK_FORMAT = 2
# Share of the free memory that one extraction batch may take (the rest: loader workers, the banks
# being filled, other processes on the machine).
MEMORY_SHARE = 0.5


def default_cache_dir() -> Path:
    return cache_root() / "features"


@dataclass(frozen=True)
class FeatureSpec:
    """Everything about the backbone side that changes the bank's numbers (except the data).

    ``backbone`` is a backbone value (``arch`` or ``arch:WEIGHTS``); ``image_size`` 0 means the weights'
    own crop size and is replaced by it, so a spec always names the size it extracts at. The rest of
    the preprocessing (resize, interpolation, mean, std) follows from the two: :attr:`preprocessing`.
    """

    backbone: str = "resnet34"
    image_size: int = 0
    feature_layer: str = "pooled"
    policy: str = "standard"
    views: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.feature_layer not in FEATURE_LAYERS:
            raise UserError(f"unknown feature layer {self.feature_layer!r}; valid: {', '.join(FEATURE_LAYERS)}")
        if self.policy not in AUG_POLICIES:
            raise UserError(f"unknown augmentation policy {self.policy!r}; valid: {', '.join(AUG_POLICIES)}")
        if int(self.views) < 1:
            raise UserError(f"views must be >= 1, got {self.views}")
        if int(self.image_size) != 0 and int(self.image_size) < 16:
            raise UserError(f"image_size must be >= 16 (or 0 for the weights' own), got {self.image_size}")
        # resolves the size and refuses one the architecture cannot take (ViT), naming the backbone
        object.__setattr__(self, "image_size", preprocessing_for(self.backbone, int(self.image_size) or None).crop)
        if self.feature_layer == "stage":
            stage_shape(self.backbone, self.image_size)  # refuses, in one line, a family without a known last stage

    @property
    def preprocessing(self) -> Preprocessing:
        return preprocessing_for(self.backbone, self.image_size)

    @property
    def name(self) -> str:
        """Readable id of the spec, used as the key of a bank among several in one search."""
        return f"{self.backbone}-{self.image_size}px-{self.feature_layer}-{self.policy}-k{self.views}"


@dataclass
class SplitFeatures:
    features: np.ndarray  # (N, K, D) float16 (float32 when float16 cannot hold them)
    targets: np.ndarray  # (N,) int64
    paths: list[str]  # relative to the dataset root, as in labels.csv

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class FeatureBank:
    spec: FeatureSpec
    weights: str  # the weights identity
    pretrained: bool
    classes: tuple[str, ...]
    splits: dict[str, SplitFeatures]
    mean: np.ndarray  # (D,) float32, over train view 0
    std: np.ndarray  # (D,) float32
    key: str = ""
    seconds: float = 0.0  # extraction time (0 when loaded from cache)
    from_cache: bool = False
    info: dict = field(default_factory=dict)
    # A stage bank's (feature_layer "stage") last stage at the backbone's weights: stage.StageTail's
    # state dict, what a trial tuning the stage starts from; its input shape is info["stage_shape"].
    stage: dict | None = None

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    def nbytes(self) -> int:
        return sum(s.features.nbytes for s in self.splits.values())


# ------------------------------------------------------------------------------------------ cache key
def data_fingerprint(table: LabelTable, splits) -> str:
    """Hash of labels.csv content plus size and mtime of every image in ``splits``."""
    h = hashlib.sha256()
    h.update(table.csv_path.read_bytes())
    h.update(str(table.root).encode())
    for split in splits:
        for p in table.paths(split):
            try:
                st = p.stat()
                h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}|missing\n".encode())
    return h.hexdigest()


def decode_policy(spec: FeatureSpec) -> dict:
    """How a pass decodes the images of ``spec`` (``data.decode_for``): train (augmented views) and the
    evaluation view. Part of the bank's cache key, so banks decoded another way are never reused."""
    pre = spec.preprocessing
    return {"train": decode_for(pre, spec.policy).to_dict(), "eval": decode_for(pre).to_dict()}


def bank_key(
    table: LabelTable, spec: FeatureSpec, weights_identity: str, splits, *, fingerprint: str | None = None
) -> str:
    """``fingerprint``: ``data_fingerprint(table, splits)`` when the caller has it (it stats every image)."""
    data = fingerprint if fingerprint is not None else data_fingerprint(table, splits)
    payload = json.dumps(
        {
            "format": BANK_FORMAT,
            "data": data,
            "spec": asdict(spec),
            "preprocessing": spec.preprocessing.to_dict(),
            "decode": decode_policy(spec),
            "weights": weights_identity,
            "splits": sorted(splits),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------ extraction
def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _forward_layers(backbone: FrozenBackbone, x: torch.Tensor, layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``backbone``'s output for each of ``layers`` from one forward pass.

    A backbone built for ``"logits"`` also yields ``"pooled"``: the input of its final classifier layer,
    which is exactly what the same network built for ``"pooled"`` (that layer cut) returns.
    """
    if layers == (backbone.feature_layer,):
        return {backbone.feature_layer: backbone(x)}
    if backbone.feature_layer != "logits" or set(layers) != {"logits", "pooled"}:
        raise ValueError(f"cannot give {layers} from a {backbone.feature_layer!r} backbone")
    seen = []
    _, _, classifier = final_layer(backbone.net)
    hook = classifier.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        logits = backbone(x)
    finally:
        hook.remove()
    return {"logits": logits, "pooled": pool_classifier_input(seen[0]).float()}


# float16 keeps 11 significant bits: a stored feature is within 2**-11 of its value, or of the batch's
# largest magnitude for values near zero. Beyond this, float16 has lost the numbers.
FLOAT16_RTOL = 2.0**-10


def fits_float16(f: np.ndarray) -> bool:
    """Whether float16 holds ``f`` (float32) to its own precision, relative to ``f``'s largest magnitude.

    Not when features overflow it (random-init Inception V3: torchvision's init draws every conv from a
    normal of std 0.1 and BatchNorm's running statistics are still 0 and 1, so activations grow ~10x per
    block, to ~1e11 at the pooled features) or underflow it (random-init GoogLeNet, std 0.01: ~1e-11,
    which float16 flushes to zero). Trained weights keep features in range; random ones need not."""
    scale = float(np.abs(f).max()) if f.size else 0.0
    if scale == 0.0 or not np.isfinite(scale):  # zeros, or a backbone that already gave inf/NaN
        return True
    with np.errstate(over="ignore", under="ignore"):
        error = np.abs(f.astype(np.float16).astype(np.float32) - f).max()
    return bool(error <= FLOAT16_RTOL * scale)


@torch.inference_mode()
def run_backbones(
    backbones: dict[str, tuple[FrozenBackbone, tuple[str, ...]]],
    loader,
    *,
    n: int,
    views: int,
    device: torch.device,
    desc: str = "extract",
    progress: bool = True,
    first: int = 0,
    preprocessing: Preprocessing | None = None,
) -> dict[tuple[str, str], np.ndarray]:
    """Pass every item of ``loader`` (decoded and transformed once) through each backbone; returns
    ``(n, views, D)`` per (backbone name, feature layer): float16, or float32 for features that float16
    cannot hold (:func:`fits_float16`; every reader casts to float32 anyway). ``first``: the dataset index
    of row 0 (a shard). uint8 batches are normalised on ``device`` with ``preprocessing``
    (``data.to_model_input``)."""
    out: dict[tuple[str, str], np.ndarray] = {}
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False, dynamic_ncols=True)
    for x, _, idx in loader:
        x = to_model_input(x, device, preprocessing)
        if x.dim() == 5:  # (B, V, 3, S, S) -> (B*V, 3, S, S)
            x = x.flatten(0, 1)
        x = x.contiguous(memory_format=torch.channels_last)
        rows = idx.numpy() - first
        for name, (backbone, layers) in backbones.items():
            got = _forward_in_parts(backbone, x, layers, device)
            for layer, f in got.items():
                arr = f.float().reshape(len(idx), views, -1).cpu().numpy()  # (B, V, D)
                if (name, layer) not in out:
                    out[name, layer] = np.empty((n, views, arr.shape[-1]), dtype=np.float16)
                if out[name, layer].dtype == np.float16 and not fits_float16(arr):
                    log.warning(
                        "%s (%s): features of magnitude %.3g do not fit float16 (largest 65504, smallest "
                        "normal 6.1e-05); this bank is kept in float32 (twice the size)",
                        name,
                        layer,
                        float(np.abs(arr).max()),
                    )
                    out[name, layer] = out[name, layer].astype(np.float32)  # the rows so far are exact in both
                out[name, layer][rows] = arr
        bar.update(len(idx))
    bar.close()
    if not out:
        raise UserError("no images to extract features from")
    return out


def _forward_in_parts(
    backbone: FrozenBackbone, x: torch.Tensor, layers: tuple[str, ...], device: torch.device
) -> dict[str, torch.Tensor]:
    """:func:`_forward_layers`, halving the batch while the GPU runs out of memory (the rows are
    independent: the same numbers, in more passes)."""
    try:
        with _autocast(device):
            return _forward_layers(backbone, x, layers)
    except torch.cuda.OutOfMemoryError:
        if len(x) == 1:
            raise UserError(
                f"backbone {backbone.name}: one image at {x.shape[-1]} px does not fit in the GPU's "
                "memory; choose a smaller backbone or image_size (`tune-rice backbones` lists "
                "their sizes)"
            ) from None
        torch.cuda.empty_cache()
        log.warning("%s: out of GPU memory at %d images per pass; splitting the batch", backbone.name, len(x))
        half = len(x) // 2
        a, b = (_forward_in_parts(backbone, part, layers, device) for part in (x[:half], x[half:]))
        return {k: torch.cat([a[k], b[k]]) for k in a}


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new allocation on ``device`` (None when unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


@functools.lru_cache(maxsize=64)
def activation_bytes(backbone: str, image_size: int) -> int:
    """Estimated float32 working memory of one image's forward pass: four times the largest output of
    any leaf module (a residual block holds its input, its output and a temporary or two), measured on
    the meta device."""
    net = shape_network(backbone)
    largest = [0]

    def hook(module, args, out):
        if isinstance(out, torch.Tensor):
            largest[0] = max(largest[0], out.numel())

    handles = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            net(torch.empty(1, 3, image_size, image_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return 4 * 4 * largest[0]


def fit_batch_size(specs, batch_size: int, device: torch.device, *, free: int | None = None) -> int:
    """The extraction batch (images per forward, views included) that the free memory holds for the
    largest of ``specs``: ``batch_size`` or less. Refuses a backbone whose working memory for one image
    does not fit, with what to change; a GPU batch that still runs out is split (``_forward_in_parts``)."""
    free = available_memory(device) if free is None else free
    if free is None:
        return batch_size
    per_image = max(activation_bytes(s.backbone, s.image_size) for s in specs)
    fits = int(MEMORY_SHARE * free // per_image)
    if fits < 1:
        worst = max(specs, key=lambda s: activation_bytes(s.backbone, s.image_size))
        raise UserError(
            f"backbone {worst.backbone} at {worst.image_size} px needs ~{per_image / 1e9:.1f} GB per "
            f"image to extract features and {free / 1e9:.1f} GB is free on {device}: choose a smaller "
            "backbone or image_size (`tune-rice backbones` lists them), or a machine with more memory"
        )
    if fits < batch_size:
        log.warning(
            "extraction batch lowered from %d to %d images per pass so that it fits in the free memory "
            "(%.1f GB on %s, ~%.0f MB per image)",
            batch_size,
            fits,
            free / 1e9,
            device,
            per_image / 1e6,
        )
        return fits
    return batch_size


def run_backbone(
    backbone: FrozenBackbone,
    loader,
    *,
    n: int,
    views: int,
    device: torch.device,
    desc: str = "extract",
    progress: bool = True,
    preprocessing: Preprocessing | None = None,
) -> np.ndarray:
    """Pass every item of ``loader`` through ``backbone``; returns ``(n, views, D)`` as :func:`run_backbones`."""
    key = (backbone.name, backbone.feature_layer)
    return run_backbones(
        {key[0]: (backbone, (key[1],))},
        loader,
        n=n,
        views=views,
        device=device,
        desc=desc,
        progress=progress,
        preprocessing=preprocessing,
    )[key]


def extract_bank(
    labels: str | os.PathLike | LabelTable, spec: FeatureSpec, *, weights: str | ResolvedWeights = "auto", **kwargs
) -> FeatureBank:
    """Return the feature bank for ``labels`` x ``spec`` x ``weights``, from the cache when it is there.

    Train gets ``spec.views`` views (view 0 un-augmented); every other split gets one un-augmented view.
    ``cache_dir=None`` uses ``$TUNE_RICE_CACHE/features`` (default ``~/.cache/tune_rice/features``).
    Other keyword arguments as for ``extract_banks``.
    """
    return extract_banks(labels, [spec], weights={spec.backbone: weights}, **kwargs)[spec.name]


def pass_key(spec: FeatureSpec) -> tuple:
    """Specs with the same pass key see the same input tensors: one decode and augmentation pass."""
    return spec.preprocessing, spec.policy, spec.views, spec.seed


def extract_banks(
    labels: str | os.PathLike | LabelTable,
    specs,
    *,
    weights: str | ResolvedWeights | dict = "auto",
    splits=("train", "valid"),
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: bool = True,
    use_cache: bool = True,
) -> dict[str, FeatureBank]:
    """The feature banks of several specs, by spec name, from the cache where they are there.

    The rest are extracted sharing work, with the same numbers as one at a time: the images are decoded
    and augmented once for all specs with the same image size, policy, views and seed, and a backbone
    wanted for both its pooled features and its logits runs once for the two. ``weights`` is one
    setting for every backbone, or a dict by backbone name.
    """
    table = labels if isinstance(labels, LabelTable) else read_labels(labels)
    splits = tuple(splits)
    plan = plan_banks(table, specs, weights=weights, splits=splits, cache_dir=cache_dir, use_cache=use_cache)
    resolved, keys, cache = plan.resolved, plan.keys, plan.cache
    banks: dict[str, FeatureBank] = {}
    for spec, final in plan.hits.items():
        try:
            banks[spec.name] = load_bank(final)
            log.info("feature bank %s: cache hit (%s)", spec.name, final)
        except (OSError, ValueError, KeyError, TypeError, EOFError, UserError) as e:
            log.warning("feature bank at %s is unreadable (%s): extracting again", final, e)
            shutil.rmtree(final, ignore_errors=True)  # else save_bank finds the key taken and keeps the broken one
            plan.todo.setdefault(pass_key(spec), []).append(spec)

    device = resolve_device(device)
    workers = loader_workers(device) if num_workers is None else num_workers
    for group in plan.todo.values():
        nets = pass_networks(group, resolved, device)
        batch = fit_batch_size(group, batch_size, device)
        t0 = time.perf_counter()
        parts = {
            split: [
                extract_pass_shard(
                    table,
                    group,
                    resolved,
                    split,
                    0,
                    len(table.split(split)),
                    device=device,
                    batch_size=batch,
                    num_workers=workers,
                    progress=progress,
                    nets=nets,
                )
            ]
            for split in splits
        }
        for bank in assemble_pass(table, group, resolved, keys, parts, time.perf_counter() - t0, device):
            if use_cache:
                save_bank(bank, cache / bank.key)
            banks[bank.spec.name] = bank
    return {spec.name: banks[spec.name] for spec in plan.specs}


@dataclass
class BankPlan:
    """What a set of specs needs: resolved weights and cache key per spec, the banks already in the cache
    (``hits``: spec -> folder) and the passes to run (``todo``: pass key -> specs sharing it)."""

    specs: list[FeatureSpec]
    resolved: dict
    keys: dict
    cache: Path
    hits: dict
    todo: dict


def plan_banks(
    table: LabelTable,
    specs,
    *,
    weights: str | ResolvedWeights | dict = "auto",
    splits=("train", "valid"),
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> BankPlan:
    """Resolve weights, key every bank and look each up in the cache (a folder every node may share)."""
    splits = tuple(splits)
    if "train" not in splits:
        raise ValueError("a feature bank needs the train split (its statistics standardise the head)")
    for s in splits:
        if table.split(s).empty:
            raise UserError(f"{table.csv_path}: split {s!r} has no images")
    specs = list(dict.fromkeys(specs))
    check_stage_memory(table, specs, splits)
    resolved = {}
    for spec in specs:
        w = weights.get(spec.backbone, "auto") if isinstance(weights, dict) else weights
        resolved[spec] = w if isinstance(w, ResolvedWeights) else resolve_weights(spec.backbone, w, seed=spec.seed)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fingerprint = data_fingerprint(table, splits)  # once: it reads labels.csv and stats every image
    keys = {spec: bank_key(table, spec, resolved[spec].identity, splits, fingerprint=fingerprint) for spec in specs}
    hits: dict[FeatureSpec, Path] = {}
    todo: dict[tuple, list[FeatureSpec]] = {}
    for spec in specs:
        if use_cache and (cache / keys[spec] / "meta.json").is_file():
            hits[spec] = cache / keys[spec]
        else:
            todo.setdefault(pass_key(spec), []).append(spec)
    return BankPlan(specs=specs, resolved=resolved, keys=keys, cache=cache, hits=hits, todo=todo)


def stage_bank_bytes(table: LabelTable, spec: FeatureSpec, splits) -> int:
    """Bytes of ``spec``'s stage bank over ``splits``: every train image ``spec.views`` times, every other once."""
    rows = sum(len(table.split(s)) * (spec.views if s == "train" else 1) for s in splits)
    return rows * bank_bytes_per_view(spec.backbone, spec.image_size)


def check_stage_memory(table: LabelTable, specs, splits, *, free: int | None = None) -> None:
    """Refuse stage banks (``feature_layer="stage"``) that together exceed ``MEMORY_SHARE`` of this node's
    free memory, before any image is decoded: they are held in memory by every search that trains on them."""
    stage = [s for s in specs if s.feature_layer == "stage"]
    if not stage:
        return
    need = sum(stage_bank_bytes(table, s, splits) for s in stage)
    for s in stage:
        log.info(
            "stage bank %s: %.1f KB per image and view (the %s activations entering the last stage, float16)",
            s.name,
            bank_bytes_per_view(s.backbone, s.image_size) / 1e3,
            "x".join(map(str, stage_shape(s.backbone, s.image_size))),
        )
    free = available_memory(torch.device("cpu")) if free is None else free
    if free is not None and need > MEMORY_SHARE * free:
        worst = max(stage, key=lambda s: stage_bank_bytes(table, s, splits))
        raise UserError(
            f"stage banks need {need / 1e9:.2f} GB ({worst.backbone} at {worst.image_size} px: "
            f"{bank_bytes_per_view(worst.backbone, worst.image_size) / 1e3:.0f} KB per image and view, "
            f"{worst.views} train views) and this node has {free / 1e9:.1f} GB free: lower image_size or "
            "views, or set tune_last_stage: false"
        )


def _net_key(spec: FeatureSpec, resolved: dict) -> str:  # one network per backbone and weights within a pass
    # a stage bank's network stops at the last stage: one of its own
    return f"{spec.backbone}|{resolved[spec].identity}" + ("|stage" if spec.feature_layer == "stage" else "")


def shard_align(spec: FeatureSpec, split: str, batch_size: int = 64) -> int:
    """Images per extraction batch of ``split``: shards that start at multiples of it put the same images
    in the same batches as one whole pass, so they give bit-identical features (as long as no shard's
    device has to lower the batch to fit its memory: see fit_batch_size)."""
    return max(1, batch_size // (spec.views if split == "train" else 1))


def pass_networks(group: list[FeatureSpec], resolved: dict, device: torch.device) -> dict:
    """The networks of one pass: one per backbone and weights (the seed is the pass's), built for logits
    when any spec wants them (its pooled features come from the same pass)."""
    wanted: dict[str, tuple[FeatureSpec, set[str]]] = {}
    for spec in group:
        wanted.setdefault(_net_key(spec, resolved), (spec, set()))[1].add(spec.feature_layer)
    nets: dict[str, tuple[FrozenBackbone, tuple[str, ...]]] = {}
    for name, (spec, layers) in wanted.items():
        backbone, _ = build_backbone(
            spec.backbone,
            weights=resolved[spec],
            seed=spec.seed,
            feature_layer="logits" if "logits" in layers else "pooled",
        )
        if layers == {"stage"}:
            backbone = StagePrefix(backbone)
        nets[name] = (backbone.to(device).to(memory_format=torch.channels_last), tuple(sorted(layers)))
    return nets


def pass_dataset(table: LabelTable, group: list[FeatureSpec], split: str) -> ImageDataset:
    """The images of ``split`` as one pass decodes them: train with the pass's K views (view 0 the plain
    eval transform, the others augmented with the pass's seed), valid with one. Files are decoded as
    ``data.decode_for`` says for the views (the JPEG draft scale, one resize to the working size); items
    are uint8, normalised on the device (``run_backbones``)."""
    first = group[0]
    eval_tf = build_transform(first.preprocessing, train=False, normalize=False)
    train_tf = build_transform(first.preprocessing, train=True, policy=first.policy, normalize=False)
    views = first.views if split == "train" else 1
    return dataset_for_split(
        table, split, train_tf if views > 1 else eval_tf, views=views, first_transform=eval_tf, seed=first.seed
    )


def extract_pass_shard(
    table: LabelTable,
    group: list[FeatureSpec],
    resolved: dict,
    split: str,
    start: int,
    stop: int,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
    nets: dict | None = None,
) -> dict[str, np.ndarray]:
    """Images ``start:stop`` of ``split`` through the networks of one pass (specs sharing ``pass_key``);
    returns ``(stop - start, views, D)`` (dtype as run_backbones; np.concatenate of shards promotes) by ``"<backbone>|<weights>|<layer>"``. Augmentation is a
    function of (seed, image index), so a shard's views are those of a whole pass. ``nets``: from
    ``pass_networks`` (built here when not given)."""
    device = resolve_device(device)
    nets = nets if nets is not None else pass_networks(group, resolved, device)
    batch = fit_batch_size(group, batch_size, device)
    ds = pass_dataset(table, group, split)
    views = ds.views
    images = ds if (start, stop) == (0, len(ds)) else torch.utils.data.Subset(ds, range(start, stop))
    loader = pass_loader(images, device, batch_size=max(1, batch // views), num_workers=num_workers)
    out = run_backbones(
        nets,
        loader,
        n=stop - start,
        views=views,
        device=device,
        desc=f"features {split}",
        progress=progress,
        first=start,
        preprocessing=group[0].preprocessing,
    )
    return {f"{name}|{layer}": f for (name, layer), f in out.items()}


def pass_loader(images, device: torch.device, *, batch_size: int, num_workers: int) -> DataLoader:
    """The loader of an extraction pass: in order, ``num_workers`` decoding processes a few batches
    ahead, and (on CUDA) pinned batches so that the copy to the GPU is asynchronous."""
    return DataLoader(
        images,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        **loader_options(device, num_workers),
    )


def loader_options(device: torch.device | str, num_workers: int) -> dict:
    """DataLoader settings for a loader that feeds ``device``: pinned memory on CUDA (the batches then go
    over with ``non_blocking`` copies), and ``num_workers`` workers each keeping 4 batches ready."""
    return {
        "pin_memory": torch.device(device).type == "cuda",
        "persistent_workers": False,
        "prefetch_factor": 4 if num_workers else None,
    }


def assemble_pass(
    table: LabelTable,
    group: list[FeatureSpec],
    resolved: dict,
    keys: dict,
    parts: dict[str, list[dict[str, np.ndarray]]],
    seconds: float,
    device: str | torch.device,
) -> list[FeatureBank]:
    """The banks of one pass from its shards: per split, the shards' arrays concatenated in order."""
    banks = []
    for spec in group:
        name = f"{_net_key(spec, resolved)}|{spec.feature_layer}"
        result = {
            split: SplitFeatures(
                np.concatenate([p[name] for p in shards]) if len(shards) > 1 else shards[0][name],
                table.targets(split),
                list(table.split(split)["path"]),
            )
            for split, shards in parts.items()
        }
        bank = _finish_bank(table, spec, resolved[spec], result, keys[spec], seconds, device, shared=len(group))
        if spec.feature_layer == "stage":
            bank.stage = initial_stage(spec, resolved[spec])
            bank.info["stage_shape"] = list(stage_shape(spec.backbone, spec.image_size))
        banks.append(bank)
    return banks


def initial_stage(spec: FeatureSpec, resolved: ResolvedWeights) -> dict:
    """The last stage of ``spec``'s backbone at ``resolved`` weights (StageTail's state dict, on the CPU)."""
    backbone, _ = build_backbone(spec.backbone, weights=resolved, seed=spec.seed)
    return {k: v.detach().cpu().clone() for k, v in StageTail(backbone.net, name=spec.backbone).state_dict().items()}


def _finish_bank(
    table: LabelTable,
    spec: FeatureSpec,
    resolved: ResolvedWeights,
    result: dict[str, SplitFeatures],
    key: str,
    seconds: float,
    device: str | torch.device,
    *,
    shared: int,
) -> FeatureBank:
    """A FeatureBank from extracted splits, with the train view-0 statistics that standardise a head."""
    train0 = result["train"].features[:, 0, :].astype(np.float32)  # (N, D)
    n_images = sum(len(s) for s in result.values())
    n_views = sum(len(s) * s.features.shape[1] for s in result.values())
    bank = FeatureBank(
        spec=spec,
        weights=resolved.identity,
        pretrained=resolved.pretrained,
        classes=table.classes,
        splits=result,
        mean=train0.mean(0),
        std=train0.std(0),
        key=key,
        seconds=seconds,
        from_cache=False,
        info={
            "images": n_images,
            "views": n_views,
            "device": str(device),
            "images_per_s": n_images / max(seconds, 1e-9),
            "views_per_s": n_views / max(seconds, 1e-9),
            "extracted_with": shared,
        },
    )
    log.info(
        "feature bank %s: %d images, %d backbone passes in %.1fs (%.1f img/s)%s, %.1f MB",
        spec.name,
        n_images,
        n_views,
        seconds,
        bank.info["images_per_s"],
        f" (one decode pass shared by {shared} banks)" if shared > 1 else "",
        bank.nbytes() / 1e6,
    )
    return bank


# ------------------------------------------------------------------------------------------ disk format
# A bank is written to ".<key>.tmp-<host>-<pid>-<random>" and renamed into place when complete.
_TEMP = re.compile(r"^\..+\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")
_ANY_TEMP = re.compile(r"^\..+\.tmp-")  # also the older ".<key>.tmp-<pid>-<random>"
# A write in progress adds files to its folder every few seconds. A folder untouched this long whose
# process is gone (same host) is abandoned; pid checks alone could be fooled by a reused pid or by a
# container that shares the host name but not the pid namespace.
STALE_TEMP_S = 10 * 60
# From another host (a shared cache), or in the older naming: untouched for a day.
STALE_FOREIGN_TEMP_S = 24 * 3600


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_stale_temps(cache_dir: Path) -> list[Path]:
    """Remove the temp folders of bank writes that were killed: from this host, those whose process is
    gone and that were untouched for ``STALE_TEMP_S``; any other, untouched for ``STALE_FOREIGN_TEMP_S``.
    Returns what was removed."""
    removed, host, now = [], socket.gethostname(), time.time()
    for entry in Path(cache_dir).iterdir() if Path(cache_dir).is_dir() else ():
        if not _ANY_TEMP.match(entry.name):
            continue
        m = _TEMP.match(entry.name)
        try:
            if not entry.is_dir():
                continue
            idle = now - entry.stat().st_mtime
        except OSError:  # removed meanwhile
            continue
        pid = int(m["pid"]) if m is not None and m["host"] == host else None  # a write from this host
        stale = idle > STALE_FOREIGN_TEMP_S or (
            pid is not None and idle > STALE_TEMP_S and pid != os.getpid() and not _alive(pid)
        )
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            log.info("removed %s, left by a bank write that did not finish", entry)
    return removed


def save_bank(bank: FeatureBank, final: Path) -> Path:
    """Write the bank under ``final`` atomically: a temp folder renamed into place when complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(final.parent)
    tmp = final.parent / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for split, sf in bank.splits.items():
            np.save(tmp / f"{split}_features.npy", sf.features)
            np.save(tmp / f"{split}_targets.npy", sf.targets)
            (tmp / f"{split}_paths.json").write_text(json.dumps(sf.paths))
        np.save(tmp / "mean.npy", bank.mean)
        np.save(tmp / "std.npy", bank.std)
        if bank.stage is not None:
            torch.save(bank.stage, tmp / "stage.pt")
        meta = {
            "format": BANK_FORMAT,
            "spec": asdict(bank.spec),
            "weights": bank.weights,
            "pretrained": bank.pretrained,
            "classes": list(bank.classes),
            "splits": list(bank.splits),
            "key": bank.key,
            "seconds": bank.seconds,
            "info": bank.info,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks a complete bank
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # a folder that is not a complete bank: replace it
                shutil.rmtree(final, ignore_errors=True)
                try:
                    os.rename(tmp, final)
                except OSError:
                    pass
            # else another process finished the same bank first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_bank(path: str | os.PathLike) -> FeatureBank:
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != BANK_FORMAT:
        raise ValueError(f"bank format {meta.get('format')} != {BANK_FORMAT}")
    splits = {}
    for split in meta["splits"]:
        splits[split] = SplitFeatures(
            np.load(path / f"{split}_features.npy"),
            np.load(path / f"{split}_targets.npy"),
            json.loads((path / f"{split}_paths.json").read_text()),
        )
    return FeatureBank(
        spec=FeatureSpec(**meta["spec"]),
        weights=meta["weights"],
        pretrained=meta["pretrained"],
        classes=tuple(meta["classes"]),
        splits=splits,
        mean=np.load(path / "mean.npy"),
        std=np.load(path / "std.npy"),
        key=meta["key"],
        seconds=0.0,
        from_cache=True,
        info=meta.get("info", {}),
        stage=safe_torch_load(path / "stage.pt", what="stage bank") if (path / "stage.pt").is_file() else None,
    )


def by_reference(banks: dict) -> bool:
    """Whether ``banks`` are references to banks in the object store (shards.BankRef), not the arrays."""
    return any(hasattr(b, "ref") for b in banks.values())


def pooled_banks(banks: dict | None) -> dict | None:
    """``banks`` (FeatureBank or shards.BankRef by spec name) without the stage banks."""
    if banks is None:
        return None
    # a shards.BankRef has no spec, only the spec's name: "<backbone>-<size>px-<layer>-<policy>-k<views>"
    return {
        name: b
        for name, b in banks.items()
        if (b.spec.feature_layer if hasattr(b, "spec") else name.split("px-", 1)[-1].split("-", 1)[0]) != "stage"
    }
