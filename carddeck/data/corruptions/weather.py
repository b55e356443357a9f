"""Weather corruptions: snow, frost, fog and spatter.

CIFAR-10-C parameters; pixel-sized quantities (snow flake zoom and streak length, spatter blur,
frost needle length, fractal map size) scale with ``size_scale`` (shorter side / 32).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from carddeck.data.corruptions._common import (
    clipped_zoom,
    fractal_map,
    gaussian,
    motion_blur,
    rgb_to_gray,
    size_scale,
)
from carddeck.data.corruptions.registry import register

# loc, scale, zoom, threshold, streak radius, streak sigma, blend
SNOW = (
    (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
    (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
    (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
    (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
    (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # image weight, frost weight
FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))  # strength, fractal decay
# loc, scale, sigma, threshold, intensity (water) / blur (mud), branch (0 water, 1 mud)
SPATTER = (
    (0.62, 0.1, 0.7, 0.7, 0.5, 0),
    (0.65, 0.1, 0.8, 0.7, 0.5, 0),
    (0.65, 0.3, 1, 0.69, 0.5, 0),
    (0.65, 0.1, 0.7, 0.69, 0.6, 1),
    (0.65, 0.1, 0.5, 0.68, 0.6, 1),
)


@register("snow")
def snow(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Zoomed, thresholded Gaussian flakes streaked by a motion blur at an angle in [-135, -45],
    added twice (the layer and its 180-degree rotation) over a brightened, greyed image.
    The streak is our ImageMagick-equivalent motion blur (``_common.motion_blur``)."""
    loc, scale, zoom, threshold, radius, sigma, blend = SNOW[severity - 1]
    n, h, w, _ = x.shape
    s = size_scale(x)
    layer = rng.normal(loc, scale, size=(n, h, w, 1)).astype(np.float32)
    layer = clipped_zoom(layer, max(1.0, zoom * s))
    layer[layer < threshold] = 0
    layer = (np.rint(np.clip(layer, 0, 1) * 255) / 255).astype(np.float32)  # the original goes through PNG
    angles = np.asarray(rng.uniform(-135, -45, size=n))
    layer = motion_blur(layer, radius * s, sigma * s, angles)
    x = blend * x + (1 - blend) * np.maximum(x, rgb_to_gray(x) * 1.5 + 0.5)
    return x + layer + np.rot90(layer, 2, axes=(1, 2))


