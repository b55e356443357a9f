"""Batched image operations the corruptions share (numpy/scipy only).

Every corruption works on float32 [N, H, W, 3] images in [0, 1] and draws all randomness from the
``np.random.Generator`` it is given, with one draw per image so a batch is corrupted in one pass.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def size_scale(x: np.ndarray) -> float:
    """How much larger than CIFAR's 32 px the shorter image side is: size-dependent parameters
    (blur radii, displacement fields, fractal size) are multiplied by it."""
    return min(x.shape[1], x.shape[2]) / 32.0


def gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """Gaussian blur over the two spatial axes of [N, H, W] or [N, H, W, C] (skimage's defaults)."""
    if sigma <= 0:
        return x
    sig = (0.0, sigma, sigma) + (0.0,) * (x.ndim - 3)
    return ndimage.gaussian_filter(x, sig, mode=mode, truncate=truncate)


def separable(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Apply a linear map along each spatial axis of [N, H, W, C]: rows [H', H], cols [W', W]."""
    rows, cols = rows.astype(np.float32), cols.astype(np.float32)
    if x.shape[1] * x.shape[2] >= 64 * 64:  # large images: two big GEMMs are faster
        y = np.tensordot(np.tensordot(rows, x, axes=(1, 1)), cols, axes=(2, 1))  # [H', N, C, W']
        return y.transpose(1, 0, 3, 2)
    return np.matmul(np.matmul(rows, x.transpose(0, 3, 1, 2)), cols.T).transpose(0, 2, 3, 1)


def zoom_matrix(length: int, zoom: float) -> np.ndarray:
    """[length, length] linear map of make_cifar_c's clipped_zoom along one axis: crop the central
    ceil(length / zoom) pixels, enlarge them with scipy.ndimage.zoom (order 1), keep the centre."""
    crop = int(np.ceil(length / zoom))
    top = (length - crop) // 2
    out_len = int(round(crop * zoom))
    trim = (out_len - length) // 2
    pos = top + (np.arange(length) + trim) * ((crop - 1) / max(out_len - 1, 1))
    lo = np.clip(np.floor(pos).astype(np.int64), top, top + crop - 1)
    hi = np.minimum(lo + 1, top + crop - 1)
    frac = pos - lo
    m = np.zeros((length, length))
    np.add.at(m, (np.arange(length), lo), 1 - frac)
    np.add.at(m, (np.arange(length), hi), frac)
    return m


def clipped_zoom(x: np.ndarray, zoom: float) -> np.ndarray:
    """Zoom [N, H, W, C] about the centre by ``zoom`` >= 1 and crop back to H x W (as make_cifar_c)."""
    if zoom == 1:
        return x
    return separable(x, zoom_matrix(x.shape[1], zoom), zoom_matrix(x.shape[2], zoom))


def motion_blur(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """One-sided motion blur of [N, H, W, C], one angle (degrees) per image.

    Re-implements ImageMagick's ``-motion-blur radius x sigma + angle`` the way the
    ``imagecorruptions`` package does without ImageMagick: a trail of 2*radius+1 taps along the
    angle, Gaussian weights exp(-i^2 / 2 sigma^2) over the tap index, offsets rounded to whole
    pixels, edges replicated. ImageMagick samples the same taps; it differs only in edge handling
    and in sub-pixel rounding details.
    """
    n, h, w = x.shape[:3]
    width = 2 * int(round(radius)) + 1
    taps = np.arange(width, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    rad = np.deg2rad(angles)[:, None]
    dy = -np.ceil(taps[None] * np.sin(rad) - 0.5).astype(np.int64)  # [N, width]
    dx = -np.ceil(taps[None] * np.cos(rad) - 0.5).astype(np.int64)
    rows, cols = np.arange(h), np.arange(w)
    batch = np.arange(n)[:, None, None]
    out = np.zeros(x.shape, dtype=np.float32)
    for i in range(width):
        # A trail longer than the image stops where it leaves (as imagecorruptions does), per image.
        live = (np.abs(dy[:, : i + 1]) < h).all(1) & (np.abs(dx[:, : i + 1]) < w).all(1)
        yy = np.clip(rows[None] - dy[:, i, None], 0, h - 1)[:, :, None]
        xx = np.clip(cols[None] - dx[:, i, None], 0, w - 1)[:, None, :]
        out += (kernel[i] * live[:, None, None, None]).astype(np.float32) * x[batch, yy, xx]
    return out


def plasma_fractal(n: int, mapsize: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """n diamond-square height maps [n, mapsize, mapsize] in [0, 1] (make_cifar_c's plasma_fractal)."""
    if mapsize & (mapsize - 1):
        raise ValueError("mapsize must be a power of two")
    m = np.zeros((n, mapsize, mapsize), dtype=np.float64)
    step, wibble = mapsize, 100.0

    def wibbled(a: np.ndarray) -> np.ndarray:
        return a / 4 + wibble * rng.uniform(-wibble, wibble, a.shape)

    while step >= 2:
        half = step // 2
        corner = m[:, ::step, ::step]
        squares = corner + np.roll(corner, -1, axis=1)
        squares += np.roll(squares, -1, axis=2)
        m[:, half::step, half::step] = wibbled(squares)
        dr, ul = m[:, half::step, half::step], m[:, ::step, ::step]
        m[:, ::step, half::step] = wibbled(dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2))
        m[:, half::step, ::step] = wibbled(dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1))
        step //= 2
        wibble /= decay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / np.maximum(m.max(axis=(1, 2), keepdims=True), 1e-12)


def fractal_map(n: int, h: int, w: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Plasma fractals covering h x w: the map is the next power of two >= max(h, w), at least 32
    (CIFAR's size), cropped to the image."""
    mapsize = max(32, 1 << int(np.ceil(np.log2(max(h, w)))))
    return plasma_fractal(n, mapsize, decay, rng)[:, :h, :w]


def rgb_to_gray(x: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma (OpenCV's RGB2GRAY) of [..., 3] -> [..., 1]."""
    return (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """[..., 3] RGB in [0, 1] -> HSV in [0, 1] (skimage's convention: grey has hue and saturation 0)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(-1)
    delta = v - x.min(-1)
    safe = np.where(delta > 0, delta, 1)
    s = np.where(v > 0, delta / np.where(v > 0, v, 1), 0)
    hue = np.where(r == v, (g - b) / safe, np.where(g == v, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = np.where(delta > 0, (hue / 6) % 1.0, 0)
    return np.stack([hue, s, v], -1).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(h * 6)
    f = h * 6 - sector
    sector = sector.astype(np.int64) % 6
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.empty(hsv.shape, dtype=np.float32)
    for c in range(3):
        out[..., c] = np.choose(sector, [ch[c] for ch in choices])
    return out


def box_resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of Pillow's BOX filter resize along one axis (area average when
    shrinking, nearest pixel when enlarging), computed the way Pillow's precompute_coeffs does."""
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        pos = (np.arange(lo, hi) - center + 0.5) / filterscale
        weights[i, lo:hi] = (pos >= -0.5) & (pos < 0.5)
    return weights / np.maximum(weights.sum(1, keepdims=True), 1e-12)


def fold_index(i: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Map integer indices outside 0..n-1 back inside: 'mirror' (d c b | a b c d | c b a, OpenCV's
    BORDER_REFLECT_101) or 'reflect' (b a | a b c d | d c), as scipy.ndimage extends the input."""
    if mode == "mirror":
        i = np.abs(i) % (2 * n - 2)
        return np.where(i >= n, 2 * n - 2 - i, i)
    i = i % (2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def bilinear_sample(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str) -> np.ndarray:
    """Bilinear sample of [N, H, W, C] at per-image coordinates [N, H, W] (what
    scipy.ndimage.map_coordinates(order=1) gives, without interpolating across images and channels)."""
    n, h, w, _ = x.shape
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0)[..., None].astype(np.float32), (cols - c0)[..., None].astype(np.float32)
    r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
    ra, rb = fold_index(r0, h, mode), fold_index(r0 + 1, h, mode)
    ca, cb = fold_index(c0, w, mode), fold_index(c0 + 1, w, mode)
    b = np.arange(n)[:, None, None]
    top = x[b, ra, ca] * (1 - fc) + x[b, ra, cb] * fc
    bottom = x[b, rb, ca] * (1 - fc) + x[b, rb, cb] * fc
    return (top * (1 - fr) + bottom * fr).astype(np.float32)
