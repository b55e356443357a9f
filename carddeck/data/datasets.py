"""Image classification datasets as uint8 NHWC arrays, found by name.

Names (the same on the CLI): ``digits32``, ``leaves32`` (procedural natural images);
``cifar10:PATH``, ``cifar100:PATH`` (python-pickle layout); ``npz:PATH`` (``images`` uint8
[N,H,W,3] + ``labels``). Corrupted suites in the CIFAR-10-C layout are read by
:mod:`carddeck.data.corrupted`. Nothing here downloads anything.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from carddeck.errors import InvalidInput, install_hint
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


def data_for_cards(requested: str | None, recorded: Iterable[str], what: str) -> str:
    """The dataset spec to check or fit ``what`` (a card, a deck) on: ``requested`` (``--data``) if
    given, else the one its cards record in CardMeta (provenance.dataset).

    Any other data would quietly measure the wrong thing (a card trained on another 10-class set
    scores near chance on digits32 and both name their classes '0'..'9'), so a request that
    differs from what the cards were trained on is announced on stderr, loudly."""
    datasets = sorted({d for d in recorded if d})
    if requested is None:
        if len(datasets) == 1:
            return datasets[0]
        if not datasets:
            raise InvalidInput(f"{what} records no training dataset; name one with --data (e.g. digits32)")
        raise InvalidInput(f"{what} was trained on several datasets ({', '.join(datasets)}); choose one with --data")
    DATASETS.get(requested.partition(":")[0])  # a name no loader knows is the error, not a different dataset
    if datasets and requested not in datasets:
        msg = (
            f"WARNING: {what} was trained on {', '.join(datasets)}, but --data {requested} was given: "
            f"the figures below describe {requested}, not the data the cards were trained for"
        )
        print(msg, file=sys.stderr, flush=True)
    return requested


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
        raise InvalidInput(f"dataset 'digits32' needs scikit-learn: {install_hint('train')}") from None
    digits = load_digits()
    small = digits.images.astype(np.float32) / 16.0  # [N, 8, 8] in [0, 1]
    big = zoom(small, (1, 4, 4), order=1, mode="nearest", grid_mode=True)
    images = np.repeat(np.clip(big * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    idx = split_indices(labels, DIGITS_SPLIT, DIGITS_SEED)[split]
    return Dataset(f"digits32:{split}", images[idx], labels[idx], tuple(str(i) for i in range(10)))


LEAVES_SPLIT = (0.6, 0.2, 0.2)
LEAVES_SEED = 0


@DATASETS.register("leaves32")
def load_leaves32(arg: str | None, split: str) -> Dataset:
    """A procedural natural-image set (dead leaves with class-defined objects, 1/f spectra), 32x32
    RGB, 10 classes x 400; see :mod:`carddeck.data.leaves`. Split per class 60/20/20, seed 0
    (2400 / 800 / 800 images)."""
    if arg is not None:
        raise InvalidInput(f"dataset 'leaves32' takes no path, got 'leaves32:{arg}'")
    try:
        from carddeck.data.leaves import CLASS_NAMES, generate

        images, labels = generate()
    except ImportError:  # pragma: no cover - depends on the install
        raise InvalidInput(f"dataset 'leaves32' needs scikit-learn: {install_hint('train')}") from None
    idx = split_indices(labels, LEAVES_SPLIT, LEAVES_SEED)[split]
    return Dataset(f"leaves32:{split}", images[idx], labels[idx], CLASS_NAMES)


# --- CIFAR-10 / CIFAR-100, python-pickle release -------------------------------------------------

CIFAR_VAL_FRACTION = 0.1  # 5000 of the 50000 training images
CIFAR_VAL_SEED = 0


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what the CIFAR release holds (dicts, lists, bytes, numpy arrays): a pickle
    can run any code it names, and these files come from outside."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.empty(0))[0]  # this numpy's _reconstruct
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict[bytes, Any]:
    if not path.is_file():
        raise InvalidInput(f"{path}: file not found (expected the python-pickle CIFAR release layout)")
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise InvalidInput(f"{path}: not a CIFAR python-pickle batch ({exc})") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 32, 32, 3] and labels from one batch: b"data" uint8 [N, 3072] (each row the red,
    green, blue 32x32 planes, row-major) and a list of ints under ``label_key``."""
    batch = _read_pickle(path)
    for key in (b"data", label_key):
        if key not in batch:
            raise InvalidInput(f"{path}: missing key {key!r} (has {sorted(batch)})")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise InvalidInput(f"{path}: b'data' must be uint8 [N, 3072], got {data.dtype} {list(data.shape)}")
    labels = np.asarray(batch[label_key])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInput(f"{path}: {label_key!r} must be a list of integers, got {labels.dtype} {list(labels.shape)}")
    if len(labels) != len(data):
        raise InvalidInput(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def _label_names(path: Path, key: bytes, num_classes: int) -> tuple[str, ...]:
    meta = _read_pickle(path)
    if key not in meta:
        raise InvalidInput(f"{path}: missing key {key!r} (has {sorted(meta)})")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[key])
    if len(names) != num_classes:
        raise InvalidInput(f"{path}: expected {num_classes} class names under {key!r}, got {len(names)}")
    return names


