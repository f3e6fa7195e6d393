"""A procedural stand-in for the Kaggle Rice Diseases photos: ``OUT/<class>/*.jpg``.

Every image is one rice-leaf blade (long, narrow, tapering, with a pale midrib and fine parallel veins)
at a random angle, scale and position over an out-of-focus background (wet soil, paddy water or other
leaves), under a lighting gradient, slightly blurred and JPEG-compressed (quality 70-95). The class is
what is drawn *on the blade*:

* ``BrownSpot``: 2-16 round to oval brown spots with a yellowish halo;
* ``LeafBlast``: 2-10 spindle lesions elongated along the leaf, grey centre and brown margin (some
  small early ones without the grey centre);
* ``Hispa``: whitish scraped streaks parallel to the veins, sometimes a scraped blotch or a few tiny
  dark insects;
* ``Healthy``: nothing, but distractors: dew drops, soil specks, a torn tip, a light scratch.

The distractors appear on the diseased leaves too (less often), so "has marks" alone does not name the
class. Sick leaves are also a little less vivid on average (``_TINTS``; the ranges overlap). The amounts
are calibrated so that colour statistics alone get part of the way and no further: see
``benchmarks/calibrate_demo.py``.

Counts are imbalanced like the real set (Healthy largest, see :data:`CLASS_MULTIPLIERS`) and about 2%
of the files are near-duplicates of another image of the same class (re-encoded, shifted by a few
pixels or brightened), listed in the marker file ``OUT/.tune_rice_demo.json``.

Two more families of picture carry the same classes and marks (``--family``, :data:`FAMILIES`), for
features that must hold on data of other character: ``plain``, a cut piece of leaf laid centred and
upright on a grey or white sheet (distinct pictures whose layout is nearly the same, as many public
disease sets are shot), and ``scans``, greyscale pen drawings of such leaves drawn at a third to a half
of the size and upscaled. ``field``, the pictures above, is the default.

Each image depends only on ``(seed, class, index)``: its random numbers come from a numpy Generator
seeded with exactly that, so the same seed gives byte-identical files whatever the order or the number
of worker processes (with the same numpy and Pillow versions).
"""

from __future__ import annotations

import argparse
import colorsys
import glob
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter
from scipy import ndimage
from tqdm.auto import tqdm

from .. import UserError, cli
from ..records import cache_root

log = logging.getLogger(__name__)

CLASSES = ("BrownSpot", "Healthy", "Hispa", "LeafBlast")
# Images per class = round(multiplier * per_class): the real set's imbalance, Healthy largest.
CLASS_MULTIPLIERS = {"BrownSpot": 1.0, "Healthy": 1.5, "Hispa": 0.8, "LeafBlast": 0.9}
PREFIXES = {"BrownSpot": "bs", "Healthy": "he", "Hispa": "hi", "LeafBlast": "lb"}
DUPLICATE_FRACTION = 0.02
MARKER = ".tune_rice_demo.json"
FORMAT = 1  # bump when the pictures change, so an old cached dataset is not taken for a new one
GENERATOR = "tune_rice.demo"  # the marker's maker: an id kept as written, not this module's path
MAX_PER_CLASS = 100_000
# The kinds of picture: the same classes and marks, in three settings of different character.
FAMILIES = {
    "field": "one blade in the field over soil, water or other leaves, any angle and scale (the default)",
    "plain": "a cut piece of leaf laid centred and upright on a grey or white sheet: distinct images "
    "with near-identical layout, as many disease sets are shot",
    "scans": "greyscale pen drawings of such leaves (outlines, hatched marks), scanned small and upscaled",
}
DEFAULT_FAMILY = "field"
MIN_SIZE, MAX_SIZE = 32, 2048

# Extra entropy words after (seed, class, index): separate streams for the plan and the duplicates.
_PLAN_STREAM = 1
_DUP_STREAM = 2


# ------------------------------------------------------------------------------------------ the plan
def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise UserError(f"unknown image family {family!r}; valid: {', '.join(FAMILIES)}")
    return family


def class_counts(per_class: int) -> dict[str, int]:
    """Images per class for ``per_class`` (originals and near-duplicates together)."""
    return {c: max(1, int(math.floor(CLASS_MULTIPLIERS[c] * per_class + 0.5))) for c in CLASSES}


@dataclass(frozen=True)
class _Job:
    label: str
    index: int  # 1-based, the number in the file name
    source: int | None  # for a near-duplicate: the index of the image it copies

    @property
    def relpath(self) -> str:
        return f"{self.label}/{PREFIXES[self.label]}_{self.index:04d}.jpg"


def _plan(per_class: int, seed: int) -> list[_Job]:
    """All files to write. Near-duplicates sit at random indices (their names give nothing away)."""
    jobs = []
    for ci, (label, n) in enumerate(class_counts(per_class).items()):
        n_dup = 0 if n < 4 else max(1, int(math.floor(DUPLICATE_FRACTION * n + 0.5)))
        rng = np.random.default_rng([seed, ci, 0, _PLAN_STREAM])
        dup_at = {int(i) + 1 for i in rng.choice(n, size=n_dup, replace=False)}
        originals = [i for i in range(1, n + 1) if i not in dup_at]
        sources = rng.choice(originals, size=n_dup, replace=False)
        source_of = dict(zip(sorted(dup_at), (int(s) for s in sources)))
        jobs += [_Job(label, i, source_of.get(i)) for i in range(1, n + 1)]
    return jobs


# ----------------------------------------------------------------------------------------- drawing
def image_rng(seed: int, label: str, index: int, stream: int = 0) -> np.random.Generator:
    """The random stream of one image: a function of (seed, class, index) only."""
    return np.random.default_rng([int(seed), CLASSES.index(label), int(index), stream])


