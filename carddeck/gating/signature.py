"""Spectral signatures: what a batch of images looks like in the frequency domain.

A signature is the mean log-magnitude of the images' 2-D Fourier transform, averaged over rings of
equal spatial frequency (a radial profile). Frequencies are measured in cycles per pixel and the
transform is orthonormal, so the vector has the same length and scale for any image size.
Corruptions leave clear marks on it: noise lifts the high-frequency rings, blur and fog lower them
(or lift the lowest ones), contrast loss lowers every ring but DC.

Everything is vectorized over the batch (one ``rfft2`` call, one matrix product), so the gate costs
a small fraction of running a CARD.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.fft

from carddeck.errors import InvalidInput

NUM_BINS = 16  # rings between DC (excluded, it is its own bin) and the Nyquist corner
SIGNATURE_DIM = NUM_BINS + 1
ORIENTATIONS = 4
FEATURE_DIM = SIGNATURE_DIM + ORIENTATIONS + 3 + 3 + 4  # see sample_features
_MAX_RADIUS = float(np.sqrt(0.5))  # the corner frequency (0.5, 0.5) cycles per pixel
_EPS = 1e-3  # floor under |F| before the log: flat regions would otherwise dominate with -inf-ish values
MIN_SIZE = 8


def _as_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC or float32 NCHW in [0, 1] -> float32 [N, C, H, W] in [0, 1], checked."""
    if not isinstance(images, np.ndarray):
        raise InvalidInput(f"images must be a numpy array, got {type(images).__name__}")
    if images.ndim != 4:
        raise InvalidInput(f"images must be uint8 [N,H,W,3] or float32 [N,3,H,W], got shape {list(images.shape)}")
    if len(images) == 0:
        raise InvalidInput("images: empty batch; send at least one image")
    # Channels: 3 for every card today; 1..4 are accepted so grey or RGBA decks work too.
    if images.dtype == np.uint8:
        if not 1 <= images.shape[-1] <= 4:
            raise InvalidInput(f"uint8 images must be [N,H,W,3], got shape {list(images.shape)}")
        x = images.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1.0 / 255.0)
    elif images.dtype == np.float32:
        if not 1 <= images.shape[1] <= 4:
            raise InvalidInput(f"float32 images must be [N,3,H,W], got shape {list(images.shape)}")
        x = images
    else:
        raise InvalidInput(f"images must be uint8 [N,H,W,3] or float32 [N,3,H,W], got dtype {images.dtype}")
    if min(x.shape[2:]) < MIN_SIZE:
        raise InvalidInput(f"images must be at least {MIN_SIZE}x{MIN_SIZE} for a signature, got {x.shape[2:]}")
    return x


