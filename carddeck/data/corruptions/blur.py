"""Blur corruptions: gaussian, glass, defocus, motion and zoom blur.

Parameters are CIFAR-10-C's for 32 px images; blur radii and sigmas are multiplied by
``size_scale`` (shorter side / 32) so a 64 px image is blurred by the same fraction of its size.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from carddeck.data.corruptions._common import clipped_zoom, gaussian, motion_blur, size_scale
from carddeck.data.corruptions.registry import register

GAUSSIAN_BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)
GLASS = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # sigma, max_delta, iterations
DEFOCUS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))  # disk radius, alias blur
MOTION = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))  # radius, sigma; angle uniform in [-45, 45]
ZOOM_MAX = (1.06, 1.11, 1.16, 1.21, 1.26)  # mean over zoom factors 1, 1.01, ... < max


@register("gaussian_blur")
def gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return gaussian(x, GAUSSIAN_BLUR_SIGMA[severity - 1] * size_scale(x))


def glass_swap_index(code: np.ndarray) -> np.ndarray:
    """Where each pixel comes from after make_cifar_c's sequential local swaps, computed at once.

    The original visits rows H-1..2 and, within each, columns W-1..2 (bottom-right to top-left) and
    swaps pixel p with p + (dy, dx), dy, dx uniform in {-1, 0} (``randint(-1, 1)``). ``code`` [N,H,W]
    holds each visited pixel's draw (bit 0: dx = -1, bit 1: dy = -1; 0 elsewhere). Returns the
    flat source index [N, H*W] of every output pixel, exactly what the loop produces:

    Every swap moves pixel content up or left, to a position visited later, and a visited position
    is never written again once visited. So the content a step carries is the content the last
    earlier step pushed into its position (a chain, resolved by pointer jumping in O(log H*W)
    vectorized rounds), and a visited position ends with what its swap partner held just before.
    """
    n, h, w = code.shape
    hw = h * w
    padded = np.zeros((n, h + 1, w + 1), dtype=code.dtype)
    padded[:, :h, :w] = code
    # Steps that push content into position y, in the order they run: from y + (1, 1) (code 3),
    # from y + (1, 0) (code 2), from y + (0, 1) (code 1). The last one wins.
    from_diag = (padded[:, 1:, 1:] == 3).reshape(n, hw)
    from_below = (padded[:, 1:, :w] == 2).reshape(n, hw)
    from_right = (padded[:, :h, 1:] == 1).reshape(n, hw)
    itype = np.int32 if n * hw < 2**31 else np.int64  # half the memory traffic when it fits
    idx = np.arange(hw, dtype=itype)
    last = np.where(from_right, idx + 1, np.where(from_below, idx + w, np.where(from_diag, idx + w + 1, idx)))
    # Pointer jumping over batch-global indices: root[y] = origin of the content last pushed into y.
    offset = (np.arange(n, dtype=itype) * hw)[:, None]
    root = (last + offset).ravel()
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            break
        root = nxt
    root = root.reshape(n, hw) - offset

    def ahead(a: np.ndarray, k: int) -> np.ndarray:  # a[:, i + k] (0 past the end)
        return np.pad(a, ((0, 0), (0, k)))[:, k:]

    def behind(a: np.ndarray, k: int) -> np.ndarray:  # a[:, i - k] (False before the start)
        return np.pad(a, ((0, 0), (k, 0)))[:, :hw]

    # code 1: partner y = p - 1, which before this step held what its below/diagonal pusher brought.
    src1 = np.where(behind(from_below, 1), ahead(root, w - 1), np.where(behind(from_diag, 1), ahead(root, w), idx - 1))
    # code 2: partner y = p - W; only the diagonal pusher of y (at p + 1) ran before this step.
    src2 = np.where(behind(from_diag, w), ahead(root, 1), idx - w)
    # code 3: partner y = p - W - 1 was untouched before this step.
    c = code.reshape(n, hw)
    return np.where(c == 1, src1, np.where(c == 2, src2, np.where(c == 3, idx - w - 1, root)))


def glass_swap_codes(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Random swap directions for ``glass_swap_index``: visited rows/columns 2..H-1 / 2..W-1."""
    code = np.zeros((n, h, w), dtype=np.int8)
    code[:, 2:, 2:] = rng.integers(0, 4, size=(n, h - 2, w - 2), dtype=np.int8)
    return code


@register("glass_blur")
def glass_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Blur, locally swap pixels (``iterations`` passes), blur again.

    The swaps reproduce the original sequential loop exactly (see ``glass_swap_index``) without a
    per-pixel loop. The swap distance stays at the table's max_delta = 1 px for every image size
    (the exact vectorized form relies on swaps only moving content up/left); the blur sigma scales.
    """
    sigma, _max_delta, iterations = GLASS[severity - 1]
    sigma *= size_scale(x)
    n, h, w, ch = x.shape
    x = np.rint(np.clip(gaussian(x, sigma), 0, 1) * 255) / 255  # the original goes through uint8 here
    for _ in range(iterations):
        src = glass_swap_index(glass_swap_codes(n, h, w, rng))
        x = np.take_along_axis(x.reshape(n, h * w, ch), src[..., None], 1).reshape(n, h, w, ch)
    return gaussian(x.astype(np.float32), sigma)


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """Normalized disk of ``radius`` px, anti-aliased with a 3x3 (5x5 above radius 8) Gaussian of
    sigma ``alias_blur`` (as make_cifar_c's ``disk`` with cv2.GaussianBlur), zero border trimmed."""
    ksize = 3 if radius <= 8 else 5
    half = int(np.ceil(radius)) + ksize
    grid = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    disk = (yy**2 + xx**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    taps = np.arange(ksize) - ksize // 2
    g = np.exp(-(taps**2) / (2 * alias_blur**2))
    g /= g.sum()
    disk = ndimage.correlate1d(ndimage.correlate1d(disk, g, 0, mode="mirror"), g, 1, mode="mirror")
    rows, cols = np.flatnonzero(disk.any(1)), np.flatnonzero(disk.any(0))
    return disk[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


@register("defocus_blur")
def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias = DEFOCUS[severity - 1]
    scale = size_scale(x)
    kernel = disk_kernel(radius * scale, alias * scale).astype(np.float32)
    return ndimage.correlate(x, kernel[None, :, :, None], mode="mirror")  # cv2.filter2D border


@register("motion_blur")
def motion_blur_corruption(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """ImageMagick-style one-sided motion blur (see ``_common.motion_blur``), angle in [-45, 45]."""
    radius, sigma = MOTION[severity - 1]
    scale = size_scale(x)
    angles = rng.uniform(-45, 45, size=len(x))
    return motion_blur(x, radius * scale, sigma * scale, angles)


@register("zoom_blur")
def zoom_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Mean of the image and its centre zooms by 1, 1.01, ... (zoom is relative: no size scaling)."""
    factors = np.arange(1, ZOOM_MAX[severity - 1], 0.01)
    out = x.copy()
    for z in factors:
        out += clipped_zoom(x, float(z))
    return out / (len(factors) + 1)
