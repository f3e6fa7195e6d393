"""Near-duplicate grouping: candidate pairs from perceptual hashes, then a finer check of every pair.

A copy in train and its original in test turn the test score into a memory test, so copies must share
a split. Public image sets hold many kinds of copy: re-encoded, resized, brightened, cropped, shifted,
flipped and rotated ones. And they hold many *distinct* images that look alike as a whole (one leaf,
centred, on the same grey sheet): a coarse hash cannot tell those apart, and joining every pair it
finds chains a whole class into one group. So two stages:

1. **Candidates** (cheap, sub-quadratic, errs towards too many). Each image gets three kinds of code:
   a perceptual DCT hash made blind to flips and 90-degree rotations (:func:`phash_bits`; it catches
   re-encoded, resized, brightened, flipped and rotated copies), a code of its colour and gradient
   histograms, which ignore where things are (:func:`histogram_codes`), and codes of 16 blurred views,
   the whole image and 15 crops of up to 10% per side (:func:`view_vectors`, :func:`view_codes`; a cut
   or moved copy matches one crop of its source where its hashes no longer do). For each code, the
   codes are sorted with each of 8 bands of 8 bits first in turn, and each image is paired with its
   nearest few (fewest differing bits) of the codes near it in those orders (:func:`candidate_pairs`,
   :func:`crop_pairs`): ``O(N log N)`` per band, a bounded number of pairs per image whatever the data.
2. **Verification** (finer, independent of the codes). The two images' 72 px greyscale thumbnails are
   aligned -- flips and rotations tried, then a scale and shift per axis estimated from their row
   and column profiles -- and compared by normalised correlation over the overlap, both of the
   thumbnails and of their fine detail (the thumbnail minus its blur), which is what tells two
   similar leaves apart (:func:`verify_pairs`). A pair is a near copy only if both pass; a pair that
   only the views proposed must reach a higher detail similarity (0.85). The profiles of a cut or
   moved copy can change shape enough to fool that estimate (a 9 px shift read as a 0.83x scale), so
   a pair that fails is aligned again from the map its ORB keypoints agree on
   (:func:`keypoint_aligned`) and compared the same way; the better alignment counts
   (:func:`check_pairs`).
3. **Confirmation** (only for pairs that passed at a detail similarity below 0.9). Two distinct leaves
   of the same layout on the same sheet can pass the thumbnail check at up to 0.86, where a cut or
   moved copy may score 0.71, so no threshold on it tells them apart. Such a pair must also share at
   least 15 ORB keypoints of its 128 px greyscale images that one similarity transform maps onto each
   other (RANSAC inliers, :func:`keypoint_inliers`; look-alikes share 12 at most), or, as plain leaves
   give few keypoints (copies there may share only 5), pass the check again on the 128 px images at
   a detail similarity of 0.8 and an outline of 0.98, where veins and marks the thumbnail blurs away
   tell look-alikes apart (copies 0.85 or more, look-alikes 0.73 or less on the generated sets).
4. **Noise.** Sensor noise in small images lowers the detail similarity of a copy under 0.7 (0.33-0.69
   on noisy 96 px leaves) but not the geometry of its keypoints: a pair whose outlines still correlate
   (0.8 or more) and that shares at least 30 keypoint inliers (copies there: 33-160; look-alikes: 12 at
   most) passes the check however low its detail similarity (:func:`check_pairs`).

Groups are joined only through verified pairs, and only when one of the two groups' centres passes the
check against every member of both, and every member of one group passes a looser check against every
member of the other (the first 8 of each; :func:`group_images`; these checks try every flip and turn
aligned from the keypoints, as two copies of one source, one mirrored and one moved, differ by both):
no member is more than two checks from another, so a chain of gradually changing images, each close
to the next, does not become one group.
Exact byte copies are always joined.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image
from scipy import fft as sfft
from scipy import ndimage

log = logging.getLogger(__name__)

THUMB = 72  # side of the greyscale thumbnail kept per image for the check (5 kB each)
FINE = 128  # side of the greyscale image kept per image for the keypoint check (16 kB each)
MODES = ("near", "exact", "off")
# Candidates further apart than this (bits of the perceptual hash, of the histogram code) are not checked.
_MAX_BITS = (12, 12)
DEFAULT_MIN_SIMILARITY = 0.7
DEFAULT_MIN_OUTLINE = 0.9
_HIST_SIDE = 48
_PHASH_SIDE = 32
_PHASH_BLOCK = 11  # the 11x11 lowest DCT frequencies give 65 symmetric magnitudes, 64 kept


# ------------------------------------------------------------------------------------ per image
@dataclass
class Signature:
    """What the grouping needs of one image, computed once while the image is decoded."""

    phash: int  # 64-bit perceptual hash, the same for the image flipped or rotated by 90 degrees
    hist: np.ndarray  # (HIST_DIM,) float32: colour and gradient histograms of the inner 84%
    thumb: np.ndarray  # (THUMB, THUMB) uint8 greyscale, aspect ratio ignored
    fine: np.ndarray  # (FINE, FINE) uint8 greyscale, aspect ratio ignored
    views: np.ndarray  # (len(VIEWS), VIEW_GRID**2) float16: the blurred inner area of the whole and of crops


_IU = [(u, v) for u in range(_PHASH_BLOCK) for v in range(u, _PHASH_BLOCK) if (u, v) != (0, 0)][:64]
_IU_A = np.array([p[0] for p in _IU])
_IU_B = np.array([p[1] for p in _IU])


def phash_bits(grey32: np.ndarray) -> np.ndarray:
    """(..., 64) bool perceptual-hash bits of (..., 32, 32) greyscale thumbnails.

    imagehash's pHash thresholds the 8x8 lowest DCT coefficients at their median. Flipping an image
    only changes the signs of some coefficients, and a 90-degree turn transposes them, so here the
    magnitudes ``|c(u,v)| + |c(v,u)|`` (u <= v, the 11x11 lowest, DC left out) are thresholded at
    their median instead: one hash per image that the 8 flips and turns share.
    """
    c = np.abs(sfft.dctn(np.asarray(grey32, dtype=np.float64), type=2, axes=(-2, -1)))
    m = c[..., _IU_A, _IU_B] + c[..., _IU_B, _IU_A]  # (..., 64)
    return m > np.median(m, axis=-1, keepdims=True)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(..., 64) bool -> (...,) uint64, the first bit most significant."""
    return np.packbits(bits, axis=-1).view(">u8")[..., 0].astype(np.uint64)


HIST_DIM = 6**3 + 12


