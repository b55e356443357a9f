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
* ``lowfreq``: the low-frequency shifts AugMix and noise leave uncovered (fog and haze, contrast,
  brightness, uneven light), after PixMix (Hendrycks et al. 2022): an image goes through 1..3
  random mixing rounds, each one of: additive mixing with a bright random field (haze), a
  contrast cut towards the image mean, a brightness shift, or multiplicative mixing with a random
  field (light). PixMix mixes with fractal pictures; here the fields are procedural 1/f^beta noise
  (beta in [1.5, 3]: smooth, cloud-like), drawn by spectral synthesis, so nothing is downloaded and
  the fields are not the diamond-square plasma of the fog corruption the cards are tested on.
  ``LOWFREQ_P`` = 0.8 of the images are mixed; the rest stay clean, as in the gaussian domain.
* ``photometric``: colour jitter of the whole image, as cameras and lighting vary it (torchvision's
  ColorJitter plus gamma and a colour cast): ``PHOTOMETRIC_P`` = 0.8 of the images get each of
  brightness (an additive shift), contrast (a scale around the image mean), gamma, saturation (a
  blend towards grey) and a colour cast (a gain per channel) with probability 0.5, in random order.
  None of these calls the benchmark corruptions, whose brightness works in HSV and whose contrast
  and fog are what the router is tested on.
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

LOWFREQ_P = 0.8
LOWFREQ_ROUNDS = (1, 3)
LOWFREQ_BETA = (1.5, 3.0)

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


def spectral_fields(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """n random fields [n, h, w] in [0, 1] with amplitude spectrum 1/f^beta, beta drawn per field."""
    beta = rng.uniform(*LOWFREQ_BETA, size=(n, 1, 1)).astype(np.float32)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.maximum(np.sqrt(fy**2 + fx**2), 1.0 / max(h, w)).astype(np.float32)
    spectrum = np.fft.rfft2(rng.standard_normal((n, h, w)).astype(np.float32)) * f[None] ** -beta
    fields = np.fft.irfft2(spectrum, s=(h, w)).astype(np.float32)
    fields -= fields.min(axis=(1, 2), keepdims=True)
    return fields / np.maximum(fields.max(axis=(1, 2), keepdims=True), 1e-6)


def _haze(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, h, w, _ = x.shape
    airlight = rng.uniform(0.6, 1.0, size=(n, 1, 1, 1)).astype(np.float32)
    field = airlight + 0.3 * (spectral_fields(n, h, w, rng)[..., None] - 0.5)
    t = rng.uniform(0.1, 0.6, size=(n, 1, 1, 1)).astype(np.float32)
    return (1 - t) * x + t * field


def _contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    c = rng.uniform(0.15, 0.9, size=(len(x), 1, 1, 1)).astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return mean + c * (x - mean)


def _brightness(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x + rng.uniform(-0.3, 0.4, size=(len(x), 1, 1, 1)).astype(np.float32)


def _light(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, h, w, _ = x.shape
    s = rng.uniform(0.0, 0.6, size=(n, 1, 1, 1)).astype(np.float32)
    return x * (1 + s * (spectral_fields(n, h, w, rng)[..., None] - 0.5) * 2)


_LOWFREQ_OPS = (_haze, _contrast, _brightness, _light)


@DOMAINS.register("lowfreq")
def lowfreq(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = images.astype(np.float32) / np.float32(255.0)
    n = len(x)
    rounds = rng.integers(LOWFREQ_ROUNDS[0], LOWFREQ_ROUNDS[1] + 1, size=n) * (rng.uniform(size=n) < LOWFREQ_P)
    for r in range(LOWFREQ_ROUNDS[1]):
        op = rng.integers(len(_LOWFREQ_OPS), size=n)
        for k, fn in enumerate(_LOWFREQ_OPS):
            pick = np.flatnonzero((rounds > r) & (op == k))
            if len(pick):
                x[pick] = np.clip(fn(x[pick], rng), 0.0, 1.0)
    return x


PHOTOMETRIC_P = 0.8
PHOTOMETRIC_OP_P = 0.5
PHOTOMETRIC_RANGES = {  # per-image parameter ranges
    "brightness": (-0.35, 0.35),  # added
    "contrast": (0.3, 1.6),  # scale around the image mean
    "gamma": (0.5, 2.0),  # x ** gamma
    "saturation": (0.0, 1.6),  # 0: grey, 1: unchanged
    "cast": (0.7, 1.3),  # gain per channel
}


def _jitter(name: str, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lo, hi = PHOTOMETRIC_RANGES[name]
    v = rng.uniform(lo, hi, size=(len(x), 1, 1, 3 if name == "cast" else 1)).astype(np.float32)
    if name == "brightness":
        return x + v
    if name == "contrast":
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        return mean + v * (x - mean)
    if name == "gamma":
        return np.power(np.clip(x, 0.0, 1.0), v)
    if name == "saturation":
        grey = x.mean(axis=3, keepdims=True)
        return grey + v * (x - grey)
    return x * v  # cast


@DOMAINS.register("photometric")
def photometric(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = images.astype(np.float32) / np.float32(255.0)
    chosen = rng.uniform(size=len(x)) < PHOTOMETRIC_P
    for name in rng.permutation(list(PHOTOMETRIC_RANGES)):  # one random order per batch
        pick = np.flatnonzero(chosen & (rng.uniform(size=len(x)) < PHOTOMETRIC_OP_P))
        if len(pick):
            x[pick] = np.clip(_jitter(str(name), x[pick], rng), 0.0, 1.0)
    return x


def augment(images: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """Augment uint8 [N, H, W, 3] images under ``domain``; float32 [N, H, W, 3] in [0, 1]."""
    fn = DOMAINS.get(domain)
    if not isinstance(images, np.ndarray):
        raise InvalidInput(f"images must be a numpy array, got {type(images).__name__}")
    check_images_labels(images, np.zeros(len(images), dtype=np.int64), "augment")
    return fn(images, rng)


__all__ = [
    "DOMAINS",
    "GAUSSIAN_MAX_SIGMA",
    "GAUSSIAN_P",
    "LOWFREQ_P",
    "PHOTOMETRIC_P",
    "PHOTOMETRIC_RANGES",
    "augment",
    "spectral_fields",
]