def frost_texture(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Procedural frost [n, h, w, 3] in [0, 255], standing in for the six frost photographs.

    The original crops a random 32 px patch from one of six photos of frost on glass (downscaled
    5x). We have no photos, so we draw: a cloudy plasma-fractal base (frost is uneven) plus
    ice needles (sparse seeds drawn out into straight streaks in three random directions per image,
    brightest where they cross), tinted pale blue-white. The statistics (mean ~0.4 of full scale,
    bright thin structures on a hazy base) are chosen to look like those crops, not measured from
    them, so frost severities are of similar, not identical, strength to CIFAR-10-C's.
    """
    s = size_scale(np.empty((1, h, w, 1)))
    base = fractal_map(n, h, w, 1.6, rng).astype(np.float32)
    needles = np.zeros((n, h, w, 1), dtype=np.float32)
    for _ in range(3):
        seeds = (rng.random((n, h, w, 1)) < 0.04).astype(np.float32) * rng.uniform(0.5, 1, (n, h, w, 1))
        angle = rng.uniform(0, 360, size=n)
        streak = motion_blur(seeds, 4 * s, 3 * s, angle) + motion_blur(seeds, 4 * s, 3 * s, angle + 180)
        needles = np.maximum(needles, streak)
    needles = needles[..., 0] / np.maximum(needles.max(axis=(1, 2, 3))[:, None, None], 1e-6)
    tex = np.clip(0.55 * base + 0.9 * np.sqrt(needles), 0, 1)
    tint = np.array([0.82, 0.9, 1.0], dtype=np.float32)
    return (tex[..., None] * tint * 255).astype(np.float32)


@register("frost")
def frost(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """image_weight * x + frost_weight * frost texture (a procedural one: see ``frost_texture``)."""
    a, b = FROST[severity - 1]
    n, h, w, _ = x.shape
    return a * x + b * frost_texture(n, h, w, rng) / 255


@register("fog")
def fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Add a plasma fractal (map size: next power of two covering the image, 32 for CIFAR) and
    rescale so the brightest clean pixel keeps its value."""
    strength, decay = FOG[severity - 1]
    n, h, w, _ = x.shape
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + strength * fractal_map(n, h, w, decay, rng)[..., None].astype(np.float32)
    return x * max_val / (max_val + strength)


def _equalize_hist(a: np.ndarray) -> np.ndarray:
    """cv2.equalizeHist for each image of a uint8 [n, h, w] batch."""
    n = len(a)
    hist = np.bincount((a.reshape(n, -1) + 256 * np.arange(n)[:, None]).ravel(), minlength=256 * n).reshape(n, 256)
    cdf = hist.cumsum(1)
    total = cdf[:, -1:]
    first = hist[np.arange(n), (hist > 0).argmax(1)][:, None]
    denom = np.maximum(total - first, 1)
    lut = np.clip(np.rint((cdf - first) * 255.0 / denom), 0, 255).astype(np.uint8)
    return np.take_along_axis(lut, a.reshape(n, -1).astype(np.int64), 1).reshape(a.shape)


def _box3(a: np.ndarray) -> np.ndarray:
    return ndimage.uniform_filter(a, size=(1, 3, 3), mode="mirror")  # cv2.blur(3x3)


@register("spatter")
def spatter(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Water drops (severities 1-3) or mud (4-5) from a thresholded, blurred noise layer.

    Water follows make_cifar_c's OpenCV pipeline with numpy/scipy stand-ins: Canny edges of the
    drop layer become the drop boundaries (a drop pixel with a non-drop 4-neighbour: the layer is
    zero outside drops, so those are the strong edges Canny keeps), then distance to the edges
    truncated at 20 px, 3x3 blur, histogram equalization, the emboss kernel, 3x3 blur, and the
    drops tinted pale turquoise. Mud: the blurred drop mask, kept where >= 0.8, painted brown.
    """
    loc, scale, sigma, threshold, amount, mud = SPATTER[severity - 1]
    n, h, w, _ = x.shape
    s = size_scale(x)
    liquid = gaussian(rng.normal(loc, scale, size=(n, h, w)), sigma * s)
    liquid[liquid < threshold] = 0
    if mud:
        m = gaussian((liquid > threshold).astype(np.float32), amount * s)
        m[m < 0.8] = 0
        m = m[..., None].astype(np.float32)
        brown = np.array([63, 42, 20], dtype=np.float32) / 255
        return x * (1 - m) + brown * m
    layer = (np.clip(liquid, 0, 1) * 255).astype(np.uint8)
    drops = layer > 0
    edges = drops & ~ndimage.binary_erosion(drops, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool))
    # Distance to the nearest edge pixel of the same image: the huge spacing along the batch axis
    # keeps other images' edges out of reach (an image without edges saturates at the cap).
    dist = ndimage.distance_transform_edt(~edges, sampling=(1e6, 1, 1))
    dist = _box3(np.minimum(dist, 20 * s)).astype(np.uint8)
    dist = _equalize_hist(dist).astype(np.float32)
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float32)[None]
    dist = np.clip(np.rint(ndimage.correlate(dist, emboss, mode="mirror")), 0, 255)  # CV_8U saturates
    m = layer.astype(np.float32) * _box3(dist.astype(np.float32))
    m = m / np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-6) * amount
    turquoise = np.array([175, 238, 238], dtype=np.float32) / 255
    return x + m[..., None] * turquoise
