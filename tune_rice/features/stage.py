"""The backbone's last stage: where it starts, the frozen prefix before it, and the stage as a module.

A backbone splits into a frozen prefix (everything before its last stage) and the last stage with its
pooling. The prefix, frozen and in eval mode, gives the same output for the same input, so a stage bank
stores it (float16, ``features.py``) and trials that tune the stage (``finetune.py``) start from there.

Supported families, each with the modules its stage is made of:

- torchvision ResNet (resnet18/34/50/...): ``layer4``, then average pooling;
- torchvision EfficientNet (efficientnet_b0..b7, v2): its last block group ``features[-2]`` and the
  1x1 head convolution ``features[-1]``, then average pooling;
- timm EfficientNet (``timm:tf_efficientnet_lite0`` and the family): ``blocks[-1]``, ``conv_head``,
  ``bn2``, then its ``global_pool``.

Any other backbone is refused with one line. No Ray here.
"""

from __future__ import annotations

import copy
import functools

import torch
import torchvision
from torch import nn

from .. import UserError
from . import timm_zoo
from .backbones import shape_network
from .model import FrozenBackbone

SUPPORTED = "torchvision ResNet and EfficientNet, timm EfficientNet (e.g. timm:tf_efficientnet_lite0)"


def stage_layout(net: nn.Module, name: str = "") -> tuple[list[str], nn.Module]:
    """The names of the last stage's modules in ``net``, in the order they run, and (a copy of) the
    pooling that follows them and gives the pooled features."""
    if isinstance(net, torchvision.models.ResNet):
        return ["layer4"], nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    if isinstance(net, torchvision.models.EfficientNet):
        n = len(net.features)
        return [f"features.{n - 2}", f"features.{n - 1}"], nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    parts = ("blocks", "conv_head", "bn2", "global_pool")
    if timm_zoo.is_timm_network(net) and all(hasattr(net, a) for a in parts):
        blocks = list(net.get_submodule("blocks").children())
        return [f"blocks.{len(blocks) - 1}", "conv_head", "bn2"], copy.deepcopy(net.get_submodule("global_pool"))
    raise UserError(
        f"backbone {name or type(net).__name__}: last-stage tuning supports {SUPPORTED}; "
        "use tune_last_stage: false for this backbone"
    )


class _Reached(Exception):
    """Raised by the hook that caught the stage's input: the rest of the network need not run."""


def stage_input(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``net``'s activations entering its last stage for images ``x``: (B, 3, S, S) -> (B, C, H, W)."""
    first = net.get_submodule(stage_layout(net)[0][0])
    seen: list[torch.Tensor] = []

    def hook(module, args):
        seen.append(args[0])
        raise _Reached

    handle = first.register_forward_pre_hook(hook)
    try:
        net(x)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0]


class StagePrefix(FrozenBackbone):
    """The frozen network up to its last stage: images (B, 3, S, S) -> the stage's input flattened
    (B, C*H*W), what a stage bank stores (``feature_layer="stage"``)."""

    def __init__(self, backbone: FrozenBackbone):
        stage_layout(backbone.net, backbone.name)  # refuses an unsupported family before any work
        super().__init__(backbone.net, name=backbone.name, feature_layer="stage")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # the same arithmetic as FrozenBackbone.forward
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return stage_input(self.net, x).flatten(1).float()
        return stage_input(self.net, x).flatten(1)


class StageTail(nn.Module):
    """The last stage and its pooling as a trainable module: the stage's input (B, C, H, W) -> pooled
    features (B, D), the numbers the frozen backbone gives when the stage holds its original weights.

    ``bn="frozen"``: the stage's BatchNorm layers keep their running statistics (eval mode whatever
    ``train()`` says; their affine weights still train); ``"update"``: they follow the batches."""

    def __init__(self, net: nn.Module, *, name: str = "", bn: str = "frozen"):
        super().__init__()
        if bn not in ("frozen", "update"):
            raise UserError(f"stage_bn must be frozen or update, got {bn!r}")
        self.names, pool = stage_layout(net, name)
        self.stage = nn.ModuleList(copy.deepcopy(net.get_submodule(n)) for n in self.names)
        self.pool = pool
        self.bn = bn
        for p in self.stage.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> StageTail:
        super().train(mode)
        if mode and self.bn == "frozen":
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, D)
        for module in self.stage:
            x = module(x)
        return self.pool(x)

    def put_into(self, net: nn.Module) -> nn.Module:
        """Copy this stage's numbers into ``net`` (the same architecture) in place; returns it."""
        for name, module in zip(self.names, self.stage):
            net.get_submodule(name).load_state_dict(module.state_dict())
        return net


@functools.lru_cache(maxsize=64)
def stage_shape(backbone: str, image_size: int) -> tuple[int, int, int]:
    """(C, H, W) of the activations entering ``backbone``'s last stage at ``image_size`` px (meta device)."""
    net = shape_network(backbone)
    stage_layout(net, backbone)  # refuses an unsupported family, naming the backbone
    with torch.no_grad():
        out = stage_input(net, torch.empty(1, 3, image_size, image_size, device="meta"))
    c, h, w = out.shape[1:]
    return int(c), int(h), int(w)


def bank_bytes_per_view(backbone: str, image_size: int) -> int:
    """Bytes one image view takes in a stage bank: the stage input's C*H*W values in float16."""
    c, h, w = stage_shape(backbone, image_size)
    return 2 * c * h * w