def _as_gray(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC or float32 NCHW in [0, 1] -> float32 [N, H, W] luminance in [0, 1]."""
    return _as_nchw(images).mean(axis=1, dtype=np.float32)


@lru_cache(maxsize=32)
def _ring_matrix(height: int, width: int) -> np.ndarray:
    """[H * (W//2+1), SIGNATURE_DIM] averaging matrix from rfft2 coefficients to radial bins.

    Column 0 is DC alone; columns 1.. are rings of equal width up to the corner frequency. Rings a
    small image has no coefficient in borrow the nearest filled ring, so the length never changes.
    """
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fy**2 + fx**2).ravel()
    ring = np.minimum((radius / _MAX_RADIUS * NUM_BINS).astype(np.int64), NUM_BINS - 1) + 1
    ring[0] = 0  # DC
    onehot = np.zeros((radius.size, SIGNATURE_DIM), np.float64)
    onehot[np.arange(radius.size), ring] = 1.0
    counts = onehot.sum(axis=0)
    filled = np.flatnonzero(counts)
    for b in np.flatnonzero(counts == 0):  # borrow the nearest filled ring
        nearest = filled[np.argmin(np.abs(filled - b))]
        onehot[:, b] = onehot[:, nearest]
        counts[b] = counts[nearest]
    return (onehot / counts).astype(np.float32)


def _log_spectrum(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image mean [N] and log-magnitude of the mean-free rfft2, flattened [N, H * (W//2+1)]."""
    n = len(gray)
    mean = gray.mean(axis=(1, 2))
    # Threads only pay off on large batches: under 32 images (a small request) handing the transform
    # to scipy's workers cost more than it saved (32x32 images, 2 cores). Same values either way.
    spectrum = scipy.fft.rfft2(gray - mean[:, None, None], norm="ortho", workers=-1 if n >= 32 else 1)
    return mean, np.log(np.abs(spectrum).astype(np.float32) + np.float32(_EPS)).reshape(n, -1)


def _radial(mean: np.ndarray, logmag: np.ndarray, h: int, w: int) -> np.ndarray:
    sig = logmag @ _ring_matrix(h, w)
    sig[:, 0] = mean  # DC: mean luminance in [0, 1] rather than log of a huge coefficient
    return sig.astype(np.float32, copy=False)


def sample_signatures(images: np.ndarray) -> np.ndarray:
    """Per-image signatures, float32 [N, SIGNATURE_DIM].

    ``images``: uint8 [N,H,W,3] or float32 [N,3,H,W] in [0, 1]. The per-image mean is removed
    before the transform and kept as the DC entry, so brightness moves one entry, not all of them.
    """
    gray = _as_gray(images)
    return _radial(*_log_spectrum(gray), *gray.shape[1:])


@lru_cache(maxsize=32)
def _wedge_matrix(height: int, width: int) -> np.ndarray:
    """[H * (W//2+1), ORIENTATIONS] averaging matrix over orientation wedges of the spectrum
    (0 = horizontal frequencies, i.e. vertical edges), radius 0.1..0.5 cycles/pixel: mid and high
    frequencies, where blur and motion act along a direction."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.sqrt(fy**2 + fx**2)
    angle = np.mod(np.arctan2(fy, fx), np.pi)  # rfft covers half the plane; fold to [0, pi)
    wedge = np.minimum((angle / np.pi * ORIENTATIONS + 0.5).astype(np.int64) % ORIENTATIONS, ORIENTATIONS - 1)
    inside = (radius >= 0.1) & (radius <= 0.5)
    m = np.zeros((radius.size, ORIENTATIONS), np.float64)
    flat = np.flatnonzero(inside.ravel())
    m[flat, wedge.ravel()[flat]] = 1.0
    return (m / np.maximum(m.sum(axis=0), 1.0)).astype(np.float32)


def sample_features(images: np.ndarray) -> np.ndarray:
    """Richer per-image features for the calibrated router, float32 [N, FEATURE_DIM].

    The first SIGNATURE_DIM columns are :func:`sample_signatures` (so the domain references still
    apply); then the log-spectrum in ORIENTATIONS wedges minus its mean over wedges (motion blur
    and streaks are directional), each channel's mean and spread (brightness and colour casts,
    contrast and saturation loss), and local statistics: mean 4x4-block contrast, log mean gradient
    magnitude, the share of clipped pixels (snow, brightness) and mean saturation (frost, fog).
    """
    x = _as_nchw(images)
    gray = x.mean(axis=1, dtype=np.float32)
    n, h, w = gray.shape
    mean, logmag = _log_spectrum(gray)
    radial = _radial(mean, logmag, h, w)
    wedges = logmag @ _wedge_matrix(h, w)
    wedges -= wedges.mean(axis=1, keepdims=True)
    # reductions over one contiguous axis: numpy's reductions over several strided axes cost 2-4x more
    flat = x.reshape(n, x.shape[1], h * w)
    channel_mean = flat.mean(axis=2)
    channel_std = flat.std(axis=2)
    bh, bw = h // 4 * 4, w // 4 * 4
    blocks = gray[:, :bh, :bw].reshape(n, bh // 4, 4, bw // 4, 4).transpose(0, 1, 3, 2, 4).reshape(n, -1, 16)
    local_contrast = blocks.std(axis=2).mean(axis=1)
    grad = np.abs(np.diff(gray, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(gray, axis=2)).mean(axis=(1, 2))
    clipped = ((gray < 0.02) | (gray > 0.98)).mean(axis=(1, 2))
    saturation = (x.max(axis=1) - x.min(axis=1)).mean(axis=(1, 2))
    local = np.stack([local_contrast, np.log(grad + _EPS), clipped, saturation], axis=1)
    # channels beyond 3 (RGBA) are dropped, and grey images repeat their one channel, so the length is fixed
    pad = np.repeat(channel_mean[:, -1:], 3, axis=1)
    channel_mean = np.concatenate([channel_mean, pad], axis=1)[:, :3]
    channel_std = np.concatenate([channel_std, np.repeat(channel_std[:, -1:], 3, axis=1)], axis=1)[:, :3]
    out = np.concatenate([radial, wedges, channel_mean, channel_std, local], axis=1)
    return out.astype(np.float32, copy=False)


def batch_signature(images: np.ndarray) -> np.ndarray:
    """The batch's signature, float32 [SIGNATURE_DIM]: the mean of the per-image signatures.

    Averaging log-magnitudes is linear, so this equals the radial profile of the batch's mean
    log-magnitude spectrum.
    """
    return sample_signatures(images).mean(axis=0)


def domain_signature(domain: str, images: np.ndarray, seed: int = 0) -> tuple[float, ...]:
    """Reference signature of an augmentation domain: the signature of ``images`` (clean uint8
    NHWC training images) after that domain's augmentation, as a tuple ready for CardMeta."""
    from carddeck.data.domains import augment  # numpy-only; imported late so the gate loads without it

    rng = np.random.default_rng(seed)
    augmented = augment(np.asarray(images), domain, rng)  # float32 [N,H,W,3] in [0, 1]
    nchw = np.ascontiguousarray(np.asarray(augmented, np.float32).transpose(0, 3, 1, 2))
    return tuple(float(v) for v in batch_signature(nchw))


__all__ = [
    "FEATURE_DIM",
    "SIGNATURE_DIM",
    "batch_signature",
    "domain_signature",
    "sample_features",
    "sample_signatures",
]
