"""Corrupted test suites in the CIFAR-10-C layout, found by name.

A suite is a directory holding ``<corruption>.npy`` (uint8 [k*n, H, W, 3]: severities stacked in
blocks of n images, 1..5 in CIFAR-10-C) and ``labels.npy`` (integers, [k*n]). ``carddeck corrupt``
writes such a directory plus ``carddeck-c.json`` (severities present, class names, source), which
lets a suite hold a subset of severities. Names (the same as ``--data`` on the CLI):
``cifar10c:PATH`` and ``cifar100c:PATH`` (the released CIFAR-10-C / CIFAR-100-C, class names
built in) and ``c:PATH`` (any suite; class names from ``carddeck-c.json`` or "0".."C-1").
``.npy`` files not named after a known corruption are ignored. Arrays are memory-mapped:
``get`` reads one (corruption, severity) block.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carddeck.data.corruptions import BENCHMARK_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES
from carddeck.data.datasets import Dataset
from carddeck.errors import InvalidInput
from carddeck.registry import Registry

SUITE_META = "carddeck-c.json"
SUITE_FORMAT = "carddeck-c/1"

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple(
    [
        "apple",
        "aquarium_fish",
        "baby",
        "bear",
        "beaver",
        "bed",
        "bee",
        "beetle",
        "bicycle",
        "bottle",
        "bowl",
        "boy",
        "bridge",
        "bus",
        "butterfly",
        "camel",
        "can",
        "castle",
        "caterpillar",
        "cattle",
        "chair",
        "chimpanzee",
        "clock",
        "cloud",
        "cockroach",
        "couch",
        "crab",
        "crocodile",
        "cup",
        "dinosaur",
        "dolphin",
        "elephant",
        "flatfish",
        "forest",
        "fox",
        "girl",
        "hamster",
        "house",
        "kangaroo",
        "keyboard",
        "lamp",
        "lawn_mower",
        "leopard",
        "lion",
        "lizard",
        "lobster",
        "man",
        "maple_tree",
        "motorcycle",
        "mountain",
        "mouse",
        "mushroom",
        "oak_tree",
        "orange",
        "orchid",
        "otter",
        "palm_tree",
        "pear",
        "pickup_truck",
        "pine_tree",
        "plain",
        "plate",
        "poppy",
        "porcupine",
        "possum",
        "rabbit",
        "raccoon",
        "ray",
        "road",
        "rocket",
        "rose",
        "sea",
        "seal",
        "shark",
        "shrew",
        "skunk",
        "skyscraper",
        "snail",
        "snake",
        "spider",
        "squirrel",
        "streetcar",
        "sunflower",
        "sweet_pepper",
        "table",
        "tank",
        "telephone",
        "television",
        "tiger",
        "tractor",
        "train",
        "trout",
        "tulip",
        "turtle",
        "wardrobe",
        "whale",
        "willow_tree",
        "wolf",
        "woman",
        "worm",
    ]
)


@dataclass(frozen=True)
class CorruptedSuite:
    """A validated suite directory; ``get(corruption, severity)`` returns one block as a Dataset."""

    name: str
    root: Path
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    class_names: tuple[str, ...]
    labels: np.ndarray  # [k * n], as in labels.npy
    image_shape: tuple[int, int, int]

    @property
    def images_per_severity(self) -> int:
        return len(self.labels) // len(self.severities)

    @property
    def benchmark_corruptions(self) -> tuple[str, ...]:
        """The CIFAR-10-C benchmark corruptions (the 15 of the robust-accuracy mean) present here."""
        return tuple(c for c in BENCHMARK_CORRUPTIONS if c in self.corruptions)

    def get(self, corruption: str, severity: int) -> Dataset:
        if corruption not in self.corruptions:
            raise InvalidInput(f"{self.root}: no corruption {corruption!r}; present: {', '.join(self.corruptions)}")
        if isinstance(severity, bool) or severity not in self.severities:
            raise InvalidInput(
                f"{self.root}: no severity {severity!r}; present: {', '.join(map(str, self.severities))}"
            )
        n = self.images_per_severity
        block = self.severities.index(severity)
        images = np.load(self.root / f"{corruption}.npy", mmap_mode="r")[block * n : (block + 1) * n]
        labels = self.labels[block * n : (block + 1) * n].astype(np.int64)
        return Dataset(f"{self.name}:{corruption}:{severity}", np.array(images), labels, self.class_names)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        """(corruption, severity) pairs, corruption-major."""
        return ((c, s) for c in self.corruptions for s in self.severities)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise InvalidInput(f"{path}: not a readable .npy array ({exc})") from None


def _read_meta(root: Path) -> dict:
    path = root / SUITE_META
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != SUITE_FORMAT:
        raise InvalidInput(f'{path}: expected a JSON object with "format": "{SUITE_FORMAT}"')
    return meta


def open_suite(name: str, root: Path, class_names: tuple[str, ...] | None) -> CorruptedSuite:
    """Validate the directory ``root`` and return its suite (``class_names`` None: from the meta file)."""
    if not root.is_dir():
        raise InvalidInput(f"{root}: not a directory (expected <corruption>.npy files and labels.npy)")
    meta = _read_meta(root)
    severities = tuple(meta.get("severities", SEVERITIES))
    if (
        not severities
        or len(set(severities)) != len(severities)
        or any(isinstance(s, bool) or s not in SEVERITIES for s in severities)
    ):
        raise InvalidInput(f"{root / SUITE_META}: severities must be distinct values of 1..5, got {list(severities)}")
    labels_path = root / "labels.npy"
    if not labels_path.is_file():
        raise InvalidInput(f"{labels_path}: file not found (a suite needs labels.npy)")
    labels = np.asarray(_load_npy(labels_path))
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInput(f"{labels_path}: expected a 1-D integer array, got {labels.dtype} {list(labels.shape)}")
    if len(labels) == 0 or len(labels) % len(severities):
        raise InvalidInput(
            f"{labels_path}: {len(labels)} labels do not split into {len(severities)} equal severity blocks"
        )
    # the corruptions its carddeck-c.json names (files of an earlier suite written to the same directory are
    # not this suite's), else every corruption file there (a suite from elsewhere)
    listed = meta.get("corruptions")
    every = (*BENCHMARK_CORRUPTIONS, *EXTRA_CORRUPTIONS)
    known = [c for c in every if (c in listed if listed else (root / f"{c}.npy").is_file())]
    absent = [c for c in listed or () if c not in known or not (root / f"{c}.npy").is_file()]
    if absent:
        raise InvalidInput(f"{root / SUITE_META}: names {', '.join(map(str, absent))}, but {root} has no such file")
    if not known:
        raise InvalidInput(f"{root}: no corruption files; expected some of {', '.join(CORRUPTIONS.names())} (.npy)")
    shape: tuple[int, ...] | None = None
    for corruption in known:
        path = root / f"{corruption}.npy"
        arr = _load_npy(path)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise InvalidInput(f"{path}: expected uint8 [N, H, W, 3], got {arr.dtype} {list(arr.shape)}")
        if len(arr) != len(labels):
            raise InvalidInput(f"{path}: {len(arr)} images but labels.npy has {len(labels)} labels")
        if shape is None:
            shape = arr.shape[1:]
        elif arr.shape[1:] != shape:
            raise InvalidInput(f"{path}: images are {list(arr.shape[1:])}, other files have {list(shape)}")
    if class_names is None:
        names = meta.get("class_names")
        class_names = tuple(map(str, names)) if names else tuple(str(i) for i in range(int(labels.max()) + 1))
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise InvalidInput(
            f"{labels_path}: labels must lie in 0..{len(class_names) - 1}, got {labels.min()}..{labels.max()}"
        )
    assert shape is not None
    return CorruptedSuite(
        name=f"{name}:{root}",
        root=root,
        corruptions=tuple(known),
        severities=tuple(int(s) for s in severities),
        class_names=class_names,
        labels=labels,
        image_shape=(int(shape[0]), int(shape[1]), int(shape[2])),
    )


SuiteLoader = Callable[[Path], CorruptedSuite]
CORRUPTED_SUITES: Registry[SuiteLoader] = Registry("corrupted suite")
CORRUPTED_SUITES.register("cifar10c")(lambda root: open_suite("cifar10c", root, CIFAR10_CLASSES))
CORRUPTED_SUITES.register("cifar100c")(lambda root: open_suite("cifar100c", root, CIFAR100_CLASSES))
CORRUPTED_SUITES.register("c")(lambda root: open_suite("c", root, None))


def load_corrupted(spec: str) -> CorruptedSuite:
    """Open ``cifar10c:PATH``, ``cifar100c:PATH`` or ``c:PATH`` (a directory in the CIFAR-10-C layout)."""
    name, _, arg = spec.partition(":")
    loader = CORRUPTED_SUITES.get(name)
    if not arg:
        raise InvalidInput(f"corrupted suite '{name}' needs a directory: '{name}:PATH'")
    return loader(Path(arg).expanduser())
