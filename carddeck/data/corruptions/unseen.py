"""Shifts outside the corruption catalog, to test the shift verdict on kinds of change it never saw.

Three families, each procedural (numpy only), with 3-5 severities: **colour** (hue rotation, channel
permutation, colour cast, desaturation, inversion, gamma dark and bright), **geometry** (rotation by small
angles and by quarter turns, flips, zoom-crop, translation with a black border) and **occlusion** (cutout,
posterize, solarize, vignette). They have a registry of their own (:data:`UNSEEN`), apart from
:data:`carddeck.data.corruptions.CORRUPTIONS`: ``carddeck shift --fit`` and ``carddeck corrupt`` never see
them, so an evaluation on them (``carddeck shift --unseen``) measures the detector on families held out of
every fit. Severity grows the change where a change has a size (angle, gain, area, bits); for a
permutation, flip or quarter turn the severities are different members of the kind.

``unseen_shift(images, name, severity, seed)`` maps uint8 [N, H, W, 3] to uint8 of the same shape, with
the catalog's checks and randomness (one generator per call from (seed, name), one draw per image).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from carddeck.data.corruptions import apply
from carddeck.data.corruptions._common import (
    bilinear_sample,
    clipped_zoom,
    hsv_to_rgb,
    rgb_to_gray,
    rgb_to_hsv,
)
from carddeck.errors import InvalidInput
from carddeck.registry import Registry


@dataclass(frozen=True)
class UnseenShift:
    family: str
    levels: tuple[Any, ...]  # one parameter per severity (1-based)
    fn: Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]  # float32 [N, H, W, 3] in [0, 1]


UNSEEN: Registry[UnseenShift] = Registry("unseen shift")
UNSEEN_FAMILIES = ("colour", "geometry", "occlusion")


def _register(name: str, family: str, levels: tuple[Any, ...]) -> Callable[[Callable[..., np.ndarray]], Any]:
    def add(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        UNSEEN.register(name)(UnseenShift(family, levels, fn))
        return fn

    return add


def unseen_shift(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Shift uint8 [N, H, W, 3] images by the unseen shift ``name`` at ``severity`` (1..its number of levels)."""
    shift = UNSEEN.get(name)
    n = len(shift.levels)
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= n:
        raise InvalidInput(f"unknown severity {severity!r} of {name}; valid severities: 1..{n}")
    return apply(shift.fn, name, images, shift.levels[int(severity) - 1], seed)


def unseen_conditions(families: tuple[str, ...] = UNSEEN_FAMILIES) -> list[tuple[str, int]]:
    """Every (shift, severity) of these families, in registry order."""
    unknown = sorted(set(families) - set(UNSEEN_FAMILIES))
    if unknown or not families:
        raise InvalidInput(f"unknown unseen families {unknown or 'none given'}; valid: {', '.join(UNSEEN_FAMILIES)}")
    return [(name, s) for name in UNSEEN if UNSEEN.get(name).family in families
            for s in range(1, len(UNSEEN.get(name).levels) + 1)]  # fmt: skip


def family_of(name: str) -> str:
    return UNSEEN.get(name).family