def _histograms(rgb: np.ndarray) -> np.ndarray:
    """(HIST_DIM,) float32 of an (S, S, 3) float RGB thumbnail in 0..1: where things are does not count.

    A 6x6x6 colour histogram and a 12-bin histogram of log gradient magnitude, both of the inner 84%
    (shifts fill the edges with black, crops cut them off), square-rooted so the rare colours of
    small marks count; flips, turns, shifts and crops barely change either.
    """
    b = rgb.shape[0] // 12 + 1
    inner = rgb[b:-b, b:-b]
    q = np.minimum((inner * 6).astype(np.int64), 5)
    colour = np.bincount(((q[..., 0] * 6 + q[..., 1]) * 6 + q[..., 2]).ravel(), minlength=216)
    grey = ndimage.gaussian_filter(inner.mean(-1), 0.7)
    gy, gx = np.gradient(grey)
    grad = np.histogram(np.log(np.hypot(gx, gy) + 1e-3), bins=12, range=(np.log(1e-3), 0.0))[0]
    colour = np.sqrt(colour / max(colour.sum(), 1))
    grad = np.sqrt(grad / max(grad.sum(), 1))
    return np.concatenate([colour, 0.7 * grad]).astype(np.float32)


# The crops a view is taken of, per axis: (cut at the start, cut at the end) as fractions of the side.
# A copy cut by up to 10% per side lands near one of the 16 crops (both axes) of its source.
_CROPS = ((0.0, 0.0), (0.08, 0.08), (0.1, 0.02), (0.02, 0.1))
VIEWS = [(y, x) for y in _CROPS for x in _CROPS]  # (y crop, x crop); VIEWS[0] is the whole image
VIEW_GRID = 8
_VIEW_BLUR, _VIEW_INNER = 2.5, (0.12, 0.88)  # px of the 48 px thumbnail; the inner part of each crop


def view_vectors(grey: np.ndarray) -> np.ndarray:
    """(len(VIEWS), VIEW_GRID**2) unit vectors of a (48, 48) float greyscale thumbnail, zero mean each.

    Each view is the inner 76% of one crop (:data:`VIEWS`) of the blurred thumbnail, sampled on an 8x8
    grid: the blur (2.5 px of 48) and the coarse grid make it blind to shifts of a few percent, and the
    crops make a cut copy match one view of its source (its whole view matches one of the source's
    crops) where the whole images no longer do.
    """
    blurred = ndimage.gaussian_filter(np.asarray(grey, dtype=np.float64), _VIEW_BLUR, mode="nearest")
    side = blurred.shape[0]
    lo, hi = _VIEW_INNER
    u = lo + (np.arange(VIEW_GRID) + 0.5) / VIEW_GRID * (hi - lo)  # (G,) inside the crop, 0..1

    def at(cut: tuple[float, float]) -> np.ndarray:
        return (cut[0] + u * (1 - cut[0] - cut[1])) * side - 0.5

    grids = [np.meshgrid(at(cy), at(cx), indexing="ij") for cy, cx in VIEWS]
    yy, xx = np.stack([g[0] for g in grids]), np.stack([g[1] for g in grids])  # (V, G, G)
    v = ndimage.map_coordinates(blurred, [yy.ravel(), xx.ravel()], order=1, mode="nearest").reshape(len(VIEWS), -1)
    v = v - v.mean(axis=1, keepdims=True)
    return v / (np.linalg.norm(v, axis=1, keepdims=True) + 1e-9)


def signature(image: Image.Image) -> Signature:
    """The :class:`Signature` of a decoded image (any size; a JPEG draft of >= 128 px is plenty)."""
    rgb = image.convert("RGB")
    small = rgb.resize((_HIST_SIDE, _HIST_SIDE), Image.Resampling.BOX, reducing_gap=2.0)
    grey = small.convert("L")
    hist = _histograms(np.asarray(small, dtype=np.float32) / 255.0)
    g32 = np.asarray(rgb.convert("L").resize((_PHASH_SIDE, _PHASH_SIDE), Image.Resampling.LANCZOS))
    phash = int(pack_bits(phash_bits(g32)))
    thumb = np.asarray(grey if THUMB == _HIST_SIDE else rgb.convert("L").resize((THUMB, THUMB), Image.Resampling.BOX))
    views = view_vectors(np.asarray(grey, dtype=np.float64) / 255.0).astype(np.float16)
    fine = np.asarray(rgb.convert("L").resize((FINE, FINE), Image.Resampling.BOX))
    return Signature(
        phash=phash,
        hist=hist,
        thumb=np.ascontiguousarray(thumb, dtype=np.uint8),
        fine=np.ascontiguousarray(fine, dtype=np.uint8),
        views=views,
    )


# ------------------------------------------------------------------------------------ candidates
_M1, _M2, _M4 = np.uint64(0x5555555555555555), np.uint64(0x3333333333333333), np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


def _popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64 (SWAR fallback for numpy < 2.0, which lacks bitwise_count)."""
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return ((x * _H01) >> np.uint64(56)).astype(np.uint8)


popcount = getattr(np, "bitwise_count", _popcount64)


def histogram_codes(hists: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """(N,) uint64 random-hyperplane codes of (N, HIST_DIM) histograms, centred on their mean.

    Two histograms at angle a differ in about 64 * a / pi bits. The hyperplanes are fixed (``seed``),
    so a data set always gets the same codes.
    """
    h = np.asarray(hists, dtype=np.float64)
    if len(h) == 0:
        return np.zeros(0, dtype=np.uint64)
    planes = np.random.default_rng([seed, 0x5EED]).standard_normal((h.shape[1], 64))
    return pack_bits((h - h.mean(axis=0)) @ planes > 0)


def _rotl(x: np.ndarray, k: int) -> np.ndarray:
    if k % 64 == 0:
        return x
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


def _nearest_per_image(i: np.ndarray, j: np.ndarray, bits: np.ndarray, per_image: int) -> np.ndarray:
    """(P,) bool: the pairs among the ``per_image`` nearest (fewest ``bits``, ties by index) of either
    of their two images."""
    keep = np.zeros(len(i), dtype=bool)
    for a, b in ((i, j), (j, i)):
        order = np.lexsort((b, bits, a))
        first = np.r_[0, np.flatnonzero(np.diff(a[order])) + 1]
        rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
        keep[order[rank < per_image]] = True
    return keep


def candidate_pairs(
    codes: np.ndarray, *, window: int = 16, bands: int = 8, max_bits: int = 64, per_image: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i < j``, of 64-bit codes: each code's ``per_image`` nearest (fewest differing
    bits) among those that sit close to it in a banded sort order.

    The code is cut into ``bands`` bands; for each band the codes are sorted with that band first (the
    rest following, rotated) and each is compared with the ``window`` next ones. Two codes within
    ``bands - 1`` bits agree on a band, so they sit in one run of that order; but the order within a
    run follows the next band, not the whole distance, so in a long run of look-alikes (one leaf laid
    alike on one sheet, again and again) a copy 6 bits away may sit behind a few codes 20 bits away.
    Hence the wide window, and of all the codes met so, only each code's nearest few are kept: the
    work stays ``O(bands * window * N)`` after ``bands`` sorts and the pairs ``O(per_image * N)``,
    whatever the data. Pairs differing in more than ``max_bits`` bits are dropped. Sorted by (i, j),
    no repeats.
    """
    c = np.ascontiguousarray(codes, dtype=np.uint64)
    n = len(c)
    if n < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    width = 64 // bands
    keys = []
    for b in range(bands):
        order = np.argsort(_rotl(c, width * b), kind="stable")
        for off in range(1, min(window, n - 1) + 1):
            i, j = order[:-off], order[off:]
            if max_bits < 64:
                keep = popcount(c[i] ^ c[j]) <= max_bits
                i, j = i[keep], j[keep]
            keys.append(np.minimum(i, j) * n + np.maximum(i, j))
    key = np.sort(np.concatenate(keys))
    key = key[np.r_[True, key[1:] != key[:-1]]] if len(key) else key  # unique (np.unique hashes: slower)
    i, j = key // n, key % n
    keep = _nearest_per_image(i, j, popcount(c[i] ^ c[j]), per_image)
    return i[keep], j[keep]


