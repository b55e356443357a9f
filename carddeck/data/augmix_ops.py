"""AugMix's image operations on uint8 [H, W, 3] numpy arrays (no pillow, no torch).

Each op follows the AugMix reference (Hendrycks et al. 2020), which builds on PIL: ``level`` is a
float in [0.1, severity]; ``int_parameter``/``float_parameter`` map it to the op's range (out of
10). Geometric ops use bilinear interpolation and fill with black, like PIL's ``transform``.
Ops that overlap the CIFAR-10-C corruptions (contrast, color, brightness, sharpness) are left out,
as in AugMix, so test corruptions stay unseen.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.ndimage import affine_transform

Op = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def int_parameter(level: float, maxval: float) -> int:
    return int(level * maxval / 10)


def float_parameter(level: float, maxval: float) -> float:
    return float(level) * maxval / 10.0


def autocontrast(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Stretch each channel's [min, max] to [0, 255] (PIL ImageOps.autocontrast, cutoff 0)."""
    out = img.copy()
    for c in range(img.shape[-1]):
        ch = img[..., c]
        lo, hi = int(ch.min()), int(ch.max())
        if hi > lo:
            # integer arithmetic, so hi maps to exactly 255
            lut = np.clip((np.arange(256) - lo) * 255 // (hi - lo), 0, 255).astype(np.uint8)
            out[..., c] = lut[ch]
    return out


def equalize(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Per-channel histogram equalization with PIL's ImageOps.equalize lookup table."""
    out = img.copy()
    for c in range(img.shape[-1]):
        ch = img[..., c]
        hist = np.bincount(ch.ravel(), minlength=256)
        nonzero = hist[hist > 0]
        step = (int(hist.sum()) - int(nonzero[-1])) // 255 if len(nonzero) else 0
        if step == 0:
            continue
        cum = step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])
        lut = np.clip(cum // step, 0, 255).astype(np.uint8)
        out[..., c] = lut[ch]
    return out


def posterize(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    bits = 4 - int_parameter(level, 4)
    mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
    return img & mask


def solarize(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    threshold = 256 - int_parameter(level, 256)
    return np.where(img >= threshold, 255 - img, img).astype(np.uint8)


def _affine(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Output pixel (x, y) samples input at ``matrix @ (x, y, 1)``, as PIL's Image.transform does."""
    # scipy works in (row, col) = (y, x) order; permute the 2x3 (x, y) matrix accordingly.
    a, b, c, d, e, f = matrix
    rc = np.array([[e, d], [b, a]])
    offset = np.array([f, c])
    out = np.empty_like(img)
    for ch in range(img.shape[-1]):
        out[..., ch] = np.clip(
            affine_transform(img[..., ch].astype(np.float32), rc, offset, order=1, mode="constant", cval=0.0) + 0.5,
            0,
            255,
        ).astype(np.uint8)
    return out


def _sign(rng: np.random.Generator) -> float:
    return -1.0 if rng.uniform() > 0.5 else 1.0


def rotate(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    degrees = int_parameter(level, 30) * _sign(rng)
    theta = np.deg2rad(degrees)
    h, w = img.shape[:2]
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    cos, sin = np.cos(theta), np.sin(theta)
    # inverse map of a counter-clockwise rotation about the centre (PIL's Image.rotate)
    a, b = cos, -sin
    d, e = sin, cos
    return _affine(img, np.array([a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy]))


def shear_x(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    s = float_parameter(level, 0.3) * _sign(rng)
    return _affine(img, np.array([1.0, s, 0.0, 0.0, 1.0, 0.0]))


def shear_y(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    s = float_parameter(level, 0.3) * _sign(rng)
    return _affine(img, np.array([1.0, 0.0, 0.0, s, 1.0, 0.0]))


def translate_x(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    t = int_parameter(level, img.shape[1] / 3) * _sign(rng)
    return _affine(img, np.array([1.0, 0.0, t, 0.0, 1.0, 0.0]))


def translate_y(img: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    t = int_parameter(level, img.shape[0] / 3) * _sign(rng)
    return _affine(img, np.array([1.0, 0.0, 0.0, 0.0, 1.0, t]))


AUGMIX_OPS: dict[str, Op] = {
    "autocontrast": autocontrast,
    "equalize": equalize,
    "posterize": posterize,
    "rotate": rotate,
    "solarize": solarize,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate_x,
    "translate_y": translate_y,
}


def augmix_image(
    img: np.ndarray, rng: np.random.Generator, *, severity: int = 3, width: int = 3, depth: tuple[int, int] = (1, 3)
) -> np.ndarray:
    """One AugMix sample of ``img`` (uint8 [H, W, 3]) as float32 in [0, 1].

    ``width`` chains of ``depth`` random ops (depth drawn in [1, 3]) are mixed with Dirichlet(1)
    weights, then blended with the original with a Beta(1, 1) weight.
    """
    ops = list(AUGMIX_OPS.values())
    weights = rng.dirichlet([1.0] * width).astype(np.float32)
    m = np.float32(rng.beta(1.0, 1.0))
    mix = np.zeros(img.shape, dtype=np.float32)
    for i in range(width):
        aug = img
        for _ in range(int(rng.integers(depth[0], depth[1] + 1))):
            op = ops[int(rng.integers(len(ops)))]
            aug = op(aug, float(rng.uniform(0.1, severity)), rng)
        mix += weights[i] * aug.astype(np.float32)
    out = (1.0 - m) * img.astype(np.float32) + m * mix
    return np.clip(out / 255.0, 0.0, 1.0).astype(np.float32)