def _smoothstep(e0, e1, x):
    """0 at ``e0``, 1 at ``e1`` with a smooth ramp between (``e0 > e1`` gives a falling edge)."""
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise (size, size) in about [0, 1]: a cells x cells grid upsampled bicubically."""
    small = rng.random((cells, cells), dtype=np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _paint(layer: np.ndarray, win, alpha: np.ndarray, rgb) -> None:
    """Alpha-blend ``rgb`` ((3,) or (h, w, 3)) over ``layer[win]`` in place; ``alpha`` (h, w) in 0..1."""
    sub = layer[win]
    sub += (np.asarray(rgb, dtype=np.float32) - sub) * alpha[..., None]


def _background(rng: np.random.Generator, S: int, sc: float) -> np.ndarray:
    """Out-of-focus surroundings (S, S, 3) float32: wet soil, paddy water or other rice leaves."""
    kind = rng.choice(3, p=[0.3, 0.25, 0.45])
    if kind == 0:  # wet soil / mud with small pebbles
        base = np.array([rng.uniform(0.28, 0.48), rng.uniform(0.2, 0.33), rng.uniform(0.12, 0.22)], np.float32)
        tex = 0.7 + 0.4 * _smooth_noise(rng, S, 6) + 0.25 * _smooth_noise(rng, S, max(4, S // 10))
        img = base * tex[..., None]
        pebbles = rng.random((S, S), dtype=np.float32) < 0.004
        img[pebbles] *= rng.uniform(0.5, 1.7)
        n_leaves = int(rng.integers(0, 4))
    elif kind == 1:  # paddy water reflecting the sky
        base = np.array([rng.uniform(0.16, 0.32), rng.uniform(0.22, 0.38), rng.uniform(0.26, 0.45)], np.float32)
        ripple = 0.8 + 0.4 * _smooth_noise(rng, S, 10)
        sky = _smooth_noise(rng, S, 4) ** 3 * rng.uniform(0.2, 0.55)
        img = base * ripple[..., None] + sky[..., None] * np.array([0.85, 0.9, 1.0], np.float32)
        n_leaves = int(rng.integers(1, 6))
    else:  # the field: other leaves, out of focus
        base = np.array([rng.uniform(0.08, 0.22), rng.uniform(0.18, 0.36), rng.uniform(0.05, 0.15)], np.float32)
        img = base * (0.7 + 0.6 * _smooth_noise(rng, S, 5))[..., None]
        n_leaves = int(rng.integers(4, 12))
    canvas = Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(n_leaves):
        colour = _hsv(rng.uniform(0.16, 0.32), rng.uniform(0.3, 0.8), rng.uniform(0.2, 0.7))
        theta = rng.uniform(0, math.pi)
        c = rng.uniform(-0.2, 1.2, size=2) * S
        d = np.array([math.cos(theta), math.sin(theta)])
        n = np.array([-d[1], d[0]])
        half, w = rng.uniform(0.3, 0.8) * S, rng.uniform(0.02, 0.07) * S
        pts = [c - half * d + w * n, c + w * 0.9 * n, c + half * d, c - w * 0.9 * n, c - half * d - w * n]
        draw.polygon([tuple(map(float, p)) for p in pts], fill=tuple(int(255 * x) for x in colour))
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 5.0) * sc))  # out of focus
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _sheet(rng: np.random.Generator, S: int) -> np.ndarray:
    """A plain backdrop (S, S, 3) float32: a grey card or a white sheet, faintly tinted and uneven."""
    level = rng.uniform(0.5, 0.72) if rng.random() < 0.5 else rng.uniform(0.84, 0.96)
    tint = (level * rng.uniform(0.97, 1.03, size=3)).astype(np.float32)
    return tint * (1 + 0.03 * (_smooth_noise(rng, S, 4) - 0.5))[..., None]


@dataclass
class _Blade:
    """The main leaf in image pixels: ``u`` runs along the axis towards the tip, ``v`` across it."""

    cx: float
    cy: float
    theta: float
    width: float  # full width at the widest point (px)
    tip: float  # u of the tip (px from the centre point; beyond the frame for many leaves)
    taper: float  # length over which the blade narrows to the tip (px)
    bend: float  # curvature: v is measured from the curve v = bend * u^2 / S
    S: int
    base: float = -math.inf  # u where a cut piece of leaf ends (px); -inf: it runs out of the frame

    @classmethod
    def random(cls, rng: np.random.Generator, S: int) -> _Blade:
        tip_in_frame = rng.random() < 0.4
        return cls(
            cx=S * (0.5 + rng.uniform(-0.15, 0.15)),
            cy=S * (0.5 + rng.uniform(-0.15, 0.15)),
            theta=rng.uniform(0, 2 * math.pi),
            width=S * rng.uniform(0.25, 0.45),
            tip=S * (rng.uniform(0.2, 0.6) if tip_in_frame else rng.uniform(1.0, 1.5)),
            taper=S * rng.uniform(0.5, 1.1),
            bend=rng.uniform(-0.25, 0.25),
            S=S,
        )

    @classmethod
    def laid_out(cls, rng: np.random.Generator, S: int) -> _Blade:
        """A cut piece of leaf laid on a sheet the way a photographer does it every time: centred,
        tip up, nearly upright, the whole piece in the frame. Distinct leaves look alike as a whole."""
        return cls(
            cx=S * (0.5 + rng.uniform(-0.04, 0.04)),
            cy=S * (0.5 + rng.uniform(-0.04, 0.04)),
            theta=-math.pi / 2 + rng.uniform(-0.15, 0.15),
            width=S * rng.uniform(0.2, 0.3),
            tip=S * rng.uniform(0.36, 0.46),
            taper=S * rng.uniform(0.3, 0.6),
            bend=rng.uniform(-0.12, 0.12),
            S=S,
            base=-S * rng.uniform(0.36, 0.46),
        )

    def frame(self, xx: np.ndarray, yy: np.ndarray, dx: float = 0.0, dy: float = 0.0):
        """Per pixel: (u, v, half-width at u), all (S, S) px; ``dx, dy`` shift the blade (its shadow)."""
        c, s = math.cos(self.theta), math.sin(self.theta)
        x, y = xx - (self.cx + dx), yy - (self.cy + dy)
        u = x * c + y * s
        v = -x * s + y * c - self.bend * u * u / self.S
        hw = 0.5 * self.width * np.clip((self.tip - u) / self.taper, 0.0, 1.0) ** 0.7
        return u, v, hw


class _Leaf:
    """The blade's colour layer and coordinates, with helpers to put marks on it."""

    def __init__(self, rng: np.random.Generator, blade: _Blade, colour: np.ndarray, u, v, hw, alpha):
        self.rng, self.blade, self.colour = rng, blade, colour
        self.u, self.v, self.hw, self.alpha = u, v, hw, alpha
        S = blade.S
        inner = (np.abs(v) < 0.8 * hw) & (alpha > 0.999)
        inner[:2, :] = inner[-2:, :] = inner[:, :2] = inner[:, -2:] = False
        self._spots = np.flatnonzero(inner)
        self.S, self.width = S, blade.width

    def place(self):
        """A random point well inside the visible blade: (row, col, u, v), or None if there is none."""
        if self._spots.size == 0:
            return None
        flat = int(self._spots[self.rng.integers(self._spots.size)])
        r, c = divmod(flat, self.S)
        jitter = self.rng.uniform(-0.5, 0.5, size=2)
        return r, c, float(self.u[r, c] + jitter[0]), float(self.v[r, c] + jitter[1])

    def slices(self, r: int, c: int, radius: float) -> tuple[slice, slice]:
        """The square of pixels within ``radius`` (px) of row ``r``, column ``c``, cut to the image."""
        R = int(math.ceil(radius)) + 1
        return slice(max(0, r - R), min(self.S, r + R + 1)), slice(max(0, c - R), min(self.S, c + R + 1))

    def window(self, r: int, c: int, radius: float, uk: float, vk: float):
        """:meth:`slices` and the offsets (du, dv) of its pixels from (uk, vk) in leaf coordinates."""
        win = self.slices(r, c, radius)
        return win, self.u[win] - uk, self.v[win] - vk


