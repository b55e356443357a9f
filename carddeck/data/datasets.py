"""Image classification datasets as uint8 NHWC arrays, found by name.

Names (the same on the CLI): ``digits32``; ``cifar10:PATH``, ``cifar100:PATH`` (python-pickle
layout); ``npz:PATH`` (``images`` uint8 [N,H,W,3] + ``labels``). Corrupted suites in the CIFAR-10-C
layout are read by :mod:`carddeck.data.corrupted`. Nothing here downloads anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from carddeck.errors import InvalidInput
from carddeck.registry import Registry

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Dataset:
    """A labelled image set: ``images`` uint8 [N, H, W, 3], ``labels`` int64 [N]."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        check_images_labels(self.images, self.labels, self.name)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: np.ndarray, name: str | None = None) -> Dataset:
        return Dataset(name or self.name, self.images[index], self.labels[index], self.class_names)


def check_images_labels(images: np.ndarray, labels: np.ndarray, source: str) -> None:
    """Raise InvalidInput naming ``source`` unless images are uint8 [N,H,W,3] with N int labels."""
    if images.dtype != np.uint8:
        raise InvalidInput(f"{source}: images must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidInput(f"{source}: images must have shape [N, H, W, 3], got {list(images.shape)}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInput(f"{source}: labels must be a 1-D integer array, got {labels.dtype} {list(labels.shape)}")
    if len(labels) != len(images):
        raise InvalidInput(f"{source}: {len(images)} images but {len(labels)} labels")


# A loader takes the part after "name:" (or None) and the split.
Loader = Callable[[str | None, str], Dataset]
DATASETS: Registry[Loader] = Registry("dataset")


def load_dataset(spec: str, split: str = "test") -> Dataset:
    """Load ``spec`` (``digits32``, ``cifar10:PATH``, ``npz:PATH`` ...) and return one split."""
    if split not in SPLITS:
        raise InvalidInput(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    name, _, arg = spec.partition(":")
    return DATASETS.get(name)(arg or None, split)


def split_indices(labels: np.ndarray, fractions: tuple[float, float, float], seed: int) -> dict[str, np.ndarray]:
    """A stratified, seeded train/val/test split: each class is divided in the same proportions."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(fractions[0] * len(idx)))
        n_val = int(round(fractions[1] * len(idx)))
        parts["train"].append(idx[:n_train])
        parts["val"].append(idx[n_train : n_train + n_val])
        parts["test"].append(idx[n_train + n_val :])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


DIGITS_SPLIT = (0.6, 0.2, 0.2)
DIGITS_SEED = 0


@DATASETS.register("digits32")
def load_digits32(arg: str | None, split: str) -> Dataset:
    """scikit-learn's 1797 handwritten 8x8 digits, as 32x32 RGB uint8 images.

    Each 8x8 image (values 0..16) is upsampled 4x with bilinear interpolation, scaled to 0..255 and
    repeated over 3 channels (white strokes on black). Split: stratified per class, 60% train /
    20% val / 20% test, seed 0 (1078 / 359 / 360 images); fixed so every CARD and report agrees.
    """
    if arg is not None:
        raise InvalidInput(f"dataset 'digits32' takes no path, got 'digits32:{arg}'")
    from scipy.ndimage import zoom

    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - depends on the install
        raise InvalidInput("dataset 'digits32' needs scikit-learn: pip install 'carddeck[train]'") from None
    digits = load_digits()
    small = digits.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    big = zoom(small, (1, 4, 4), order=1, mode="nearest", grid_mode=True)
    images = np.repeat(np.clip(big * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    idx = split_indices(labels, DIGITS_SPLIT, DIGITS_SEED)[split]
    return Dataset(f"digits32:{split}", images[idx], labels[idx], tuple(str(i) for i in range(10)))
