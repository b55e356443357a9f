"""CIFAR-10 / CIFAR-100 loaders, on small files written exactly like the python-pickle release."""

import os
import pickle

import numpy as np
import pytest

from carddeck.data import load_dataset
from carddeck.errors import InvalidInput

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def _batch(images, labels, label_key=b"labels"):
    """A release batch: b"data" uint8 [N, 3072] rows of R, G, B planes (row-major), labels a list."""
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return {
        b"batch_label": b"training batch 1 of 5",
        label_key: [int(v) for v in labels],
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the release's protocol, bytes keys


def _images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


@pytest.fixture()
def cifar10_dir(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    train_images, train_labels = _images(100, 0), np.arange(100) % 10
    for i in range(5):
        part = slice(20 * i, 20 * (i + 1))
        _dump(root / f"data_batch_{i + 1}", _batch(train_images[part], train_labels[part]))
    _dump(root / "test_batch", _batch(_images(30, 1), np.arange(30) % 10))
    _dump(root / "batches.meta", {b"num_cases_per_batch": 20, b"label_names": CIFAR10_NAMES, b"num_vis": 3072})
    return root, train_images, train_labels


def test_cifar10_reads_the_release_layout_with_a_fixed_validation_hold_out(cifar10_dir):
    root, train_images, train_labels = cifar10_dir
    parts = {s: load_dataset(f"cifar10:{root}", s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [90, 10, 30]
    assert parts["test"].class_names[:2] == ("airplane", "automobile") and parts["test"].num_classes == 10
    assert np.array_equal(parts["test"].images, _images(30, 1))  # CHW rows decoded to HWC exactly
    # train + val is exactly the training files, disjoint, and the same every time
    rows = {img.tobytes(): lab for img, lab in zip(train_images, train_labels)}
    seen = [img.tobytes() for s in ("train", "val") for img in parts[s].images]
    assert sorted(seen) == sorted(rows) and len(set(seen)) == 100
    for s in ("train", "val"):
        assert all(rows[img.tobytes()] == lab for img, lab in zip(parts[s].images, parts[s].labels))
    assert np.array_equal(load_dataset(f"cifar10:{root}", "val").images, parts["val"].images)


def test_cifar100_reads_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    fine = np.arange(40) % 100 * 2 % 100
    train = _batch(_images(40, 2), fine, label_key=b"fine_labels")
    train[b"coarse_labels"] = [int(v) // 5 for v in fine]
    _dump(root / "train", train)
    _dump(root / "test", _batch(_images(10, 3), np.arange(10) * 9, label_key=b"fine_labels"))
    names = [f"class{i}".encode() for i in range(100)]
    _dump(root / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20})
    test = load_dataset(f"cifar100:{root}", "test")
    assert test.num_classes == 100 and test.class_names[9] == "class9"
    assert list(test.labels) == list(np.arange(10) * 9)
    assert len(load_dataset(f"cifar100:{root}", "train")) == 36


def test_missing_files_are_named(cifar10_dir, tmp_path):
    root, *_ = cifar10_dir
    os.remove(root / "data_batch_3")
    with pytest.raises(InvalidInput, match="data_batch_3: file not found"):
        load_dataset(f"cifar10:{root}", "train")
    with pytest.raises(InvalidInput, match="not a directory"):
        load_dataset(f"cifar10:{tmp_path / 'nope'}", "test")
    with pytest.raises(InvalidInput, match="needs a directory"):
        load_dataset("cifar10", "test")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.update({b"data": b[b"data"][:, :3000]}), r"test_batch: b'data' must be uint8 \[N, 3072\]"),
        (lambda b: b.update({b"data": b[b"data"].astype(np.float32)}), "test_batch: b'data' must be uint8"),
        (lambda b: b.update({b"labels": b[b"labels"][:-1]}), "test_batch: 30 images but 29 labels"),
        (lambda b: b.pop(b"labels"), "test_batch: missing key b'labels'"),
        (lambda b: b.update({b"labels": [12] * 30}), "labels must lie in 0..9"),
    ],
)
def test_malformed_batches_are_rejected_naming_the_file(cifar10_dir, change, message):
    root, *_ = cifar10_dir
    batch = _batch(_images(30, 1), np.arange(30) % 10)
    change(batch)
    _dump(root / "test_batch", batch)
    with pytest.raises(InvalidInput, match=message):
        load_dataset(f"cifar10:{root}", "test")


def test_wrong_class_name_count_and_non_pickles_are_rejected(cifar10_dir):
    root, *_ = cifar10_dir
    _dump(root / "batches.meta", {b"label_names": CIFAR10_NAMES[:9]})
    with pytest.raises(InvalidInput, match="batches.meta: expected 10 class names"):
        load_dataset(f"cifar10:{root}", "test")
    (root / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(InvalidInput, match="test_batch: not a CIFAR python-pickle batch"):
        load_dataset(f"cifar10:{root}", "test")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_a_pickle_naming_other_code_is_refused_not_run(cifar10_dir, tmp_path, monkeypatch):
    root, *_ = cifar10_dir
    monkeypatch.chdir(tmp_path)
    batch = _batch(_images(30, 1), np.arange(30) % 10)
    batch[b"extra"] = _Evil()
    _dump(root / "test_batch", batch)
    with pytest.raises(InvalidInput, match="refusing to load"):
        load_dataset(f"cifar10:{root}", "test")
    assert not (tmp_path / "pwned.txt").exists()