# Leaf tint ranges (hue, saturation, value in HSV 0..1) and the chance of a yellowing tip. A sick plant
# is a little less vivid: BrownSpot leaves yellower, Hispa leaves paler, blasted leaves duller. The
# ranges overlap widely; the marks are the real signature.
_TINTS = {
    "Healthy": ((0.22, 0.33), (0.55, 0.9), (0.4, 0.75), 0.3),
    "BrownSpot": ((0.14, 0.26), (0.45, 0.8), (0.4, 0.72), 0.8),
    "Hispa": ((0.19, 0.3), (0.25, 0.65), (0.5, 0.85), 0.4),
    "LeafBlast": ((0.19, 0.3), (0.25, 0.65), (0.28, 0.58), 0.4),
}


def _leaf_colour(rng: np.random.Generator, label: str, blade: _Blade, u, v, hw, S: int) -> np.ndarray:
    """The blade's colour before marks (S, S, 3): tint, shading, a pale midrib, fine veins."""
    hue, sat, value, p_yellow = _TINTS[label]
    val = rng.uniform(*value)
    base = _hsv(rng.uniform(*hue), rng.uniform(*sat), val)
    rel = np.clip(v / np.maximum(hw, 1e-3), -1, 1)  # -1..1 across the blade
    knots = np.linspace(-1.6 * S, 1.6 * S, 12)
    along = np.interp(u, knots, rng.normal(0.0, 1.0, 12)).astype(np.float32)
    fold, tilt = rng.uniform(0.0, 0.2), rng.uniform(-0.2, 0.2)  # the blade is slightly folded along the rib
    shade = 1 + 0.06 * along + tilt * rel - fold * rel * rel + 0.1 * (_smooth_noise(rng, S, 8) - 0.5)
    colour = base * shade[..., None]
    yellowing = rng.uniform(0.0, 0.4) if rng.random() < p_yellow else 0.0  # older leaves: yellower tip
    if yellowing:
        toward = np.clip(u / blade.tip, 0, 1) ** 2 * yellowing
        colour += (_hsv(0.15, 0.65, val * 1.15) - colour) * toward[..., None]
    period = blade.width / rng.uniform(10, 20)
    if period >= 2.5:  # finer veins would only alias
        vein = (0.5 + 0.5 * np.cos(2 * math.pi * v / period + rng.uniform(0, 2 * math.pi))) ** 4
        amp = rng.uniform(0.04, 0.1)
        colour *= (1 + amp * (vein - 0.3))[..., None]
    mw = max(blade.width * rng.uniform(0.025, 0.05), 0.6)
    rib = np.exp(-(((v - blade.width * rng.uniform(-0.05, 0.05)) / mw) ** 2))
    pale = np.clip(base * 1.3 + np.array([0.06, 0.06, 0.0], np.float32), 0, 1)
    colour += (pale - colour) * (rng.uniform(0.35, 0.7) * rib)[..., None]
    return colour.astype(np.float32)


# The signatures. Sizes are relative to the blade width so they scale with the picture.
def _brown_spots(leaf: _Leaf) -> None:
    rng = leaf.rng
    size = leaf.width * rng.uniform(0.05, 0.11)  # this leaf's typical spot radius (px)
    for _ in range(int(rng.integers(2, 17))):
        at = leaf.place()
        if at is None:
            return
        r0, c0, uk, vk = at
        r = max(size * rng.uniform(0.7, 1.3), 0.6)
        aspect, halo, halo_alpha = rng.uniform(1.0, 1.8), rng.uniform(1.5, 2.4), rng.uniform(0.2, 0.65)
        win, du, dv = leaf.window(r0, c0, r * aspect * halo + 1, uk, vk)
        phi = np.arctan2(dv, du)
        wobble = 1 + 0.1 * np.sin(3 * phi + rng.uniform(0, 6.3)) + 0.06 * np.sin(5 * phi + rng.uniform(0, 6.3))
        # normalised distance from the spot's centre: 1 on the spot's (irregular) rim
        d = np.sqrt((du / (r * aspect)) ** 2 + (dv / r) ** 2) * wobble
        yellow = _hsv(rng.uniform(0.12, 0.16), rng.uniform(0.55, 0.75), rng.uniform(0.7, 0.85))
        _paint(leaf.colour, win, halo_alpha * np.clip((halo - d) / (halo - 1), 0, 1) ** 1.5, yellow)
        margin = np.array([rng.uniform(0.33, 0.48), rng.uniform(0.16, 0.26), rng.uniform(0.05, 0.11)], np.float32)
        centre = np.array([rng.uniform(0.45, 0.62), rng.uniform(0.32, 0.45), rng.uniform(0.15, 0.28)], np.float32)
        t = np.clip(d, 0, 1)[..., None] ** 2
        spot = centre + (margin - centre) * t  # tan centre, dark brown rim
        _paint(leaf.colour, win, rng.uniform(0.75, 1.0) * _smoothstep(1.1, 0.85, d), spot)


