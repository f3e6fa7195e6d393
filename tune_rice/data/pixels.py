"""The evaluation preprocessing as a graph: an 8-bit RGB batch (B, H, W, 3) at any H, W in, the
normalised crop (B, 3, S, S) out, with the numbers of ``data.build_transform(train=False)`` on a PIL image
(what ``predict`` runs), so that an exported model can take raw pixels (``export --raw-input``).

PIL resizes in two passes, horizontal then vertical, each a convolution whose triangle (bilinear) or
cubic (bicubic, a = -0.5) filter is widened by the downscale factor (its antialiasing), each rounded to
8 bits. Here each pass is one matrix product with the same weights, rounded the same way; only the crop's
rows and columns are computed. The weights are built from H and W inside the graph, from ``arange`` and
elementwise arithmetic, so TorchScript and ONNX both carry them with H and W free. The cost of a pass is
about 3 * H * W * S multiply-adds (a dense matrix): a caller with a large photo saves time by decoding or
scaling it down first to a short side of at least ``resize`` px, as ``predict`` does with the JPEG draft
scale. The rest is ``T.CenterCrop`` (its rounding of the offset, half to even), pixel/255 and
``(x - mean) / std``.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import UserError
from .images import Preprocessing

# PIL's nearest-neighbour resize steps through the source by a running sum in double precision, so which
# pixel it picks where a centre falls on a pixel boundary depends on rounding a graph cannot reproduce.
RAW_INTERPOLATIONS = ("bilinear", "bicubic")


def _filter_weights(t: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's filter at offsets ``t`` (in filter units): ``bilinear`` the triangle, ``bicubic`` Keys' cubic."""
    x = t.abs()
    if interpolation == "bicubic":
        a = -0.5  # PIL's cubic (torch's non-antialiased bicubic uses -0.75)
        near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
        zero = torch.zeros_like(x)
        return torch.where(x < 1.0, near, torch.where(x < 2.0, far, zero))
    return torch.clamp(1.0 - x, min=0.0)


def resize_weights(n_in: int, n_out: int, first: int, count: int, interpolation: str) -> torch.Tensor:
    """(count, n_in): row i weighs the source pixels into output pixel ``first + i`` of a resize from
    ``n_in`` to ``n_out`` px, as PIL's ``Image.resize`` does with ``interpolation`` (bilinear or bicubic)."""
    scale = float(n_in) / float(n_out)
    out = torch.arange(count, dtype=torch.float32) + float(first)
    centre = (out + 0.5) * scale  # (count,): where each output pixel's centre falls in the source
    src = torch.arange(n_in, dtype=torch.float32)
    stretch = max(scale, 1.0)  # the filter widens by the downscale factor: the antialiasing
    w = _filter_weights((src.unsqueeze(0) + 0.5 - centre.unsqueeze(1)) / stretch, interpolation)
    return w / w.sum(dim=1, keepdim=True)


def _half_even(d: int) -> int:
    """``round(d / 2)`` as Python rounds it (half to even), for an integer ``d`` >= 0: the centre crop's offset."""
    k = d // 2
    return k if d % 2 == 0 else k + k % 2


def _round_u8(x: torch.Tensor) -> torch.Tensor:
    """PIL's rounding of a pass to 8 bits: half up, clipped to 0..255 (kept as float)."""
    return torch.clamp(torch.floor(x + 0.5), 0.0, 255.0)


class RawPreprocess(nn.Module):
    """uint8 (B, H, W, 3) RGB -> float32 (B, 3, S, S), normalised as the model's ``preprocessing`` says."""

    def __init__(self, preprocessing: dict | Preprocessing):
        super().__init__()
        pre = preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing.from_dict(preprocessing)
        if pre.interpolation not in RAW_INTERPOLATIONS:
            raise UserError(
                f"raw-pixel input: the model resizes with {pre.interpolation!r} interpolation; only "
                f"{' and '.join(RAW_INTERPOLATIONS)} are reproduced in the graph (export without --raw-input)"
            )
        self.crop = int(pre.crop)
        self.resize = int(pre.resize)
        self.interpolation = str(pre.interpolation)
        self.mean = [float(v) for v in pre.mean]
        self.std = [float(v) for v in pre.std]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        h, w = int(image.shape[1]), int(image.shape[2])
        # T.Resize(resize): the short side to `resize`, the long one in proportion, rounded down
        if h <= w:
            new_h, new_w = self.resize, (self.resize * w) // h
        else:
            new_h, new_w = (self.resize * h) // w, self.resize
        top, left = _half_even(new_h - self.crop), _half_even(new_w - self.crop)
        rows = resize_weights(h, new_h, top, self.crop, self.interpolation).to(image.device)  # (S, H)
        cols = resize_weights(w, new_w, left, self.crop, self.interpolation).to(image.device)  # (S, W)
        x = image.permute(0, 3, 1, 2).to(torch.float32)  # (B, 3, H, W)
        x = _round_u8(torch.matmul(x, cols.t()))  # horizontal pass: (B, 3, H, S)
        x = _round_u8(torch.matmul(rows, x))  # vertical pass: (B, 3, S, S)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return (x / 255.0 - mean) / std


class RawInputModel(nn.Module):
    """uint8 (B, H, W, 3) RGB -> calibrated class probabilities (B, C): :class:`RawPreprocess`, the
    classifier (its logits already divided by the model's temperature), softmax."""

    def __init__(self, classifier: nn.Module, preprocessing: dict | Preprocessing):
        super().__init__()
        self.preprocess = RawPreprocess(preprocessing)
        self.classifier = classifier

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(self.preprocess(image)), dim=1)