def cifar_train_val(n: int) -> dict[str, np.ndarray]:
    """The fixed train/val division of CIFAR's training files: the last 10% of a seed-0
    permutation is the validation hold-out (5000 of 50000), the rest is train; both sorted."""
    perm = np.random.default_rng(CIFAR_VAL_SEED).permutation(n)
    n_val = int(round(CIFAR_VAL_FRACTION * n))
    return {"train": np.sort(perm[: n - n_val]), "val": np.sort(perm[n - n_val :])}


def _load_cifar(
    name: str,
    arg: str | None,
    split: str,
    files: dict[str, list[str]],
    meta: str,
    label_key: bytes,
    names_key: bytes,
    num_classes: int,
) -> Dataset:
    if not arg:
        raise InvalidInput(f"dataset '{name}' needs a directory: '{name}:PATH'")
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise InvalidInput(f"{root}: not a directory (expected the python-pickle CIFAR release layout)")
    part = "test" if split == "test" else "train"
    batches = [_cifar_batch(root / f, label_key) for f in files[part]]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise InvalidInput(f"{root}: labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")
    class_names = _label_names(root / meta, names_key, num_classes)
    if split != "test":
        idx = cifar_train_val(len(labels))[split]
        images, labels = images[idx], labels[idx]
    return Dataset(f"{name}:{split}", np.ascontiguousarray(images), labels, class_names)


@DATASETS.register("cifar10")
def load_cifar10(arg: str | None, split: str) -> Dataset:
    """CIFAR-10 from ``cifar-10-batches-py``: data_batch_1..5 (train + val), test_batch, batches.meta.

    "train" is the 50000 training images minus the validation hold-out (see ``cifar_train_val``),
    "val" the hold-out (5000), "test" the 10000 of test_batch."""
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _load_cifar("cifar10", arg, split, files, "batches.meta", b"labels", b"label_names", 10)


@DATASETS.register("cifar100")
def load_cifar100(arg: str | None, split: str) -> Dataset:
    """CIFAR-100 (fine labels) from ``cifar-100-python``: train (train + val), test, meta.
    Splits as for cifar10."""
    files = {"train": ["train"], "test": ["test"]}
    return _load_cifar("cifar100", arg, split, files, "meta", b"fine_labels", b"fine_label_names", 100)


# --- your own images: npz ---------------------------------------------------------------------

NPZ_SPLIT = (0.6, 0.2, 0.2)
NPZ_SEED = 0
NPZ_CLASS_KEYS = ("class_names", "classes")  # the common spellings of the class-name array


@DATASETS.register("npz")
def load_npz(arg: str | None, split: str) -> Dataset:
    """Images from one ``.npz`` file (read without pickle).

    Either ``images`` uint8 [N, H, W, 3] and ``labels`` (integers 0..C-1), split per class 60/20/20
    with seed 0 (like digits32); or explicit splits ``train_images``/``train_labels``,
    ``val_images``/``val_labels``, ``test_images``/``test_labels`` (all three). Optional
    ``class_names`` or ``classes`` (strings, C of them); otherwise the classes are named "0".."C-1".
    Any other array is refused, naming the accepted ones.
    """
    if not arg:
        raise InvalidInput("dataset 'npz' needs a file: 'npz:PATH'")
    path = Path(arg).expanduser()
    if not path.is_file():
        raise InvalidInput(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:
        raise InvalidInput(f"{path}: not a readable .npz file without pickled objects ({exc})") from None
    explicit = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels")]
    accepted = ["images", "labels", *explicit, *NPZ_CLASS_KEYS]
    unknown = sorted(set(arrays) - set(accepted))
    if unknown:  # an ignored array is a silent default: e.g. class names spelt another way
        raise InvalidInput(f"{path}: unknown arrays {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    names_key = [k for k in NPZ_CLASS_KEYS if k in arrays]
    if len(names_key) > 1:
        raise InvalidInput(f"{path}: both {' and '.join(names_key)} given; keep one of them")
    if any(k in arrays for k in explicit):
        missing = [k for k in explicit if k not in arrays]
        if missing:
            raise InvalidInput(
                f"{path}: explicit splits need all of {', '.join(explicit)}; missing {', '.join(missing)}"
            )
        parts = {s: (arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in SPLITS}
    elif "images" in arrays and "labels" in arrays:
        parts = {"all": (arrays["images"], arrays["labels"])}
    else:
        raise InvalidInput(
            f"{path}: expected arrays 'images' and 'labels' (or train_/val_/test_ ones), got {sorted(arrays)}"
        )
    for part, (images, labels) in parts.items():
        label = f"{path} ({part})" if part != "all" else str(path)
        check_images_labels(images, labels, label)
    all_labels = np.concatenate([labels for _, labels in parts.values()]).astype(np.int64)
    if names_key:
        names = arrays[names_key[0]]
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise InvalidInput(
                f"{path}: {names_key[0]} must be a 1-D array of strings, got {names.dtype} {list(names.shape)}"
            )
        class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
    else:
        class_names = tuple(str(i) for i in range(int(all_labels.max()) + 1 if all_labels.size else 0))
    if all_labels.size and (all_labels.min() < 0 or all_labels.max() >= len(class_names)):
        raise InvalidInput(
            f"{path}: labels must lie in 0..{len(class_names) - 1}, got {all_labels.min()}..{all_labels.max()}"
        )
    if "all" in parts:
        images, labels = parts["all"]
        idx = split_indices(labels, NPZ_SPLIT, NPZ_SEED)[split]
        images, labels = images[idx], labels[idx]
    else:
        images, labels = parts[split]
    return Dataset(f"npz:{path.name}:{split}", images, labels.astype(np.int64), class_names)