def view_codes(views: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """(N, V) uint64 random-hyperplane codes of (N, V, D) view vectors, centred on the mean whole view.

    Distinct pictures of one layout (a leaf centred on a sheet) share most of their blurred views; the
    mean is that shared part, so taking it away leaves each code to what tells the pictures apart.
    """
    v = np.asarray(views, dtype=np.float64)
    if len(v) == 0:
        return np.zeros((0, v.shape[1] if v.ndim == 3 else 0), dtype=np.uint64)
    v = v - v[:, 0].mean(axis=0)
    planes = np.random.default_rng([seed, 0x71E5]).standard_normal((v.shape[-1], 64))
    return pack_bits(v @ planes > 0)


def crop_pairs(
    codes: np.ndarray, *, window: int = 6, bands: int = 8, per_image: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i < j``, where the whole view of one image is among the nearest codes of the
    other's views (:func:`view_codes`, (N, V), column 0 the whole view).

    For each band, every view code of every image is sorted with that band first, and each image's
    whole-view code looks up the ``window`` codes on either side of it. Of all the images found so,
    each image keeps the ``per_image`` nearest (fewest differing bits between a whole view and any view
    of the other, either way round), so a run of look-alikes gives ``O(per_image * N)`` pairs.
    """
    c = np.ascontiguousarray(codes, dtype=np.uint64)
    n, v = c.shape
    if n < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    whole, flat, owner = c[:, 0], c.ravel(), np.repeat(np.arange(n), v)
    width = 64 // bands
    keys = []
    for b in range(bands):
        ordered = _rotl(flat, width * b)
        order = np.argsort(ordered, kind="stable")
        at = np.searchsorted(ordered[order], _rotl(whole, width * b))  # (N,)
        for off in range(-window, window):
            j = owner[order[np.clip(at + off, 0, len(flat) - 1)]]
            i = np.arange(n)
            keep = i != j
            keys.append(np.minimum(i[keep], j[keep]) * n + np.maximum(i[keep], j[keep]))
    key = np.sort(np.concatenate(keys))
    key = key[np.r_[True, key[1:] != key[:-1]]]  # unique (np.unique hashes: slower here)
    i, j = key // n, key % n
    bits = np.minimum(popcount(whole[i, None] ^ c[j]).min(axis=1), popcount(whole[j, None] ^ c[i]).min(axis=1))
    keep = _nearest_per_image(i, j, bits, per_image)
    return i[keep], j[keep]


# ---------------------------------------------------------------------------------- verification
@dataclass
class Checked:
    """The verification of pairs ``(i, j)``: each array (P,)."""

    similarity: np.ndarray  # float: normalised correlation of the aligned thumbnails' fine detail
    outline: np.ndarray  # float: normalised correlation of the aligned thumbnails themselves
    orientation: np.ndarray  # int: index into ORIENTATIONS of the turn/flip applied to j
    scale: np.ndarray  # (P, 2) float: j's content is this many times larger than i's, along (y, x)


ORIENTATIONS = ("same", "flip-h", "rot90", "rot90+flip-h", "rot180", "flip-v", "rot270", "rot270+flip-h")
_BORDER = 0.06  # the outer 6% of either image is left out of every comparison (fill, crop edges)
_SCALES = np.geomspace(0.8, 1.25, 9)
_SHIFTS = np.linspace(-0.08, 0.08, 17)
_MIN_OVERLAP = 0.4  # of the area; less is no match
_COARSE_MIN = 0.6  # 12 px thumbnails correlating less than this are not looked at closer
_GUARD = 8  # members of each group checked against each other before two groups join
_GUARD_SLACK = 0.2  # ... at a detail similarity this much below the pair check's
_VIEW_ONLY_MIN = 0.85  # detail similarity a pair found by the views alone must reach
_VIEW_ALIKE = 0.95  # ... unless their blurred views say one is a crop of the other
_ROUGH_MIN = 0.8  # outlines correlating less than this at the profile alignment are not refined
_AMBIGUOUS = 0.9  # pairs passing below this detail similarity must also pass the keypoint check
_MIN_INLIERS = 15  # keypoint matches one similarity transform must explain (look-alikes: <= 12)
_FINE_MIN, _FINE_MIN_OUTLINE = 0.8, 0.98  # ... or the check at 128 px (copies: 0.85+, look-alikes: <= 0.73)
# Keypoints that agree this strongly accept a pair whose detail similarity noise has lowered (sensor noise
# in small images: copies at 0.33-0.69 detail share 33-160 inliers; look-alikes share 12 at most), as long
# as the outlines still match.
_STRONG_INLIERS, _STRONG_MIN_OUTLINE = 30, _ROUGH_MIN


def _dihedral(t: np.ndarray) -> np.ndarray:
    """(..., 8, S, S): the 8 flips and turns of (..., S, S), in the order of ORIENTATIONS."""
    out = []
    for k in range(4):
        r = np.rot90(t, k, axes=(-2, -1))
        out += [r, r[..., :, ::-1]]
    return np.stack(out, axis=-3)


@dataclass
class _Hypotheses:
    """Every (scale, shift) of one axis, for profiles of length m and images of side n.

    ``match`` (m, H*m) samples a length-m profile of j at ``s * (x - 0.5) + 0.5 + t`` for each of i's m
    sample positions x (linear interpolation), for every hypothesis h; ``inside`` (H, m) marks the
    samples whose positions lie inside the compared area of both images. ``lo`` and ``frac`` (H, n)
    are the same taps for warping a whole image of side n.
    """

    scale: np.ndarray  # (H,)
    match: np.ndarray  # (m, H*m) float32
    inside: np.ndarray  # (H, m) float32 0/1
    lo: np.ndarray  # (H, n) int
    frac: np.ndarray  # (H, n) float32
    inside_n: np.ndarray  # (H, n) float32 0/1

    @staticmethod
    def _taps(s: np.ndarray, t: np.ndarray, n: int):
        x = (np.arange(n) + 0.5) / n  # (n,) centres of i's samples, 0..1
        u = s[:, None] * (x[None, :] - 0.5) + 0.5 + t[:, None]  # (H, n): where they fall in j
        pos = u * n - 0.5
        lo = np.clip(np.floor(pos).astype(np.int64), 0, n - 2)
        frac = np.clip(pos - lo, 0.0, 1.0)
        inside = (x[None, :] > _BORDER) & (x[None, :] < 1 - _BORDER) & (u > _BORDER) & (u < 1 - _BORDER)
        return lo, frac.astype(np.float32), inside.astype(np.float32)

    @classmethod
    def grid(cls, n: int, m: int) -> _Hypotheses:
        s_grid, t_grid = np.meshgrid(_SCALES, _SHIFTS, indexing="ij")
        s, t = s_grid.ravel(), t_grid.ravel()  # (H,)
        lo_m, frac_m, inside_m = cls._taps(s, t, m)
        match = np.zeros((len(s), m, m), dtype=np.float32)  # (H, i's sample, j's sample)
        hyp, rows = np.meshgrid(np.arange(len(s)), np.arange(m), indexing="ij")
        np.add.at(match, (hyp, rows, lo_m), 1 - frac_m)
        np.add.at(match, (hyp, rows, lo_m + 1), frac_m)
        lo, frac, inside = cls._taps(s, t, n)
        return cls(
            scale=s,
            match=np.ascontiguousarray(match.transpose(2, 0, 1).reshape(m, -1)),
            inside=inside_m,
            lo=lo,
            frac=frac,
            inside_n=inside,
        )


_GRIDS: dict[int, _Hypotheses] = {}
_PROFILE = 3  # profiles are matched at 1/3 of the thumbnail's side
_STRIPS = 3  # ... in 3 strips across the other axis


def _wcorr(a: np.ndarray, b: np.ndarray, w: np.ndarray, axis) -> np.ndarray:
    """Weighted Pearson correlation of a and b (broadcast) along ``axis`` with weights w (0 or 1)."""
    sw = w.sum(axis=axis, keepdims=True)
    sw = np.where(sw > 0, sw, 1.0)
    ma = (a * w).sum(axis=axis, keepdims=True) / sw
    mb = (b * w).sum(axis=axis, keepdims=True) / sw
    da, db = (a - ma) * w, (b - mb) * w
    num = (da * db).sum(axis=axis)
    den = np.sqrt((da * da).sum(axis=axis) * (db * db).sum(axis=axis))
    return np.where(den > 1e-9, num / np.maximum(den, 1e-12), 0.0)


def _detail(t: np.ndarray) -> np.ndarray:
    """Fine detail of (C, S, S) thumbnails in 0..1, locally contrast-normalised.

    The thumbnail minus its blur (sigma 1 px), divided by the local detail strength: a leaf's outline
    (which two distinct leaves laid alike share) then counts no more than its veins and marks (which
    they do not); a floor of 6 grey levels keeps flat areas from amplifying noise.
    """
    d = t - ndimage.gaussian_filter(t, sigma=(0, 1.0, 1.0), mode="nearest", truncate=3.0)
    strength = np.sqrt(ndimage.gaussian_filter(d * d, sigma=(0, 2.0, 2.0), mode="nearest", truncate=3.0))
    return d / (strength + np.float32(6 / 255))


def _orientations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(C, 8) correlation of i's 12 px thumbnail with each flip/turn of j's (ORIENTATIONS order)."""
    n = a.shape[-1]
    f = n // 12
    small_a = a[:, : 12 * f, : 12 * f].reshape(len(a), 12, f, 12, f).mean(axis=(2, 4))[:, None, 1:-1, 1:-1]
    small_b = _dihedral(b[:, : 12 * f, : 12 * f].reshape(len(b), 12, f, 12, f).mean(axis=(2, 4)))[..., 1:-1, 1:-1]
    return _wcorr(small_a, small_b, np.ones_like(small_b), axis=(-2, -1))  # (C, 8)


def _orient(t: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Each (S, S) of t (C, S, S) flipped/turned by ORIENTATIONS[o[c]]."""
    out = np.empty_like(t)
    for k in np.unique(o):
        sel = o == k
        r = np.rot90(t[sel], int(k) // 2, axes=(-2, -1))
        out[sel] = r[..., :, ::-1] if k % 2 else r
    return out


def _taps(s: np.ndarray, t: np.ndarray, n: int):
    """Interpolation taps for reading j at ``s * (x - 0.5) + 0.5 + t`` at each of i's n sample centres x,
    for any shape of s, t: (lo, frac, inside), each of shape (*s.shape, n)."""
    x = (np.arange(n) + 0.5) / n
    u = s[..., None] * (x - 0.5) + 0.5 + t[..., None]
    pos = u * n - 0.5
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n - 2)
    frac = np.clip(pos - lo, 0.0, 1.0).astype(np.float32)
    inside = ((x > _BORDER) & (x < 1 - _BORDER) & (u > _BORDER) & (u < 1 - _BORDER)).astype(np.float32)
    return lo, frac, inside


def _strip_profiles(x: np.ndarray, axis: int, length: int) -> np.ndarray:
    """(C, STRIPS, length) profiles of x (C, n, n) along y (axis 2 averaged) or x (axis 1 averaged), one
    per strip across the other axis: a textured scene's single mean profile is nearly flat, three of
    them still say where things are."""
    n = x.shape[-1]
    k, f = _STRIPS, n // length
    x = x if axis == 2 else np.swapaxes(x, 1, 2)  # (C, along, across)
    x = x[:, : length * f, : (n // k) * k].reshape(len(x), length, f, k, n // k)
    return x.mean(axis=(2, 4)).transpose(0, 2, 1)


def _compare(a: np.ndarray, b: np.ndarray, g: _Hypotheses):
    """Align b (C, n, n) to a by a scale and shift per axis, then (outline, detail, s_y, s_x) each (C,).

    Coarse: every hypothesis of the grid on profiles at 1/3 resolution. Fine: +-3% of scale and +-2% of
    shift around the coarse best, on full-resolution profiles (the detail check needs the alignment to
    a fraction of a pixel)."""
    n = a.shape[-1]
    m = n // _PROFILE
    fine_grid = np.meshgrid(np.geomspace(0.97, 1.03, 7), np.linspace(-0.02, 0.02, 9), indexing="ij")
    fine_s, fine_t = fine_grid[0].ravel(), fine_grid[1].ravel()  # (F,)
    found = []
    for axis in (2, 1):  # along y (rows) first, then along x (columns)
        pa, pb = _strip_profiles(a, axis, m), _strip_profiles(b, axis, m)  # (C, k, m)
        sampled = (pb @ g.match).reshape(len(b), _STRIPS, -1, m).transpose(0, 2, 1, 3)  # (C, H, k, m)
        w = np.broadcast_to(g.inside[None, :, None, :], sampled.shape)
        h = _wcorr(pa[:, None], sampled, w, axis=(-2, -1)).argmax(axis=-1)  # (C,)
        s0 = g.scale[h]
        t0 = _SHIFTS[h % len(_SHIFTS)]
        s, t = s0[:, None] * fine_s, t0[:, None] + fine_t  # (C, F)
        lo, frac, inside = _taps(s, t, n)  # (C, F, n)
        pa, pb = _strip_profiles(a, axis, n), _strip_profiles(b, axis, n)  # (C, k, n)
        pb = np.broadcast_to(pb[:, None], (len(b), len(fine_s), _STRIPS, n))
        lo, frac = lo[:, :, None, :], frac[:, :, None, :]
        lo = np.broadcast_to(lo, pb.shape)
        sampled = np.take_along_axis(pb, lo, axis=-1) * (1 - frac) + np.take_along_axis(pb, lo + 1, axis=-1) * frac
        wf = np.broadcast_to(inside[:, :, None, :], sampled.shape)
        best = _wcorr(pa[:, None], sampled, wf, axis=(-2, -1)).argmax(axis=-1)  # (C,)
        rows = np.arange(len(a))
        found.append((s[rows, best], t[rows, best]))
    (sy, ty), (sx, tx) = found
    # Pairs whose outlines do not match even roughly at the profile estimate (half resolution) are not
    # refined: the refinement is most of the cost, and it moves the outline correlation only a little.
    c, h = len(a), a.shape[-1] // 2 * 2
    half = lambda x: x[:, :h, :h].reshape(len(x), h // 2, 2, h // 2, 2).mean(axis=(2, 4))  # noqa: E731
    wb, w = _warp(half(b), sy, ty, sx, tx)
    rough = _wcorr(half(a), wb, w, axis=(1, 2))
    go = rough >= _ROUGH_MIN
    outline, detail = np.where(go, -1.0, np.minimum(rough, _ROUGH_MIN)), np.full(c, -1.0)
    if go.any():
        ry, rty, rx, rtx = _refine(a[go], b[go], sy[go], ty[go], sx[go], tx[go])
        outline[go], detail[go], sy[go], sx[go] = _compare_at(a[go], b[go], ry, rty, rx, rtx)
    return outline, detail, sy, sx


def _warp(b: np.ndarray, sy, ty, sx, tx) -> tuple[np.ndarray, np.ndarray]:
    """b (C, n, n) read at i's pixel positions under per-pair scales and shifts (C,): (warped, weights)."""
    n = b.shape[-1]
    lo_y, fy, in_y = _taps(sy, ty, n)  # (C, n)
    lo_x, fx, in_x = _taps(sx, tx, n)
    lo_y, fy = lo_y[:, :, None], fy[:, :, None]
    rows = np.take_along_axis(b, lo_y, axis=1) * (1 - fy) + np.take_along_axis(b, lo_y + 1, axis=1) * fy
    lo_x, fx = lo_x[:, None, :], fx[:, None, :]
    wb = np.take_along_axis(rows, lo_x, axis=2) * (1 - fx) + np.take_along_axis(rows, lo_x + 1, axis=2) * fx
    return wb, in_y[:, :, None] * in_x[:, None, :]


def _refine(a: np.ndarray, b: np.ndarray, sy, ty, sx, tx, *, rounds: int = 6):
    """Polish the profile estimate on the whole images (half resolution): each round moves every one of
    the four parameters one step up or down where that correlates better, the steps halving every
    second round (scale 2% -> 0.5%, shift 1% -> 0.25% of the side)."""
    c, n = len(a), a.shape[-1] // 2 * 2
    half = lambda x: x[:, :n, :n].reshape(len(x), n // 2, 2, n // 2, 2).mean(axis=(2, 4))  # noqa: E731
    ah, bh = half(a), half(b)
    p = np.stack([sy, ty, sx, tx], axis=1).astype(np.float64)  # (C, 4)
    step = np.array([0.02, 0.01, 0.02, 0.01])

    def score(q: np.ndarray) -> np.ndarray:  # q (C, K, 4) -> (C, K)
        k = q.shape[1]
        wb, w = _warp(np.repeat(bh, k, axis=0), *(q.reshape(-1, 4).T))
        return _wcorr(np.repeat(ah, k, axis=0), wb, w, axis=(1, 2)).reshape(c, k)

    for r in range(rounds):
        moves = np.concatenate([np.zeros((1, 4)), np.diag(step), -np.diag(step)])  # (9, 4)
        got = score(p[:, None, :] + moves[None])  # (C, 9)
        for d in range(4):  # each parameter on its own: up, down or stay
            options = got[:, [0, 1 + d, 5 + d]]
            choice = options.argmax(axis=1)
            p[:, d] += np.array([0.0, step[d], -step[d]])[choice]
        if r % 2:
            step = step / 2
    return p[:, 0], p[:, 1], p[:, 2], p[:, 3]


def _compare_at(a: np.ndarray, b: np.ndarray, sy, ty, sx, tx):
    """b (C, n, n) warped by the per-pair scales and shifts (C,) and compared with a:
    (outline, detail, sy, sx)."""
    n = a.shape[-1]
    lo_y, fy, in_y = _taps(sy, ty, n)  # (C, n)
    lo_x, fx, in_x = _taps(sx, tx, n)
    w = in_y[:, :, None] * in_x[:, None, :]  # (C, n, n)
    lo_y, fy = lo_y[:, :, None], fy[:, :, None]
    rows = np.take_along_axis(b, lo_y, axis=1) * (1 - fy) + np.take_along_axis(b, lo_y + 1, axis=1) * fy
    lo_x, fx = lo_x[:, None, :], fx[:, None, :]
    wb = np.take_along_axis(rows, lo_x, axis=2) * (1 - fx) + np.take_along_axis(rows, lo_x + 1, axis=2) * fx
    outline = _wcorr(a, wb, w, axis=(1, 2))
    # Clipped pixels (a brightened white sheet) carry no detail: left out of the detail check.
    lo_c, hi_c = np.float32(3 / 255), np.float32(252 / 255)
    unclipped = (a > lo_c) & (a < hi_c) & (wb > lo_c) & (wb < hi_c)
    detail = _wcorr(_detail(a), _detail(wb), w * unclipped, axis=(1, 2))
    enough = w.sum(axis=(1, 2)) >= _MIN_OVERLAP * n * n
    return np.where(enough, outline, -1.0), np.where(enough, detail, -1.0), sy, sx


def view_similarity(views: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """(P,) cosine similarity of the whole view of one image of each pair with the closest view of the
    other, either way round: near 1 for a copy cut by up to 10% per side (:func:`view_vectors`)."""
    v = np.asarray(views, dtype=np.float32)
    one = np.einsum("pd,pvd->pv", v[i, 0], v[j]).max(axis=1)
    other = np.einsum("pd,pvd->pv", v[j, 0], v[i]).max(axis=1)
    return np.maximum(one, other)


def verify_pairs(
    thumbs: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    *,
    flips: bool = True,
    views: np.ndarray | None = None,
    chunk: int = 128,
) -> Checked:
    """Align and compare the thumbnails of every pair (i[k], j[k]); see the module doc.

    ``thumbs`` is (N, S, S) uint8. With ``flips``, the flip or turn of j whose 12 px thumbnail looks
    most like i's is tried (and the runner-up too when it looks nearly as much like it), else j only
    as it is. The scale (0.8-1.25x) and shift (+-8% of the side) along y and along x that best match
    i's row and column profiles are found; j is warped by them and compared with i over the overlap
    (at least 40% of the area). The orientation with the higher outline + detail correlation wins.
    Pairs whose 12 px thumbnails do not look alike are not compared further, unless ``views`` (N, V, D)
    of :func:`view_vectors` say one is a crop of the other (a cut copy is stretched in its thumbnail).
    """
    n = thumbs.shape[-1]
    if n not in _GRIDS:
        _GRIDS[n] = _Hypotheses.grid(n, n // _PROFILE)
    g = _GRIDS[n]
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    out = Checked(
        similarity=np.full(len(i), -1.0),
        outline=np.full(len(i), -1.0),
        orientation=np.zeros(len(i), dtype=np.int64),
        scale=np.ones((len(i), 2)),
    )
    for start in range(0, len(i), chunk):
        sl = slice(start, start + chunk)
        a = thumbs[i[sl]].astype(np.float32) / 255
        b = thumbs[j[sl]].astype(np.float32) / 255
        corr = _orientations(a, b)  # (C, 8)
        if views is not None:
            cropped = view_similarity(views, i[sl], j[sl]) >= _VIEW_ALIKE
            corr[:, 0] = np.where(cropped, np.maximum(corr[:, 0], _COARSE_MIN), corr[:, 0])
        if not flips:
            corr[:, 1:] = -1.0
        ranked = np.argsort(-corr, axis=-1, kind="stable")
        rows = np.arange(len(a))
        # Pairs that do not even look alike at 12 px (most candidates of a varied set) stop here.
        alike = corr[rows, ranked[:, 0]] >= _COARSE_MIN
        out.outline[start : start + len(a)] = np.where(alike, -1.0, corr[rows, ranked[:, 0]])
        tries = [(alike, ranked[:, 0])]
        if flips:
            tries.append((alike & (corr[rows, ranked[:, 1]] >= corr[rows, ranked[:, 0]] - 0.05), ranked[:, 1]))
        for sel, o in tries:
            if not sel.any():
                continue
            outline, detail, sy, sx = _compare(a[sel], _orient(b[sel], o[sel]), g)
            at = np.arange(start, start + len(a))[sel]
            better = outline + detail > out.outline[at] + out.similarity[at]
            at = at[better]
            out.outline[at], out.similarity[at] = outline[better], detail[better]
            out.orientation[at] = o[sel][better]
            out.scale[at, 0], out.scale[at, 1] = sy[better], sx[better]
    return out


def _keypoint_matches(fines: np.ndarray, i: np.ndarray, j: np.ndarray, orientation: np.ndarray):
    """For each pair k: (k, points in i, points in j), the ORB matches of the (N, S, S) uint8 images
    passing Lowe's ratio test (0.8), j turned or flipped by ``orientation`` first (ORB descriptors
    follow turns but not flips); pairs with fewer than 3 such matches are left out."""
    side = fines.shape[-1]
    edge = max(7, side // 8)  # small images: a smaller patch, else the border leaves no keypoints
    orb = cv2.ORB.create(nfeatures=500, nlevels=4, edgeThreshold=edge, patchSize=edge, fastThreshold=5)
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    cache: dict[tuple[int, int], tuple] = {}

    def features(k: int, o: int) -> tuple:
        if (k, o) not in cache:
            img = fines[k] if o == 0 else _dihedral(fines[k])[o]
            cache[k, o] = orb.detectAndCompute(np.ascontiguousarray(img), None)
        return cache[k, o]

    for p, (a, b, o) in enumerate(zip(np.asarray(i), np.asarray(j), np.asarray(orientation))):
        (ka, da), (kb, db) = features(int(a), 0), features(int(b), int(o))
        if da is None or db is None or len(ka) < 2 or len(kb) < 2:
            continue
        good = [m[0] for m in matcher.knnMatch(da, db, k=2) if len(m) == 2 and m[0].distance < 0.8 * m[1].distance]
        if len(good) < 3:
            continue
        pa = np.array([ka[m.queryIdx].pt for m in good], dtype=np.float32)
        pb = np.array([kb[m.trainIdx].pt for m in good], dtype=np.float32)
        yield p, pa, pb


def keypoint_inliers(fines: np.ndarray, i: np.ndarray, j: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    """(P,) int: ORB keypoint matches of the (N, S, S) uint8 images of each pair (i[k], j[k]) that one
    similarity transform (rotation, uniform scale, shift; RANSAC, 3 px) maps onto each other, j turned
    or flipped by ``orientation`` (indices into ORIENTATIONS, from :func:`verify_pairs`) first."""
    out = np.zeros(len(i), dtype=np.int64)
    for p, pa, pb in _keypoint_matches(fines, i, j, orientation):
        _, inliers = cv2.estimateAffinePartial2D(pa, pb, method=cv2.RANSAC, ransacReprojThreshold=3.0)
        out[p] = 0 if inliers is None else int(inliers.sum())
    return out


_MAP_SCALES = (0.7, 1.45)  # a keypoint map's scale along either axis must lie within these ...
_MAP_TURN = 0.1  # ... and it may turn by at most this (radians): flips and turns are applied before


def keypoint_aligned(
    thumbs: np.ndarray, fines: np.ndarray, i: np.ndarray, j: np.ndarray, orientation: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(outline, detail, inliers, scale (P, 2) along (y, x)), each (P,): the thumbnail check of each pair with j's thumbnail placed
    on i's starting from the map its keypoints agree on, not from the profile search.

    The profile search of :func:`verify_pairs` estimates a scale and shift per axis from row and column
    profiles; a cut or moved copy whose profiles change shape (a border of fill, a leaf tip cut off) can
    fool it (a 9 px shift read as a 0.83x scale), and the detail correlation then fails on a true copy.
    Here the start comes from the ORB matches of the 128 px images: the affine map (RANSAC, 3 px) that
    explains at least _MIN_INLIERS of them, scales each axis by 0.7-1.45x and turns by 0.1 rad at most
    (else the pair keeps -1), read as a scale and shift per axis; it is then polished and compared
    exactly as in :func:`verify_pairs`.
    """
    big = fines.shape[-1]
    outline, detail = np.full(len(i), -1.0), np.full(len(i), -1.0)
    inliers = np.zeros(len(i), dtype=np.int64)
    scale = np.ones((len(i), 2))
    found, params = [], []
    for p, pa, pb in _keypoint_matches(fines, i, j, orientation):
        m, used = cv2.estimateAffine2D(pa, pb, method=cv2.RANSAC, ransacReprojThreshold=3.0)
        if m is None or used is None or not np.isfinite(m).all():  # degenerate matches give NaN maps
            continue
        inliers[p] = int(used.sum())
        lin = m[:, :2]
        sv = np.linalg.svd(lin, compute_uv=False)
        turn = abs(np.arctan2(lin[1, 0] - lin[0, 1], lin[0, 0] + lin[1, 1]))
        if inliers[p] < _MIN_INLIERS or sv.min() < _MAP_SCALES[0] or sv.max() > _MAP_SCALES[1] or turn > _MAP_TURN:
            continue
        # pixel X of i (x * big - 0.5) -> s X + shift in j; as u = s (x - 0.5) + 0.5 + t in 0..1 units
        sx, sy = lin[0, 0], lin[1, 1]
        tx = (m[0, 2] + 0.5 - 0.5 * sx) / big + 0.5 * sx - 0.5
        ty = (m[1, 2] + 0.5 - 0.5 * sy) / big + 0.5 * sy - 0.5
        found.append(p)
        params.append((sy, ty, sx, tx))
    if found:
        at = np.asarray(found)
        a = thumbs[np.asarray(i)[at]].astype(np.float32) / 255
        b = _orient(thumbs[np.asarray(j)[at]].astype(np.float32) / 255, np.asarray(orientation)[at])
        sy, ty, sx, tx = (np.asarray(v, dtype=np.float64) for v in zip(*params))
        ry, rty, rx, rtx = _refine(a, b, sy, ty, sx, tx)
        outline[at], detail[at], scale[at, 0], scale[at, 1] = _compare_at(a, b, ry, rty, rx, rtx)
    return outline, detail, inliers, scale


def _confirmed(
    fines: np.ndarray, i: np.ndarray, j: np.ndarray, checked: Checked, passed: np.ndarray, flips: bool
) -> np.ndarray:
    """``passed`` with the pairs that passed below the ambiguous detail similarity kept only if their
    keypoints agree (:func:`keypoint_inliers`) or, failing that, they pass the thumbnail check again
    on the 128 px images at a detail similarity of _FINE_MIN and an outline of _FINE_MIN_OUTLINE.

    On plain-sheet leaves, keypoints are few: copies there may share as few as 5 inliers, as few as
    look-alikes do. At 128 px the check sees veins and marks the 72 px thumbnail blurs away: copies
    passing at 0.85-0.95 at 72 px keep 0.85 or more (outline >= 0.997), while distinct look-alikes
    passing at up to 0.86 at 72 px fall to 0.73 or less (outline <= 0.98)."""
    unsure = np.flatnonzero(passed & (checked.similarity < _AMBIGUOUS))
    out = passed.copy()
    if len(unsure):
        n = keypoint_inliers(fines, i[unsure], j[unsure], checked.orientation[unsure])
        out[unsure] = n >= _MIN_INLIERS
        again = unsure[n < _MIN_INLIERS]
        if len(again):
            fine = verify_pairs(fines, i[again], j[again], flips=flips)
            out[again] = (fine.similarity >= _FINE_MIN) & (fine.outline >= _FINE_MIN_OUTLINE)
    return out


def check_pairs(
    thumbs: np.ndarray,
    fines: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    *,
    need: float | np.ndarray,
    min_outline: float,
    flips: bool = True,
    views: np.ndarray | None = None,
    every_turn: bool = False,
) -> tuple[Checked, np.ndarray]:
    """The whole check of pairs (i[k], j[k]): (their scores, (P,) bool passed).

    :func:`verify_pairs` first; a pair that fails it after looking alike at 12 px is compared again
    from its keypoints' map (:func:`keypoint_aligned`), and the better of the two alignments counts.
    A pair passes with a detail similarity of at least ``need`` and an outline of at least
    ``min_outline``, and, below a detail similarity of 0.9, with keypoints that agree
    (:func:`keypoint_inliers`); or, whatever its detail similarity, with an outline of at least 0.8 and
    at least 30 keypoint inliers (a copy whose detail sensor noise has blurred)."""
    checked = verify_pairs(thumbs, i, j, flips=flips, views=views)
    ok = (checked.similarity >= need) & (checked.outline >= min_outline)
    retry = np.flatnonzero(~ok & ((checked.outline >= _COARSE_MIN) | every_turn))
    # A leaf alike both ways round may look most like its copy flipped at 12 px: unflipped is tried too
    # (with ``every_turn``, every flip and turn: two copies of one source, one flipped and one moved).
    chosen = checked.orientation[retry].copy()
    others = range(len(ORIENTATIONS)) if every_turn and flips else [0]
    for o in [-1, *others]:
        at = retry if o < 0 else retry[chosen != o]
        if not len(at):
            continue
        turn = chosen if o < 0 else np.full(len(at), o, dtype=np.int64)
        outline, detail, _, scale = keypoint_aligned(thumbs, fines, i[at], j[at], turn)
        better = outline + detail > checked.outline[at] + checked.similarity[at]
        at = at[better]
        checked.outline[at], checked.similarity[at], checked.scale[at] = outline[better], detail[better], scale[better]
        checked.orientation[at] = turn[better]
    ok = (checked.similarity >= need) & (checked.outline >= min_outline)
    noisy = np.flatnonzero(~ok & (checked.outline >= _STRONG_MIN_OUTLINE))
    if len(noisy):
        ok[noisy] = keypoint_inliers(fines, i[noisy], j[noisy], checked.orientation[noisy]) >= _STRONG_INLIERS
    return checked, _confirmed(fines, i, j, checked, ok, flips)


# -------------------------------------------------------------------------------------- grouping
class DuplicatePair(NamedTuple):
    """A verified pair of copies: images ``i`` < ``j`` (indices into the inputs), how they were found
    (``exact``: same bytes; ``near``: passed the check), the check's detail and outline similarity, how
    ``j`` is turned against ``i`` (one of ORIENTATIONS), and whether the pair joined their groups."""

    i: int
    j: int
    check: str
    similarity: float
    outline: float
    orientation: str
    joined: bool


@dataclass
class Grouping:
    """The outcome of :func:`group_images`."""

    group: np.ndarray  # (N,) int64 group ids 0..G-1, numbered by first member
    pairs: list[DuplicatePair]  # per verified pair, strongest first after the exact copies
    n_candidates: int  # candidate pairs checked
    n_blocked: int  # verified pairs not joined because some members of their two groups do not match


def _exact_pairs(sha1s: Sequence[str]) -> list[tuple[int, int]]:
    first: dict[str, int] = {}
    out = []
    for k, s in enumerate(sha1s):
        if s in first:
            out.append((first[s], k))
        else:
            first[s] = k
    return out


class _UnionFind:
    """Disjoint sets over 0..n-1 whose root is always the smallest member (groups number by first member)."""

    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = int(parent[x])
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        self.parent[max(ra, rb)] = min(ra, rb)


class _GroupJoiner:
    """The state of joining verified pairs into groups: each group's members and centre, and every pair's
    strict and loose verdict, re-checked (every flip and turn) where a join needs it. See group_images."""

    def __init__(self, sets: _UnionFind, reps, checks, *, thumbs, fines, views, min_similarity, min_outline, flips):
        ci, cj, checked, ok, need = checks
        self.sets = sets
        self.thumbs, self.fines, self.views = thumbs, fines, views
        self.min_similarity, self.min_outline, self.flips = min_similarity, min_outline, flips
        self.strict = {(int(x), int(y)): bool(v) for x, y, v in zip(ci, cj, ok)}
        # a pair that passes the check passes the looser one too (strong keypoints may pass a pair whose
        # detail similarity is under the loose need)
        loose_ok = ok | (checked.similarity >= min_similarity - _GUARD_SLACK) & (checked.outline >= min_outline - 0.05)
        self.loose = {(int(x), int(y)): bool(v) for x, y, v in zip(ci, cj, loose_ok)}
        self.degree = np.bincount(np.concatenate([ci[ok], cj[ok]]), minlength=len(sets.parent))
        self.members = {int(r): [int(r)] for r in reps}  # byte copies share their representative's check
        self.centre = {r: r for r in self.members}
        self.view_only = {(int(x), int(y)) for x, y, v in zip(ci, cj, need > min_similarity) if v}
        self.retried: set[tuple[int, int]] = set()

    def check(self, todo_pairs: set[tuple[int, int]]) -> None:
        # New pairs, and candidate pairs that failed, once more with every flip and turn tried
        # (the candidate check tried the likeliest only: a flipped and a moved copy of one source
        # may need both a flip and the keypoints' alignment).
        strict, loose = self.strict, self.loose
        new = sorted(todo_pairs - strict.keys())
        again = sorted(t for t in todo_pairs & strict.keys() if not (strict[t] and loose[t]) and t not in self.retried)
        todo = new + again
        if not todo:
            return
        ti, tj = np.array([t[0] for t in todo]), np.array([t[1] for t in todo])
        got, good = check_pairs(
            self.thumbs,
            self.fines,
            ti,
            tj,
            need=self.min_similarity,
            min_outline=self.min_outline,
            flips=self.flips,
            views=self.views,
            every_turn=True,  # few pairs
        )
        fair = (got.similarity >= self.min_similarity - _GUARD_SLACK) & (got.outline >= self.min_outline - 0.05)
        for t, v, f in zip(todo, good, fair):
            loose[t] = loose.get(t, False) or bool(f) or bool(v)
            if t not in self.view_only:  # those keep the stricter need they failed
                strict[t] = strict.get(t, False) or bool(v)
        self.retried.update(again)

    def can_join(self, ra: int, rb: int) -> int | None:
        """The centre of the joined group, or None if the two may not join."""
        members = self.members
        cross = {(min(x, y), max(x, y)) for x in members[ra][:_GUARD] for y in members[rb][:_GUARD]}
        self.check(cross)
        if not all(self.loose[c] for c in cross):
            return None
        union = members[ra] + members[rb]
        for c in sorted({self.centre[ra], self.centre[rb]}, key=lambda c: (-self.degree[c], c)):
            spokes = {(min(c, m), max(c, m)) for m in union if m != c}
            self.check(spokes)
            if all(self.strict[t] for t in spokes):
                return c
        return None

    def join(self, a: int, b: int) -> bool:
        """Join the groups of verified pair (a, b) if the guard allows; whether they are one group now."""
        ra, rb = self.sets.find(a), self.sets.find(b)
        if ra == rb:
            return True
        chosen = self.can_join(ra, rb)
        if chosen is None:
            return False
        lo, hi = min(ra, rb), max(ra, rb)
        self.sets.parent[hi] = lo
        self.members[lo] = sorted(self.members[lo] + self.members.pop(hi))
        self.centre[lo] = chosen
        self.centre.pop(hi)
        return True


def group_images(
    sha1s: Sequence[str],
    signatures: Sequence[Signature] | None = None,
    *,
    mode: str = "near",
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    min_outline: float = DEFAULT_MIN_OUTLINE,
    flips: bool = True,
    per_image: int = 3,
) -> Grouping:
    """Group exact copies (same SHA-1) and, in ``near`` mode, verified near copies. See the module doc.

    ``mode`` ``off`` puts every image in its own group. Deterministic: the same inputs give the same
    groups and pairs.
    """
    n = len(sha1s)
    sets = _UnionFind(n)
    pairs: list[DuplicatePair] = []
    n_candidates = n_blocked = 0
    if mode != "off":
        for a, b in _exact_pairs(sha1s):
            sets.union(a, b)
            pairs.append(DuplicatePair(a, b, "exact", 1.0, 1.0, "same", True))
    if mode == "near" and n > 1:
        if signatures is None or len(signatures) != n:
            raise ValueError("near mode needs one signature per image")
        near, n_candidates = _near_pairs(sets, signatures, min_similarity, min_outline, flips, per_image)
        n_blocked = sum(not p.joined for p in near)
        pairs += near
    roots = np.asarray([sets.find(k) for k in range(n)], dtype=np.int64)
    _, group = np.unique(roots, return_inverse=True)  # roots are first members, so groups number by them
    return Grouping(
        group=group.astype(np.int64).reshape(n), pairs=pairs, n_candidates=n_candidates, n_blocked=n_blocked
    )


def _near_pairs(
    sets: _UnionFind, signatures: Sequence[Signature], min_similarity, min_outline, flips, per_image
) -> tuple[list[DuplicatePair], int]:
    """The verified near-copy pairs, strongest first, each joined into ``sets`` where the guard allows;
    and the number of candidate pairs checked."""
    n = len(signatures)
    reps = np.asarray([k for k in range(n) if sets.find(k) == k])  # one image per set of byte copies
    thumbs = np.stack([s.thumb for s in signatures])
    fines = np.stack([s.fine for s in signatures])
    views = np.stack([s.views for s in signatures])  # (N, V, D)
    codes = [
        np.asarray([signatures[k].phash for k in reps], dtype=np.uint64),
        histogram_codes(np.stack([signatures[k].hist for k in reps])),
    ]
    found = [candidate_pairs(c, max_bits=b, per_image=per_image) for c, b in zip(codes, _MAX_BITS)]
    by_hash = np.unique(np.concatenate([ci * len(reps) + cj for ci, cj in found]))
    vi, vj = crop_pairs(view_codes(views[reps]))
    key = np.union1d(by_hash, vi * len(reps) + vj)
    ci, cj = reps[key // len(reps)], reps[key % len(reps)]
    # A pair that only the views proposed (a cut or moved copy, its hashes far apart) had less going
    # for it before the check than one whose hashes agree, so it must pass a stricter one.
    need = np.where(np.isin(key, by_hash), min_similarity, max(min_similarity, _VIEW_ONLY_MIN))
    checked, ok = check_pairs(thumbs, fines, ci, cj, need=need, min_outline=min_outline, flips=flips, views=views)
    log.debug("%d candidate pairs, %d verified", len(ci), int(ok.sum()))
    # Strongest pairs first; two groups join through a pair only if (1) one of their centres -- the
    # one with more verified pairs first, usually the original of a set of copies -- passes the check
    # against every member of both: no member is more than two checks from another, so a chain of
    # gradually changing images, each close to the next, cannot grow one group end to end; and (2)
    # every member of one passes a looser check against every member of the other (the first
    # _GUARD of each): two edits of one original (a re-encoded and a shifted copy) are each close to
    # it but farther from each other, while two look-alike originals and their copies are not.
    joiner = _GroupJoiner(
        sets,
        reps,
        (ci, cj, checked, ok, need),
        thumbs=thumbs,
        fines=fines,
        views=views,
        min_similarity=min_similarity,
        min_outline=min_outline,
        flips=flips,
    )
    idx = np.flatnonzero(ok)
    idx = idx[np.lexsort((cj[idx], ci[idx], -checked.similarity[idx]))]
    pairs = []
    for k in idx:
        a, b = int(ci[k]), int(cj[k])
        pairs.append(
            DuplicatePair(
                a,
                b,
                "near",
                float(checked.similarity[k]),
                float(checked.outline[k]),
                ORIENTATIONS[int(checked.orientation[k])],
                joiner.join(a, b),
            )
        )
    return pairs, len(ci)
