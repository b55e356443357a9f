"""leaves32: a procedural natural-image development set (dead leaves with class-defined objects).

Why: digits32 (upscaled strokes on black) has an unnatural spectrum, so it cannot show how fog,
contrast or brightness hurt a classifier of photographs. The dead-leaves model (Lee, Mumford and
Huang 2001) occludes opaque shapes whose sizes follow a power law p(r) ~ r^-3; that scale
invariance gives the 1/f amplitude spectrum of natural images, and the occlusions give them their
edges. Leaves are filled with patches of the photographs bundled with scikit-learn
(``load_sample_images``: china, flower), so textures are photographic too.

A class is an (object hue family, object shape) pair: 5 hue families (red, yellow, green, blue,
violet; centres 0.2 apart, jittered +-0.08) x 2 shapes (disk, bar). Every image is a clutter of
muted leaves (saturation <= 0.3) of every shape and hue; 2-3 saturated class leaves are painted
among the later half of the clutter, and the small leaves painted after them occlude them in part.
Recognising the class needs colour and shape under occlusion, and fog, contrast or brightness,
which wash colour out and flatten the object against the clutter, take away most of the cue.

Why this design: a first version (5 shapes x 2 hue families, clutter of every hue) could not be
told apart in a short recipe: a clutter leaf could pass for another class's object, and small
triangles, squares and disks under occlusion need far more training than a deck build gives
(a dense ResNet-20 at width 0.5 reached 34% val after 4 AugMix epochs; this version: 75%, still
rising). Muted clutter makes the objects findable, as salient objects are in photographs; the
spectrum is unchanged, since it comes from the leaf sizes. What a deck built on it reaches is in
models/REPORT-leaves32.md.

400 images per class, 32x32 RGB, rendered at 64x64 and box-downsampled (anti-aliased); image i is
drawn from its own seeded generator, so the set is the same on every machine. Split per class
60/20/20 with seed 0 (2400 / 800 / 800). Rendered once (about a minute), then read from a cache.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

SHAPES = ("disk", "square", "triangle", "bar", "ring")  # every leaf's shape; clutter uses all five
OBJECT_SHAPES = ("disk", "bar")  # class objects: round or elongated
HUES = {"red": 0.0, "yellow": 0.2, "green": 0.4, "blue": 0.6, "violet": 0.8}  # family centres (HSV, 0..1)
CLASS_NAMES = tuple(f"{hue}-{shape}" for hue in HUES for shape in OBJECT_SHAPES)
PER_CLASS = 400
SEED = 2026
SIZE = 32
_SCALE = 2  # render at 64 px, then average 2x2 blocks
_HUE_JITTER = 0.08  # class leaves' hue: centre +- this (neighbouring families are 0.2 apart)
_OBJECT_SAT = (0.55, 0.95)  # class leaves are saturated ...
_CLUTTER_SAT = (0.0, 0.3)  # ... clutter is muted, as most surfaces in photographs are
_R_MIN, _R_MAX = 2.5, 48.0  # leaf radii in 64-px pixels, power law r^-3 between them
_CLUTTER = (20, 45)  # clutter leaves per image
_OBJECTS = (2, 4)  # class leaves per image
_OBJECT_R = (12.0, 20.0)  # class leaves are mid-sized: visible, yet occludable
_OCCLUDER_R = 4.0


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Inside-test of ``shape`` of radius ``r`` in rotated leaf coordinates (u, v)."""
    if shape == "disk":
        return u * u + v * v <= r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if shape == "triangle":  # equilateral, circumradius r: three half-planes
        a = np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
        return np.all(u[..., None] * np.cos(a) + v[..., None] * np.sin(a) <= 0.5 * r, axis=-1)
    if shape == "bar":
        return (np.abs(u) <= r) & (np.abs(v) <= 0.3 * r)
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(shape)


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], np.float32)


