"""Augmentation domains: how a CARD's training images are perturbed (numpy/scipy only, no torch).

``augment(images, domain, rng)`` maps uint8 [N, H, W, 3] to float32 [N, H, W, 3] in [0, 1]. The
training loop calls it per batch, and the gate calls it to compute each domain's reference
signature, so both see exactly the same distribution.

* ``clean``: images / 255.
* ``gaussian``: with probability ``GAUSSIAN_P`` = 0.5 per image, add N(0, sigma^2) noise on the
  [0, 1] scale, sigma drawn uniformly in [0, ``GAUSSIAN_MAX_SIGMA`` = 0.15] per image, then clip.
  CIFAR-10-C's gaussian_noise uses sigma 0.04..0.10 (severities 1..5); training up to 0.15 covers
  all five with margin, and keeping half the images clean holds clean accuracy (the paper adds the
  noise before normalization and clips to [0, 1], as here).
* ``augmix``: AugMix (width 3, depth 1..3, severity 3), see :mod:`carddeck.data.augmix_ops`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from carddeck.data.augmix_ops import augmix_image
from carddeck.data.datasets import check_images_labels
from carddeck.errors import InvalidInput
from carddeck.registry import Registry

GAUSSIAN_P = 0.5
GAUSSIAN_MAX_SIGMA = 0.15
AUGMIX_SEVERITY = 3
AUGMIX_WIDTH = 3
AUGMIX_DEPTH = (1, 3)

Domain = Callable[[np.ndarray, np.random.Generator], np.ndarray]
DOMAINS: Registry[Domain] = Registry("domain")


@DOMAINS.register("clean")
def clean(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return images.astype(np.float32) / np.float32(255.0)


@DOMAINS.register("gaussian")
def gaussian(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = images.astype(np.float32) / np.float32(255.0)
    n = len(x)
    apply = rng.uniform(size=n) < GAUSSIAN_P
    sigma = rng.uniform(0.0, GAUSSIAN_MAX_SIGMA, size=n).astype(np.float32) * apply
    noise = rng.standard_normal(x.shape, dtype=np.float32) * sigma[:, None, None, None]
    return np.clip(x + noise, 0.0, 1.0)


@DOMAINS.register("augmix")
def augmix(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.empty(images.shape, dtype=np.float32)
    for i, img in enumerate(images):
        out[i] = augmix_image(img, rng, severity=AUGMIX_SEVERITY, width=AUGMIX_WIDTH, depth=AUGMIX_DEPTH)
    return out


def augment(images: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """Augment uint8 [N, H, W, 3] images under ``domain``; float32 [N, H, W, 3] in [0, 1]."""
    fn = DOMAINS.get(domain)
    if not isinstance(images, np.ndarray):
        raise InvalidInput(f"images must be a numpy array, got {type(images).__name__}")
    check_images_labels(images, np.zeros(len(images), dtype=np.int64), "augment")
    return fn(images, rng)


__all__ = ["DOMAINS", "GAUSSIAN_MAX_SIGMA", "GAUSSIAN_P", "augment"]