# -- colour ------------------------------------------------------------------------------------------
@_register("hue_rotate", "colour", (30, 60, 90, 120, 180))  # degrees
def hue_rotate(x: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    hsv = rgb_to_hsv(x)
    hsv[..., 0] = (hsv[..., 0] + degrees / 360.0) % 1.0
    return hsv_to_rgb(hsv)


@_register("channel_permute", "colour", ((1, 0, 2), (2, 1, 0), (0, 2, 1), (1, 2, 0)))  # RGB -> these channels
def channel_permute(x: np.ndarray, order: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    return x[..., list(order)]


@_register("colour_cast", "colour", (0.15, 0.3, 0.45, 0.6, 0.75))  # share of the light the cast's filter takes
def colour_cast(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A coloured filter of random hue per image: each channel loses ``strength`` x (1 - the filter's value)."""
    hue = np.stack([rng.uniform(0, 1, len(x)), np.ones(len(x)), np.ones(len(x))], -1).astype(np.float32)
    tint = hsv_to_rgb(hue)[:, None, None, :]
    return x * (1 - strength * (1 - tint))


@_register("desaturate", "colour", (0.25, 0.5, 0.75, 1.0))  # share of the way to grey
def desaturate(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    return x + amount * (rgb_to_gray(x) - x)


@_register("invert", "colour", ((2,), (1, 2), (0, 1, 2)))  # the channels inverted
def invert(x: np.ndarray, channels: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    out = x.copy()
    out[..., list(channels)] = 1 - out[..., list(channels)]
    return out


@_register("gamma_dark", "colour", (1.5, 2.0, 2.5, 3.0, 4.0))
def gamma_dark(x: np.ndarray, gamma: float, rng: np.random.Generator) -> np.ndarray:
    return np.power(x, np.float32(gamma))


@_register("gamma_bright", "colour", (1.5, 2.0, 2.5, 3.0, 4.0))
def gamma_bright(x: np.ndarray, gamma: float, rng: np.random.Generator) -> np.ndarray:
    return np.power(x, np.float32(1 / gamma))


# -- geometry ----------------------------------------------------------------------------------------
def _warp(x: np.ndarray, angles: np.ndarray, mode: str = "mirror", transpose: bool = False) -> np.ndarray:
    """Rotate each image about its centre by ``angles`` (degrees, clockwise as displayed), bilinear, borders
    mirrored; ``transpose`` first swaps rows and columns. Coordinates are rounded to 1e-6 so that quarter
    turns of a square image move whole pixels."""
    h, w = x.shape[1:3]
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    dy, dx = rows - cy, cols - cx
    if transpose:
        dy, dx = dx * (h - 1) / max(w - 1, 1), dy * (w - 1) / max(h - 1, 1)
    t = np.deg2rad(np.asarray(angles, np.float64))[:, None, None]
    src_r = np.round(cy + np.cos(t) * dy - np.sin(t) * dx, 6)
    src_c = np.round(cx + np.sin(t) * dy + np.cos(t) * dx, 6)
    return bilinear_sample(x, src_r, src_c, mode)


@_register("rotate", "geometry", (5, 10, 20, 30, 45))  # degrees, either way at random
def rotate(x: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    return _warp(x, degrees * rng.choice([-1.0, 1.0], len(x)))


@_register("rotate90", "geometry", (90, 180, 270))  # quarter turns, clockwise
def rotate90(x: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    return _warp(x, np.full(len(x), float(degrees)))


@_register("flip", "geometry", ("horizontal", "vertical", "transpose"))
def flip(x: np.ndarray, axis: str, rng: np.random.Generator) -> np.ndarray:
    if axis == "horizontal":
        return x[:, :, ::-1]
    if axis == "vertical":
        return x[:, ::-1]
    return _warp(x, np.zeros(len(x)), transpose=True)


@_register("zoom_crop", "geometry", (1.25, 1.5, 1.75, 2.0, 2.5))  # the centre enlarged by this, cropped back
def zoom_crop(x: np.ndarray, zoom: float, rng: np.random.Generator) -> np.ndarray:
    return clipped_zoom(x, zoom)


@_register("translate", "geometry", (0.0625, 0.125, 0.1875, 0.25, 0.375))  # x the shorter side, random direction
def translate(x: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Move each image by whole pixels in a random direction; what comes in from outside is black."""
    n, h, w, _ = x.shape
    angle = rng.uniform(0, 2 * np.pi, n)
    step = fraction * min(h, w)
    dy, dx = np.rint(step * np.sin(angle)).astype(int), np.rint(step * np.cos(angle)).astype(int)
    out = np.zeros_like(x)
    for i in range(n):
        ys, xs = slice(max(dy[i], 0), h + min(dy[i], 0)), slice(max(dx[i], 0), w + min(dx[i], 0))
        yd, xd = slice(max(-dy[i], 0), h + min(-dy[i], 0)), slice(max(-dx[i], 0), w + min(-dx[i], 0))
        out[i, ys, xs] = x[i, yd, xd]
    return out


# -- occlusion and quantisation ----------------------------------------------------------------------
@_register("cutout", "occlusion", (0.25, 0.35, 0.45, 0.55, 0.65))  # square side x the shorter side
def cutout(x: np.ndarray, side: float, rng: np.random.Generator) -> np.ndarray:
    """One mid-grey square per image, at a random place wholly inside it."""
    n, h, w, _ = x.shape
    s = max(1, int(round(side * min(h, w))))
    top, left = rng.integers(0, h - s + 1, n), rng.integers(0, w - s + 1, n)
    out = x.copy()
    for i in range(n):
        out[i, top[i] : top[i] + s, left[i] : left[i] + s] = 0.5
    return out


@_register("posterize", "occlusion", (5, 4, 3, 2, 1))  # bits kept per channel
def posterize(x: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Keep the top ``bits`` of each 8-bit channel (PIL's ImageOps.posterize)."""
    mask = (0xFF << (8 - bits)) & 0xFF
    return (np.rint(x * 255).astype(np.uint8) & mask).astype(np.float32) / 255


@_register("solarize", "occlusion", (0.9, 0.75, 0.6, 0.45, 0.3))  # values at or above this are inverted
def solarize(x: np.ndarray, threshold: float, rng: np.random.Generator) -> np.ndarray:
    return np.where(x >= threshold, 1 - x, x)


@_register("vignette", "occlusion", (0.3, 0.5, 0.7, 0.85, 1.0))  # light lost at the corners
def vignette(x: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Darken towards the corners: gain 1 - strength x r^2, r the distance from the centre over the corner's."""
    h, w = x.shape[1:3]
    rows, cols = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    gain = 1 - strength * (rows**2 + cols**2) / 2
    return x * gain[None, :, :, None].astype(np.float32)


__all__ = ["UNSEEN", "UNSEEN_FAMILIES", "UnseenShift", "family_of", "unseen_conditions", "unseen_shift"]