def _blast_lesions(leaf: _Leaf) -> None:
    rng = leaf.rng
    for _ in range(int(rng.integers(2, 13))):
        at = leaf.place()
        if at is None:
            return
        r0, c0, uk, vk = at
        a = leaf.width * rng.uniform(0.25, 0.7)  # half-length along the leaf (px)
        b = min(a * rng.uniform(0.22, 0.4), 0.3 * leaf.width)  # half-width (px)
        early = rng.random() < 0.25  # young lesions: small, all brown
        if early:
            a, b = a * 0.4, b * 0.7
        a, b = max(a, 1.0), max(b, 0.6)
        win, du, dv = leaf.window(r0, c0, 1.4 * a + 1, uk, vk)
        # Spindle: |dv| = b (1 - (du/a)^2) at d = 1, pointed at both ends along the leaf, round mid-way.
        d = (du / a) ** 2 + np.abs(dv) / b
        d *= 1 + 0.08 * np.sin(du / a * rng.uniform(3, 7) + rng.uniform(0, 6.3)) * np.sign(dv + 1e-6)
        yellow = _hsv(rng.uniform(0.12, 0.17), rng.uniform(0.4, 0.65), rng.uniform(0.6, 0.8))
        _paint(leaf.colour, win, rng.uniform(0.1, 0.35) * np.clip((1.4 - d) / 0.4, 0, 1), yellow)
        brown = np.array([rng.uniform(0.38, 0.55), rng.uniform(0.2, 0.3), rng.uniform(0.08, 0.15)], np.float32)
        _paint(leaf.colour, win, rng.uniform(0.8, 1.0) * _smoothstep(1.08, 0.9, d), brown)
        if not early:
            g = rng.uniform(0.52, 0.72)
            grey = np.array([g, g * rng.uniform(0.97, 1.03), g * rng.uniform(0.85, 0.95)], np.float32)
            ci = rng.uniform(0.3, 0.6)
            _paint(leaf.colour, win, rng.uniform(0.7, 0.95) * _smoothstep(ci + 0.15, ci - 0.1, d), grey)


def _whitish() -> np.ndarray:
    return np.array([0.86, 0.87, 0.74], np.float32)


def _hispa_damage(leaf: _Leaf) -> None:
    rng = leaf.rng
    for _ in range(int(rng.integers(2, 8))):  # groups of parallel scraped streaks
        at = leaf.place()
        if at is None:
            return
        r0, c0, uk, vk = at
        n, spacing = int(rng.integers(1, 5)), leaf.width * rng.uniform(0.05, 0.1)
        half = leaf.width * rng.uniform(0.15, 0.8)
        win, du0, dv0 = leaf.window(r0, c0, half + n * spacing + 2, uk, vk)
        for k in range(n):
            du = du0 - rng.normal(0, 0.2 * half)
            dv = dv0 - (k - (n - 1) / 2) * spacing - rng.normal(0, 0.2 * spacing)
            w = max(leaf.width * rng.uniform(0.012, 0.035), 0.45)
            h = half * rng.uniform(0.6, 1.2)
            a = np.clip(w + 0.5 - np.abs(dv), 0, 1) * _smoothstep(h, 0.7 * h, np.abs(du))
            _paint(leaf.colour, win, rng.uniform(0.55, 0.9) * a, _whitish() * rng.uniform(0.92, 1.05))
    if rng.random() < 0.5:  # a scraped blotch: a whitish translucent patch along the veins
        at = leaf.place()
        if at is not None:
            r0, c0, uk, vk = at
            a, b = leaf.width * rng.uniform(0.2, 0.5), leaf.width * rng.uniform(0.05, 0.12)
            win, du, dv = leaf.window(r0, c0, a + 1, uk, vk)
            d = np.sqrt((du / a) ** 2 + (dv / b) ** 2)
            mottle = 0.7 + 0.3 * np.cos(dv / max(b, 1) * 6 + rng.uniform(0, 6.3))
            _paint(leaf.colour, win, rng.uniform(0.35, 0.6) * mottle * _smoothstep(1.0, 0.7, d), _whitish())
    if rng.random() < 0.45:  # the beetles themselves: tiny dark ovals lined up with the leaf
        for _ in range(int(rng.integers(1, 4))):
            at = leaf.place()
            if at is None:
                return
            r0, c0, uk, vk = at
            half = max(leaf.width * rng.uniform(0.035, 0.06), 1.0)
            win, du, dv = leaf.window(r0, c0, half + 1, uk, vk)
            ang = rng.normal(0, 0.3)
            du, dv = du * math.cos(ang) + dv * math.sin(ang), -du * math.sin(ang) + dv * math.cos(ang)
            d = np.sqrt((du / half) ** 2 + (dv / (0.55 * half)) ** 2)
            dark = np.array([0.05, 0.05, 0.08], np.float32) * rng.uniform(0.7, 1.5)
            _paint(leaf.colour, win, 0.95 * _smoothstep(1.15, 0.85, d), dark)


