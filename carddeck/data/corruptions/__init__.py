"""The 19 CIFAR-10-C corruptions at severities 1..5, on numpy/scipy, for images of any size.

``corrupt(images, name, severity, seed)`` maps uint8 [N, H, W, 3] to uint8 of the same shape.
Parameters are those used to build CIFAR-10-C (Hendrycks & Dietterich's make_cifar_c.py); the
modules say where we differ (no ImageMagick, no frost photographs, no OpenCV). Pixel-sized
parameters scale with the shorter image side / 32. Results are rounded to the nearest uint8 (the
original truncates), so they are on average 0.5 grey levels brighter than a truncating writer.

Randomness: one generator per call, seeded from (seed, corruption name), so a corruption's
output depends only on the images, its severity and the seed, never on which corruptions ran
before; and the same seed draws the same noise at every severity, so severities differ only in
strength. The draws depend on the batch: corrupting a batch in two halves gives different (equally
valid) noise than corrupting it at once.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from carddeck.data.corruptions import blur, digital, noise, weather
from carddeck.data.corruptions.registry import CORRUPTIONS, CorruptionFn
from carddeck.errors import InvalidInput

BENCHMARK_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
# The benchmark's four families (Hendrycks & Dietterich 2019, who count brightness as weather):
# hold a whole family out when fitting, to see how a gate meets a kind of shift it never saw.
FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": BENCHMARK_CORRUPTIONS[0:3],
    "blur": BENCHMARK_CORRUPTIONS[3:7],
    "weather": BENCHMARK_CORRUPTIONS[7:11],
    "digital": BENCHMARK_CORRUPTIONS[11:15],
}
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
# The shift signal's held-out families (issue #21: noise, blur, weather, digital/photometric), extras included;
# brightness counts as photometric here, as the issue groups it.
SHIFT_FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("snow", "frost", "fog", "spatter"),
    "digital": ("brightness", "contrast", "saturate", "elastic_transform", "pixelate", "jpeg_compression"),
}
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_SIZE = 8  # the glass swaps and fractal maps need a few pixels of room

del blur, digital, noise, weather  # imported for their registrations


def corruption_rng(name: str, seed: int) -> np.random.Generator:
    """The generator ``corrupt`` uses: independent of call order, the same at every severity."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def check_severity(severity: object) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise InvalidInput(f"unknown severity {severity!r}; valid severities: {', '.join(map(str, SEVERITIES))}")
    return int(severity)


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt uint8 [N, H, W, 3] images with corruption ``name`` at ``severity`` (1..5)."""
    fn: CorruptionFn = CORRUPTIONS.get(name)
    return apply(fn, name, images, check_severity(severity), seed)


def apply(fn: Callable[..., np.ndarray], name: str, images: np.ndarray, level: Any, seed: int) -> np.ndarray:
    """Run ``fn(float32 images in [0, 1], level, corruption_rng(name, seed))`` on checked uint8 [N, H, W, 3]
    images and round the result back to uint8 (shared by the catalog and the unseen shifts)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInput(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise InvalidInput(f"images must be a uint8 numpy array, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidInput(f"images must have shape [N, H, W, 3], got {list(images.shape)}")
    if min(images.shape[1:3]) < MIN_SIZE:
        raise InvalidInput(f"images must be at least {MIN_SIZE}x{MIN_SIZE} pixels, got {list(images.shape[1:3])}")
    if len(images) == 0:
        return images.copy()
    x = images.astype(np.float32) / 255
    out = fn(x, level, corruption_rng(name, int(seed)))
    return np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8)


__all__ = [
    "BENCHMARK_CORRUPTIONS",
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "FAMILIES",
    "SEVERITIES",
    "SHIFT_FAMILIES",
    "apply",
    "corrupt",
]
