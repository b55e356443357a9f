"""Noise corruptions: gaussian, shot, impulse (salt and pepper) and speckle noise.

Per-pixel and per-channel, so nothing depends on image size. Parameters: CIFAR-10-C's.
"""

from __future__ import annotations

import numpy as np

from carddeck.data.corruptions.registry import register

GAUSSIAN_SIGMA = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_PHOTONS = (500, 250, 100, 75, 50)
IMPULSE_AMOUNT = (0.01, 0.02, 0.03, 0.05, 0.07)
SPECKLE_SIGMA = (0.06, 0.1, 0.12, 0.16, 0.2)


@register("gaussian_noise")
def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """x + N(0, sigma^2), sigma on the [0, 1] scale."""
    sigma = GAUSSIAN_SIGMA[severity - 1]
    return x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(sigma)


@register("shot_noise")
def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson(x * c) / c: photon noise with c photons at full intensity (variance x / c)."""
    c = SHOT_PHOTONS[severity - 1]
    return (rng.poisson(x * c) / c).astype(np.float32)


@register("impulse_noise")
def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: each channel value is replaced with probability ``amount``, by 0 or 1 with
    equal odds (skimage's ``random_noise(mode='s&p')``)."""
    amount = IMPULSE_AMOUNT[severity - 1]
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(np.float32), x)


@register("speckle_noise")
def speckle_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """x + x * N(0, c^2): noise proportional to intensity."""
    c = SPECKLE_SIGMA[severity - 1]
    return x + x * rng.standard_normal(x.shape, dtype=np.float32) * np.float32(c)