def _distractors(leaf: _Leaf, p: float) -> None:
    """Marks that mean nothing: dew drops, soil specks, a light scratch."""
    rng = leaf.rng
    if rng.random() < p:  # dew: round in the image, a darker rim and a specular highlight
        for _ in range(int(rng.integers(2, 20))):
            at = leaf.place()
            if at is None:
                break
            r0, c0, _, _ = at
            r = max(leaf.width * rng.uniform(0.015, 0.05), 0.6)
            win = leaf.slices(r0, c0, r + 1)
            yy, xx = np.mgrid[win]
            d = np.hypot(yy - r0, xx - c0) / r
            body = _smoothstep(1.1, 0.8, d)
            sub = leaf.colour[win]
            sub *= (1 - 0.25 * body * _smoothstep(0.5, 1.0, d) + 0.2 * body)[..., None]
            hl = np.hypot(yy - (r0 - 0.35 * r), xx - (c0 - 0.35 * r)) / max(0.35 * r, 0.5)
            _paint(leaf.colour, win, 0.9 * _smoothstep(1.2, 0.6, hl), np.ones(3, np.float32))
    if rng.random() < p:  # soil specks: tiny dark irregular dots
        for _ in range(int(rng.integers(1, 9))):
            at = leaf.place()
            if at is None:
                break
            r0, c0, uk, vk = at
            r = max(leaf.width * rng.uniform(0.008, 0.025), 0.5)
            win, du, dv = leaf.window(r0, c0, r + 1, uk, vk)
            d = np.hypot(du, dv * rng.uniform(0.7, 1.4)) / r
            soil = np.array([0.24, 0.17, 0.1], np.float32) * rng.uniform(0.6, 1.3)
            _paint(leaf.colour, win, rng.uniform(0.7, 1.0) * _smoothstep(1.2, 0.7, d), soil)
    if rng.random() < 0.3 * p:  # one faint scratch, looks a little like Hispa
        at = leaf.place()
        if at is not None:
            r0, c0, uk, vk = at
            half = leaf.width * rng.uniform(0.3, 1.0)
            win, du, dv = leaf.window(r0, c0, half + 1, uk, vk)
            a = np.clip(0.9 - np.abs(dv), 0, 1) * _smoothstep(half, 0.6 * half, np.abs(du))
            _paint(leaf.colour, win, rng.uniform(0.2, 0.45) * a, _whitish())


_SIGNATURES = {"BrownSpot": _brown_spots, "LeafBlast": _blast_lesions, "Hispa": _hispa_damage}


def render_image(
    label: str, index: int, *, size: int = 256, seed: int = 0, family: str = "field"
) -> tuple[np.ndarray, int]:
    """Draw image ``index`` of class ``label`` in ``family``: (uint8 array, its JPEG quality).

    The array is RGB (size, size, 3) for ``field`` and ``plain``, greyscale (size, size) for ``scans``.
    """
    if label not in CLASSES:
        raise UserError(f"unknown class {label!r}; valid: {', '.join(CLASSES)}")
    check_family(family)
    rng = image_rng(seed, label, index)
    if family == "scans":
        # Drawn small, then upscaled like an old scan blown up to the set's size.
        small = max(MIN_SIZE // 2, int(round(size * rng.uniform(0.33, 0.5))))
        grey = _scan(rng, _photo(rng, label, small, "plain"), small)
        resample = Image.Resampling.BILINEAR if rng.random() < 0.5 else Image.Resampling.BICUBIC
        up = Image.fromarray((np.clip(grey, 0, 1) * 255 + 0.5).astype(np.uint8)).resize((size, size), resample)
        return np.asarray(up), int(rng.integers(70, 96))
    # A sheet is shot under even studio light: a third of the field's lighting gradient and vignette.
    light = 1.0 if family == "field" else 1 / 3
    return _camera(rng, _photo(rng, label, int(size), family), int(size), light=light)


def _photo(rng: np.random.Generator, label: str, S: int, family: str) -> np.ndarray:
    """The scene before the camera (S, S, 3) float32: the background, the leaf and its shadow."""
    sc = S / 256.0
    healthy = label == "Healthy"
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    if family == "field":
        img = _background(rng, S, sc)
        blade = _Blade.random(rng, S)
    else:
        img = _sheet(rng, S)
        blade = _Blade.laid_out(rng, S)
    u, v, hw = blade.frame(xx, yy)
    alpha = np.clip(hw - np.abs(v) + 0.5, 0, 1) * np.clip(2 * hw, 0, 1)  # antialiased edge, fading tip
    if family != "field":  # a cut piece of leaf: its base ends inside the frame too
        alpha *= np.clip(u - blade.base + 0.5, 0, 1)
    colour = _leaf_colour(rng, label, blade, u, v, hw, S)
    if rng.random() < (0.5 if healthy else 0.2):  # a torn tip: ragged cut, dried edge
        u_cut = blade.tip - rng.uniform(0.15, 0.5) * blade.taper
        period, amp = blade.width * rng.uniform(0.15, 0.4), blade.width * rng.uniform(0.1, 0.4)
        zigzag = np.abs(((v / period + rng.uniform(0, 1)) % 1.0) - 0.5) * 2
        inside = u_cut + amp * zigzag - u  # px inside the cut
        alpha *= np.clip(inside + 0.5, 0, 1)
        straw = np.array([0.68, 0.6, 0.36], np.float32)
        colour += (straw - colour) * (0.8 * _smoothstep(3.0 * max(sc, 0.4), 0.0, inside))[..., None]

    leaf = _Leaf(rng, blade, colour, u, v, hw, alpha)
    if not healthy:
        _SIGNATURES[label](leaf)
    _distractors(leaf, 0.5 if healthy else 0.3)

    # The blade's soft shadow on what is behind it, then the blade itself.
    shift, ang = rng.uniform(2, 8) * sc, rng.uniform(0, 2 * math.pi)
    su, sv, shw = blade.frame(xx, yy, shift * math.cos(ang), shift * math.sin(ang))
    shadow = np.clip(shw - np.abs(sv), 0, 1) * np.clip(2 * shw, 0, 1)
    if family != "field":
        shadow *= np.clip(su - blade.base + 0.5, 0, 1)
    shadow = ndimage.gaussian_filter(shadow, sigma=max(rng.uniform(2, 6) * sc, 0.5))
    img *= (1 - rng.uniform(0.15, 0.45) * shadow)[..., None]
    img += (leaf.colour - img) * alpha[..., None]

    return img


def _camera(rng: np.random.Generator, img: np.ndarray, S: int, *, light: float = 1.0) -> tuple[np.ndarray, int]:
    """The camera's marks on a scene (S, S, 3): uint8 RGB and the JPEG quality to save it at.

    ``light`` scales the strength of the lighting gradient and the vignette."""
    sc = S / 256.0
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) + 0.5
    # Lighting gradient and vignette, exposure, white balance, a little blur, sensor noise.
    phi = rng.uniform(0, 2 * math.pi)
    gradient = light * rng.uniform(0.15, 0.5)
    shade = 1 + gradient * ((xx - S / 2) * math.cos(phi) + (yy - S / 2) * math.sin(phi)) / S
    shade *= 1 - light * rng.uniform(0.0, 0.25) * ((xx - S / 2) ** 2 + (yy - S / 2) ** 2) / (S / 2) ** 2
    gain = rng.uniform(0.85, 1.2) * rng.uniform(0.93, 1.07, size=3).astype(np.float32)
    img *= shade[..., None] * gain
    sigma = rng.uniform(0.3, 0.9) * sc
    if sigma >= 0.25:
        img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0))
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0.004, 0.018)
    quality = int(rng.integers(70, 96))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), quality


