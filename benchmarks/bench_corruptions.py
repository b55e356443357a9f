"""Time writing digits32-C: all 19 corruptions x 5 severities over the digits32 test split.

    python benchmarks/bench_corruptions.py [--reference-images 360]

Prints the time per corruption (5 severities, 360 images), the total for ``write_suite`` (what
``carddeck corrupt`` runs, files included; target: under 60 s on 2 cores), and glass blur's
vectorized swaps against a straightforward per-pixel loop (make_cifar_c's), measured in the same
run on the same images and swap draws, with the speed ratio.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from carddeck.commands.corrupt import write_suite
from carddeck.data import load_dataset
from carddeck.data.corruptions import BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES, corrupt
from carddeck.data.corruptions._common import gaussian
from carddeck.data.corruptions.blur import GLASS, glass_swap_codes, glass_swap_index


def glass_blur_loop(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Reference glass blur: per image, per pixel, sequential swaps (make_cifar_c's loop)."""
    sigma, _, iterations = GLASS[severity - 1]
    n, h, w, _ = x.shape
    x = np.rint(np.clip(gaussian(x, sigma), 0, 1) * 255) / 255
    for _ in range(iterations):
        code = glass_swap_codes(n, h, w, rng)
        for k in range(n):
            img = x[k]
            for r in range(h - 1, 1, -1):
                for c in range(w - 1, 1, -1):
                    dy, dx = -((code[k, r, c] >> 1) & 1), -(code[k, r, c] & 1)
                    img[r, c], img[r + dy, c + dx] = img[r + dy, c + dx], img[r, c].copy()
    return gaussian(x.astype(np.float32), sigma)


def glass_blur_vectorized(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma, _, iterations = GLASS[severity - 1]
    n, h, w, ch = x.shape
    x = np.rint(np.clip(gaussian(x, sigma), 0, 1) * 255) / 255
    for _ in range(iterations):
        src = glass_swap_index(glass_swap_codes(n, h, w, rng))
        x = np.take_along_axis(x.reshape(n, h * w, ch), src[..., None], 1).reshape(n, h, w, ch)
    return gaussian(x.astype(np.float32), sigma)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-images", type=int, default=360, help="images for the per-pixel loop reference")
    args = parser.parse_args()
    data = load_dataset("digits32", "test")
    images = data.images
    names = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
    print(f"digits32 test: {len(images)} images {images.shape[1:]}, cpus available: {len(os.sched_getaffinity(0))}")

    print("\nper corruption, 5 severities:")
    per: dict[str, float] = {}
    for name in names:
        start = time.perf_counter()
        for s in SEVERITIES:
            corrupt(images, name, s)
        per[name] = time.perf_counter() - start
        print(f"  {name:18s} {per[name]:7.3f} s")
    print(f"  {'sum':18s} {sum(per.values()):7.3f} s")

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_suite(images, data.labels, Path(tmp) / "digits32-c", names, SEVERITIES)
        total = time.perf_counter() - start
    print(f"\nwrite_suite digits32-C (19 x 5 x {len(images)} images, files included): {total:.2f} s (target < 60 s)")

    x = images[: args.reference_images].astype(np.float32) / 255
    print(f"\nglass_blur on {len(x)} images, all 5 severities (same draws for both):")
    t_vec = t_loop = 0.0
    for s in SEVERITIES:
        start = time.perf_counter()
        fast = glass_blur_vectorized(x, s, np.random.default_rng(s))
        t_vec += time.perf_counter() - start
        start = time.perf_counter()
        slow = glass_blur_loop(x, s, np.random.default_rng(s))
        t_loop += time.perf_counter() - start
        if not np.array_equal(fast, slow):
            raise SystemExit(f"severity {s}: vectorized glass blur differs from the loop")
    print(f"  per-pixel loop   {t_loop:8.3f} s  ({1000 * t_loop / (5 * len(x)):.2f} ms per image and severity)")
    print(f"  vectorized       {t_vec:8.3f} s  ({1000 * t_vec / (5 * len(x)):.3f} ms per image and severity)")
    print(f"  speed-up         {t_loop / t_vec:8.1f}x  (outputs identical)")


if __name__ == "__main__":
    main()