@lru_cache(maxsize=1)
def _textures() -> np.ndarray:
    """Luminance of scikit-learn's bundled photographs at half size, zero mean, unit std: [2, H, W]."""
    from sklearn.datasets import load_sample_images

    out = []
    for img in load_sample_images().images:
        g = np.asarray(img, np.float32).mean(axis=-1)
        g = g[: g.shape[0] // 2 * 2, : g.shape[1] // 2 * 2]
        g = g.reshape(g.shape[0] // 2, 2, g.shape[1] // 2, 2).mean(axis=(1, 3))
        out.append((g - g.mean()) / g.std())
    h = min(t.shape[0] for t in out)
    w = min(t.shape[1] for t in out)
    return np.stack([t[:h, :w] for t in out])


def _power_law_radius(rng: np.random.Generator) -> float:
    """Inverse-CDF sample of p(r) ~ r^-3 on [_R_MIN, _R_MAX]."""
    a, b = _R_MIN**-2, _R_MAX**-2
    return float((a - rng.uniform() * (a - b)) ** -0.5)


def _paint(canvas: np.ndarray, rng: np.random.Generator, shape: str, r: float, rgb: np.ndarray) -> None:
    """Paint one textured, shaded leaf of ``shape`` at a random place and angle (in place)."""
    n = canvas.shape[0]
    cy, cx = rng.uniform(-0.1 * n, 1.1 * n, size=2)
    y0, y1 = max(0, int(cy - r) - 1), min(n, int(cy + r) + 2)
    x0, x1 = max(0, int(cx - r) - 1), min(n, int(cx + r) + 2)
    if y0 >= y1 or x0 >= x1:
        return
    yy = np.arange(y0, y1, dtype=np.float32)[:, None]
    xx = np.arange(x0, x1, dtype=np.float32)[None, :]
    theta = rng.uniform(0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * (xx - cx) + s * (yy - cy), -s * (xx - cx) + c * (yy - cy)
    mask = _shape_mask(shape, u, v, r)
    if not mask.any():
        return
    tex = _textures()
    t = int(rng.integers(len(tex)))
    ty = int(rng.integers(tex.shape[1] - (y1 - y0)))
    tx = int(rng.integers(tex.shape[2] - (x1 - x0)))
    patch = tex[t, ty : ty + y1 - y0, tx : tx + x1 - x0]
    u, v = np.broadcast_arrays(u, v)
    shade = 1.0 + 0.25 * (u / max(r, 1.0)) * rng.uniform(-1, 1)  # a light gradient across the leaf
    lum = np.clip(shade * (1.0 + rng.uniform(0.1, 0.35) * patch), 0.0, 2.0)
    canvas[y0:y1, x0:x1][mask] = (lum[..., None] * rgb)[mask]


def _render_with(rng: np.random.Generator, label: int) -> np.ndarray:
    hue_name, shape = CLASS_NAMES[label].split("-")
    n = SIZE * _SCALE
    canvas = np.empty((n, n, 3), np.float32)
    canvas[:] = _hsv_to_rgb(rng.uniform(), rng.uniform(*_CLUTTER_SAT), rng.uniform(0.2, 0.8))
    for _ in range(3):  # a backdrop of large leaves, as the far end of the power law would give
        rgb = _hsv_to_rgb(rng.uniform(), rng.uniform(*_CLUTTER_SAT), rng.uniform(0.15, 0.9))
        _paint(canvas, rng, SHAPES[int(rng.integers(len(SHAPES)))], rng.uniform(30, 60), rgb)
    n_clutter = int(rng.integers(*_CLUTTER))
    n_objects = int(rng.integers(*_OBJECTS))
    # Objects go in at random places of the painting order: later clutter leaves occlude them.
    # Objects go in among the later half of the clutter; leaves painted after the first object are
    # capped at _OCCLUDER_R, so objects are partly hidden but never wiped out.
    object_at = set((n_clutter // 2 + rng.choice(n_clutter - n_clutter // 2, size=n_objects, replace=False)).tolist())
    first = min(object_at)
    for i in range(n_clutter):
        rgb = _hsv_to_rgb(rng.uniform(), rng.uniform(*_CLUTTER_SAT), rng.uniform(0.15, 0.95))
        r = _power_law_radius(rng)
        _paint(canvas, rng, SHAPES[int(rng.integers(len(SHAPES)))], min(r, _OCCLUDER_R) if i > first else r, rgb)
        if i in object_at:
            hue = (HUES[hue_name] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 1.0
            rgb = _hsv_to_rgb(hue, rng.uniform(*_OBJECT_SAT), rng.uniform(0.35, 0.95))
            _paint(canvas, rng, shape, rng.uniform(*_OBJECT_R), rgb)
    small = canvas.reshape(SIZE, _SCALE, SIZE, _SCALE, 3).mean(axis=(1, 3))
    return np.clip(small * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _cache_path(per_class: int, seed: int) -> Path:
    """Where a generated set is kept: keyed by this file's contents, so a changed generator never
    reads an old set. ``CARDDECK_CACHE`` moves it (default ~/.cache/carddeck)."""
    root = Path(os.environ.get("CARDDECK_CACHE") or Path.home() / ".cache" / "carddeck")
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    return root / f"leaves32-{per_class}-{seed}-{digest}.npz"


@lru_cache(maxsize=1)
def generate(per_class: int = PER_CLASS, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 [10 * per_class, 32, 32, 3]) and labels, class by class; image j of class
    c comes from the generator seeded with (seed, c, j), so it does not depend on the others.

    The first call renders them (about a minute on one busy core, with a progress bar) and keeps
    them in the cache; later calls read the cache (well under a second)."""
    path = _cache_path(per_class, seed)
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, KeyError, ValueError):
        images, labels = _render_all(per_class, seed)
        try:  # a cache that cannot be written only costs time
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, images=images, labels=labels)
            os.replace(tmp, path)
        except OSError:
            pass
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _render_all(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(CLASS_NAMES) * per_class, SIZE, SIZE, 3), np.uint8)
    labels = np.repeat(np.arange(len(CLASS_NAMES), dtype=np.int64), per_class)
    try:
        from tqdm import tqdm

        steps = tqdm(range(len(labels)), desc="rendering leaves32", unit="img", leave=False)
    except ImportError:  # pragma: no cover - tqdm comes with the [train] extra
        steps = range(len(labels))
    for i in steps:
        rng = np.random.default_rng([seed, int(labels[i]), i % per_class])
        images[i] = _render_with(rng, int(labels[i]))
    return images, labels


__all__ = ["CLASS_NAMES", "PER_CLASS", "generate"]