def _scan(rng: np.random.Generator, scene: np.ndarray, S: int) -> np.ndarray:
    """A pen drawing of a scene on paper (S, S) float32 in 0..1: outlines and veins in ink, the dark
    marks hatched, on slightly uneven paper, as a flatbed scanner sees it."""
    grey = scene @ np.array([0.299, 0.587, 0.114], np.float32)  # (S, S)
    soft = ndimage.gaussian_filter(grey, 0.6 * max(S / 128.0, 0.5))
    edges = np.hypot(ndimage.sobel(soft, 0), ndimage.sobel(soft, 1))
    ink = np.clip((edges - 0.06) * rng.uniform(2.5, 4.0), 0, 1)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    period = max(3.0, S / rng.uniform(24, 40))
    hatch = (((xx + yy) % period) < 0.45 * period).astype(np.float32)
    dark = np.clip((rng.uniform(0.38, 0.48) - grey) * 3.0, 0, 1)
    paper = rng.uniform(0.86, 0.97) * (1 + 0.04 * (_smooth_noise(rng, S, 5) - 0.5))
    out = paper * (1 - rng.uniform(0.75, 0.95) * ink) * (1 - 0.5 * dark * hatch)
    out = ndimage.gaussian_filter(out, rng.uniform(0.3, 0.6))
    return out + rng.standard_normal(out.shape, dtype=np.float32) * rng.uniform(0.003, 0.012)


