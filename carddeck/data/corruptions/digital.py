"""Digital corruptions: brightness, saturate, contrast, elastic transform, pixelate, JPEG.

CIFAR-10-C parameters. Elastic displacements are given relative to the image size (as in the
original, which writes them as multiples of 32 px) and use the shorter side for non-square images.
"""

from __future__ import annotations

import io

import numpy as np

from carddeck.data.corruptions._common import (
    bilinear_sample,
    box_resample_matrix,
    gaussian,
    hsv_to_rgb,
    rgb_to_hsv,
    separable,
)
from carddeck.data.corruptions.registry import register
from carddeck.errors import InvalidInput

BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to HSV value
SATURATE = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))  # HSV saturation * a + b
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
ELASTIC = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))  # x size
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
JPEG_QUALITY = (80, 65, 58, 50, 40)


@register("brightness")
def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    hsv = rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + BRIGHTNESS[severity - 1], 0, 1)
    return hsv_to_rgb(hsv)


@register("saturate")
def saturate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    a, b = SATURATE[severity - 1]
    hsv = rgb_to_hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * a + b, 0, 1)
    return hsv_to_rgb(hsv)


@register("contrast")
def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Pull every channel towards its per-image mean: (x - mean) * c + mean."""
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * CONTRAST[severity - 1] + means


def _affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """[N, 2, 3] affine maps taking the 3 points ``src`` [3, 2] to ``dst`` [N, 3, 2]."""
    a = np.concatenate([src, np.ones((3, 1))], 1)  # [3, 3]
    return np.linalg.solve(a, dst).transpose(0, 2, 1)


@register("elastic_transform")
def elastic_transform(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A random affine warp (three control points moved by up to ``affine``), then a smooth
    random displacement field (uniform noise blurred by ``sigma``, scaled by ``alpha``); both
    bilinear. The affine borders reflect like OpenCV's BORDER_REFLECT_101, the field like scipy's
    'reflect', as in the original."""
    n, h, w, _ = x.shape
    size = min(h, w)
    alpha, sigma, affine = (v * size for v in ELASTIC[severity - 1])
    center = np.array([h // 2, w // 2], dtype=np.float64)
    sq = size // 3
    pts = np.array([center + sq, [center[0] + sq, center[1] - sq], center - sq])  # (row, col)
    moved = pts[None] + rng.uniform(-affine, affine, size=(n, 3, 2))
    forward = np.concatenate([_affine_from_points(pts, moved), np.tile([[[0.0, 0.0, 1.0]]], (n, 1, 1))], 1)
    inverse = np.linalg.inv(forward)[:, :2]
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    grid = np.stack([rows, cols, np.ones_like(rows)], 0).reshape(3, -1).astype(np.float64)
    src = (inverse @ grid).reshape(n, 2, h, w)  # cv2.warpAffine samples the source at M^-1 (output)
    x = bilinear_sample(x, src[:, 0], src[:, 1], mode="mirror")
    dy = gaussian(rng.uniform(-1, 1, size=(n, h, w)), sigma, mode="reflect", truncate=3) * alpha
    dx = gaussian(rng.uniform(-1, 1, size=(n, h, w)), sigma, mode="reflect", truncate=3) * alpha
    return bilinear_sample(x, rows[None] + dy, cols[None] + dx, mode="reflect")


@register("pixelate")
def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Pillow BOX resize to size * c (stored as uint8, as the original's PIL image) and back."""
    c = PIXELATE[severity - 1]
    h, w = x.shape[1:3]
    small_h, small_w = max(1, int(h * c)), max(1, int(w * c))
    down_h, down_w = box_resample_matrix(h, small_h), box_resample_matrix(w, small_w)
    up_h, up_w = box_resample_matrix(small_h, h), box_resample_matrix(small_w, w)
    small = np.rint(separable(x * 255, down_h, down_w)) / 255
    return separable(small, up_h, up_w)


@register("jpeg_compression")
def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Pillow JPEG at quality 80..40. Pillow is imported here, lazily: it comes with the ``train``
    extra, and the serving install never needs it."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - depends on the install
        raise InvalidInput("corruption 'jpeg_compression' needs pillow: pip install 'carddeck[train]'") from None
    quality = JPEG_QUALITY[severity - 1]
    out = np.empty_like(x)
    for i, img in enumerate(np.rint(x * 255).astype(np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255
    return out