def _jpeg(image: Image.Image | np.ndarray, quality: int) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def _near_duplicate(original: bytes, rng: np.random.Generator, quality: int) -> tuple[bytes, str]:
    """Another file of the same picture: decoded, maybe shifted and/or brightened, re-encoded."""
    with Image.open(io.BytesIO(original)) as opened:
        im = opened.convert("L" if opened.mode == "L" else "RGB")  # a greyscale scan stays greyscale
    S = im.width
    how = []
    kind = rng.choice(3)  # 0: re-encode only, 1: shift, 2: brighten (each also re-encodes)
    if kind == 1 or rng.random() < 0.25:
        cut = int(rng.integers(2, max(3, S // 40) + 1))  # a few px: crop then resize back
        left, top = int(rng.integers(0, cut + 1)), int(rng.integers(0, cut + 1))
        im = im.resize((S, S), Image.Resampling.BICUBIC, box=(left, top, left + S - cut, top + S - cut))
        how.append(f"shift{cut}px")
    if kind == 2 or rng.random() < 0.25:
        factor = float(rng.choice([rng.uniform(0.85, 0.94), rng.uniform(1.06, 1.18)]))
        im = ImageEnhance.Brightness(im).enhance(factor)
        how.append(f"brightness{factor:.2f}")
    q = int(rng.integers(70, 96))
    if q == quality:
        q = quality - 7 if quality > 80 else quality + 7
    how.append(f"q{q}")
    return _jpeg(im, q), "+".join(how)


# The kinds of copy public image sets hold beside their originals (often shipped pre-augmented), as
# made by :func:`copy_image`; the near-duplicate check must group each with its source.
COPY_KINDS = ("jpeg", "resize", "brightness", "crop", "shift", "flip", "rotate")


def copy_image(image: Image.Image, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """One copy of ``image`` of the given kind, as JPEG bytes, and how it was made.

    ``jpeg``: re-encoded at quality 50-95; ``resize``: 0.5-2x; ``brightness``: brightness and contrast
    each x0.85-1.15; ``crop``: up to 10% off each side (kept at the cropped size); ``shift``: moved up
    to 4% of the width and height, the edge filled black; ``flip``: horizontal or vertical;
    ``rotate``: 90, 180 or 270 degrees. All but ``jpeg`` are saved at quality 90.
    """
    im = image.convert("L" if image.mode == "L" else "RGB")
    W, H = im.size
    quality = 90
    if kind == "jpeg":
        quality = int(rng.integers(50, 96))
        how = f"q{quality}"
    elif kind == "resize":
        f = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        im = im.resize((max(8, round(W * f)), max(8, round(H * f))), Image.Resampling.BICUBIC)
        how = f"x{f:.2f}"
    elif kind == "brightness":
        b, c = rng.uniform(0.85, 1.15, size=2)
        im = ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(b)).enhance(c)
        how = f"brightness{b:.2f}+contrast{c:.2f}"
    elif kind == "crop":
        left, top, right, bottom = rng.uniform(0, 0.10, size=4)
        im = im.crop((round(left * W), round(top * H), W - round(right * W), H - round(bottom * H)))
        how = f"crop{left:.2f},{top:.2f},{right:.2f},{bottom:.2f}"
    elif kind == "shift":
        dx, dy = rng.uniform(-0.04, 0.04, size=2) * (W, H)
        im = im.transform(im.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy), Image.Resampling.BILINEAR)
        how = f"shift{dx:+.0f},{dy:+.0f}px"
    elif kind == "flip":
        horizontal = bool(rng.random() < 0.5)
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT if horizontal else Image.Transpose.FLIP_TOP_BOTTOM)
        how = "flip-h" if horizontal else "flip-v"
    elif kind == "rotate":
        k = int(rng.integers(1, 4))
        im = im.transpose((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)[k - 1])
        how = f"rot{90 * k}"
    else:
        raise UserError(f"unknown kind of copy {kind!r}; valid: {', '.join(COPY_KINDS)}")
    return _jpeg(im, quality), how


def _render_job(job: _Job, size: int, seed: int, family: str = DEFAULT_FAMILY) -> tuple[str, bytes, str]:
    """(relative path, JPEG bytes, how it was made) for one file."""
    if job.source is None:
        arr, quality = render_image(job.label, job.index, size=size, seed=seed, family=family)
        return job.relpath, _jpeg(arr, quality), ""
    arr, quality = render_image(job.label, job.source, size=size, seed=seed, family=family)
    data, how = _near_duplicate(_jpeg(arr, quality), image_rng(seed, job.label, job.index, _DUP_STREAM), quality)
    return job.relpath, data, how


def _render_star(args):
    return _render_job(*args)


# ---------------------------------------------------------------------------------- the dataset folder
def _params(per_class: int, size: int, seed: int, family: str = DEFAULT_FAMILY) -> dict:
    return {
        "generator": GENERATOR,
        "format": FORMAT,
        "family": family,
        "per_class": per_class,
        "size": size,
        "seed": seed,
    }


def _check_params(per_class, size, seed, *, names=("per_class", "size", "seed")) -> tuple[int, int, int]:
    n_per_class, n_size, n_seed = names
    for name, value in zip(names, (per_class, size, seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise UserError(f"{name} must be an integer, got {value!r}")
    if not 1 <= per_class <= MAX_PER_CLASS:
        raise UserError(f"{n_per_class} must be between 1 and {MAX_PER_CLASS}, got {per_class}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UserError(f"{n_size} must be between {MIN_SIZE} and {MAX_SIZE} px, got {size}")
    if seed < 0:
        raise UserError(f"{n_seed} must be >= 0, got {seed}")
    return int(per_class), int(size), int(seed)


def _existing(out: Path, params: dict) -> str:
    """'missing', 'empty' or 'ready' (a complete demo with these params); UserError for anything else."""
    if not out.exists():
        return "missing"
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; choose another output path")
    if not any(out.iterdir()):
        return "empty"
    marker = out / MARKER
    try:
        found = json.loads(marker.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{out}: folder is not empty and is not a tune_rice demo dataset (no {MARKER}); "
            "choose a new or empty folder"
        ) from None
    except (OSError, ValueError) as e:
        raise UserError(f"{marker}: unreadable marker ({e}); delete {out} or choose another folder") from None
    # Markers written before there were families hold field pictures.
    got = (
        {k: found.get(k, DEFAULT_FAMILY if k == "family" else None) for k in params} if isinstance(found, dict) else {}
    )
    if got != params:

        def show(d):
            return ", ".join(f"{k}={d.get(k)}" for k in ("family", "per_class", "size", "seed", "format"))

        raise UserError(
            f"{out}: holds a demo dataset made with other parameters ({show(got)}, not "
            f"{show(params)}); delete it or choose another folder"
        )
    for label, n in found.get("counts", {}).items():
        if len(list((out / label).glob("*.jpg"))) != n:
            raise UserError(f"{out}: demo dataset is incomplete ({label} should have {n} images); delete it")
    return "ready"


def _default_workers(n_images: int) -> int:
    # One process draws the default set (840 images) in ~13 s; spawning workers (imports) only pays off
    # for bigger sets, and not at all on a busy machine.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8, n_images // 1000))


def generate_demo(
    out_dir: str | os.PathLike,
    *,
    per_class: int = 200,
    size: int = 256,
    seed: int = 0,
    family: str = DEFAULT_FAMILY,
    workers: int | None = None,
) -> Path:
    """Write the synthetic dataset to ``out_dir`` and return it as a Path.

    ``per_class`` scales the class sizes (:func:`class_counts`), ``size`` is the square image side in
    pixels, ``seed`` fixes every pixel, ``family`` is the kind of picture (:data:`FAMILIES`). Idempotent: if ``out_dir`` already holds a demo made with the
    same parameters nothing is written. A non-empty folder that is not such a demo is refused
    (:class:`UserError`) and left alone. Files are generated in ``<out_dir>.tmp-<pid>`` and renamed at
    the end, so an interrupted run never leaves a half dataset at ``out_dir``. ``workers`` processes
    draw in parallel (default: by CPU count and dataset size; the output does not depend on it).
    """
    per_class, size, seed = _check_params(per_class, size, seed)
    check_family(family)
    out = Path(out_dir).expanduser()
    params = _params(per_class, size, seed, family)
    if _existing(out, params) == "ready":
        log.info(
            "%s: demo dataset already there (family=%s, per_class=%d, size=%d, seed=%d)",
            out,
            family,
            per_class,
            size,
            seed,
        )
        return out
    jobs = _plan(per_class, seed)
    workers = _default_workers(len(jobs)) if workers is None else max(1, int(workers))
    tmp = out.absolute().with_name(f"{out.absolute().name}.tmp-{os.getpid()}")
    stale = sorted(tmp.parent.glob(f"{glob.escape(out.absolute().name)}.tmp-*")) if tmp.parent.is_dir() else []
    if stale:  # not removed: on a shared file system another machine may be writing it right now
        log.warning("%s: left over from an interrupted run? delete it if nothing is writing there", stale[0])
    t0 = time.perf_counter()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        duplicates = _draw_all(tmp, jobs, size=size, seed=seed, family=family, workers=workers)
        marker = {
            **params,
            "classes": list(CLASSES),
            "counts": class_counts(per_class),
            "class_multipliers": CLASS_MULTIPLIERS,
            "near_duplicates": duplicates,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        try:
            if out.is_dir():
                out.rmdir()  # empty (checked above); fails if someone filled it meanwhile
            os.rename(tmp, out)
        except OSError:
            if _existing(out, params) == "ready":  # a concurrent run finished first: same files
                log.info("%s: demo dataset was written meanwhile by another process", out)
                return out
            raise UserError(f"{out}: could not move the generated dataset into place") from None
    except PermissionError as e:
        raise UserError(f"{e.filename or out}: permission denied; choose another output folder") from None
    except OSError as e:
        if e.filename is None:
            raise
        raise UserError(f"{e.filename}: cannot write the demo dataset ({e.strerror})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "wrote %d images (%d near-duplicates) to %s in %.1f s",
        len(jobs),
        len(duplicates),
        out,
        time.perf_counter() - t0,
    )
    return out


def _draw_all(tmp: Path, jobs: list[_Job], *, size: int, seed: int, family: str, workers: int) -> list[dict]:
    """Draw and write every image into ``tmp/<class>/`` (in ``workers`` processes); the near-duplicates'
    records."""
    for label in CLASSES:
        (tmp / label).mkdir(parents=True)
    args = [(job, size, seed, family) for job in jobs]
    with _progress(len(jobs)) as bar:
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")  # no fork of a parent that may hold torch threads
            with ctx.Pool(workers) as pool:
                return _write_all(tmp, jobs, pool.imap(_render_star, args, chunksize=8), bar)
        return _write_all(tmp, jobs, map(_render_star, args), bar)


def _write_all(tmp: Path, jobs: list[_Job], results, bar) -> list[dict]:
    duplicates = []
    for job, (relpath, data, how) in zip(jobs, results):
        (tmp / relpath).write_bytes(data)
        if job.source is not None:
            duplicates.append({"path": relpath, "source": _Job(job.label, job.source, None).relpath, "how": how})
        bar.update(1)
    return duplicates


def _progress(total: int):
    return tqdm(total=total, desc="demo images", unit="img", disable=None, leave=False)


def dataset_name(*, per_class: int = 200, size: int = 256, seed: int = 0, family: str = DEFAULT_FAMILY) -> str:
    kind = "" if family == DEFAULT_FAMILY else f"{family}-"
    return f"rice-{kind}p{per_class}-s{size}-seed{seed}"


def default_demo_dir() -> Path:
    """Where :func:`ensure_demo` keeps datasets: ``$TUNE_RICE_CACHE/demo`` or ``~/.cache/tune_rice/demo``."""
    return cache_root() / "demo"


def ensure_demo(
    *,
    per_class: int = 200,
    size: int = 256,
    seed: int = 0,
    family: str = DEFAULT_FAMILY,
    root: str | os.PathLike | None = None,
) -> Path:
    """The demo dataset folder ``<root>/rice-p<N>-s<PX>-seed<S>``, generated first if missing.

    Families other than ``field`` get ``rice-<family>-p<N>-...``. ``root`` defaults to
    :func:`default_demo_dir`.
    """
    per_class, size, seed = _check_params(per_class, size, seed)
    check_family(family)
    root = Path(root).expanduser() if root is not None else default_demo_dir()
    return generate_demo(
        root / dataset_name(per_class=per_class, size=size, seed=seed, family=family),
        per_class=per_class,
        size=size,
        seed=seed,
        family=family,
    )


# ------------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    order = sorted(CLASSES, key=lambda c: -CLASS_MULTIPLIERS[c])
    mult = ", ".join(f"{c} {CLASS_MULTIPLIERS[c]:.1f}N" for c in order)
    parser = argparse.ArgumentParser(
        prog=os.environ.get("TUNE_RICE_PROG", "python -m tune_rice demo"),
        description="Generate synthetic rice-leaf photos as OUT/<class>/*.jpg for the classes "
        f"{', '.join(CLASSES)}: one leaf blade per picture, the disease drawn on it (brown "
        "spots with a yellow halo, grey-centred spindle lesions, whitish Hispa streaks) and "
        "harmless distractors (dew, soil specks, torn tips) on every class.",
        epilog=f"Class sizes are imbalanced like the Kaggle set: {mult} (rounded). About "
        f"{DUPLICATE_FRACTION:.0%} of the files are near-duplicates of another image of the same class "
        f"(re-encoded, shifted or brightened; listed in OUT/{MARKER}). The same seed gives "
        "byte-identical files. Running again with the same parameters does nothing; a non-empty "
        "OUT that is not such a dataset is refused.",
    )
    parser.add_argument(
        "out", metavar="OUT", help="output folder: new, empty, or a previous demo with the same parameters"
    )
    parser.add_argument(
        "--family",
        default=DEFAULT_FAMILY,
        choices=list(FAMILIES),
        help="kind of picture, same classes and marks in each: " + "; ".join(f"{k}: {v}" for k, v in FAMILIES.items()),
    )
    parser.add_argument(
        "--per-class",
        type=int,
        default=200,
        metavar="N",
        help="images per class before the imbalance multipliers (default: %(default)s)",
    )
    parser.add_argument(
        "--size", type=int, default=256, metavar="PX", help="image side in pixels (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: %(default)s)")
    cli.add_num_workers_arg(
        parser, help="drawing processes (default: 1 below 2000 images; the files do not depend on it)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already printed)
        return e.code if isinstance(e.code, int) else 2
    cli.setup_logging(args.verbose)
    _check_params(args.per_class, args.size, args.seed, names=("--per-class", "--size", "--seed"))
    if args.num_workers is not None and args.num_workers < 1:
        raise UserError(f"--num-workers must be >= 1, got {args.num_workers}")
    generate_demo(
        args.out, per_class=args.per_class, size=args.size, seed=args.seed, family=args.family, workers=args.num_workers
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
