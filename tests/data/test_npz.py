"""The npz loader: one array pair split 60/20/20, or explicit splits."""

import numpy as np
import pytest

from carddeck.data import load_dataset
from carddeck.errors import InvalidInput


def _images(n, h=20, w=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_images_and_labels_are_split_per_class_60_20_20(tmp_path):
    path = tmp_path / "mine.npz"
    labels = np.repeat(np.arange(3), 50)
    np.savez(path, images=_images(150), labels=labels, class_names=np.array(["cat", "dog", "eel"]))
    parts = {s: load_dataset(f"npz:{path}", s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [90, 30, 30]
    for d in parts.values():
        assert d.class_names == ("cat", "dog", "eel") and d.images.shape[1:] == (20, 24, 3)
        assert list(np.bincount(d.labels)) == [len(d) // 3] * 3  # stratified
    seen = [img.tobytes() for d in parts.values() for img in d.images]
    assert len(set(seen)) == 150
    assert np.array_equal(load_dataset(f"npz:{path}", "val").images, parts["val"].images)


def test_explicit_splits_are_used_as_given(tmp_path):
    path = tmp_path / "split.npz"
    arrays = {}
    for i, s in enumerate(("train", "val", "test")):
        arrays[f"{s}_images"] = _images(5 + i, seed=i)
        arrays[f"{s}_labels"] = np.arange(5 + i) % 4
    np.savez(path, **arrays)
    test = load_dataset(f"npz:{path}", "test")
    assert np.array_equal(test.images, arrays["test_images"]) and test.class_names == ("0", "1", "2", "3")
    del arrays["val_labels"]
    np.savez(path, **arrays)
    with pytest.raises(InvalidInput, match="missing val_labels"):
        load_dataset(f"npz:{path}", "test")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": _images(4).astype(np.float32), "labels": np.arange(4)}, "images must be uint8"),
        ({"images": _images(4)[..., 0], "labels": np.arange(4)}, r"shape \[N, H, W, 3\]"),
        ({"images": _images(4), "labels": np.arange(3)}, "4 images but 3 labels"),
        ({"images": _images(4), "labels": np.arange(4.0)}, "labels must be a 1-D integer array"),
        (
            {"images": _images(4), "labels": np.arange(4), "class_names": np.array(["a", "b"])},
            r"labels must lie in 0..1",
        ),
        ({"pictures": _images(4), "labels": np.arange(4)}, "unknown arrays pictures; accepted: images, labels"),
        ({"labels": np.arange(4)}, "expected arrays 'images' and 'labels'"),
    ],
)
def test_malformed_npz_is_rejected_naming_the_file(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InvalidInput, match=message) as err:
        load_dataset(f"npz:{path}", "train")
    assert "bad.npz" in str(err.value)


def test_missing_unreadable_and_pickled_files_are_rejected(tmp_path):
    with pytest.raises(InvalidInput, match="nope.npz: file not found"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"junk")
    with pytest.raises(InvalidInput, match="junk.npz: not a readable .npz"):
        load_dataset(f"npz:{junk}")
    pickled = tmp_path / "objects.npz"
    np.savez(pickled, images=np.array([object()] * 2, dtype=object), labels=np.arange(2))
    with pytest.raises(InvalidInput, match="objects.npz"):
        load_dataset(f"npz:{pickled}")


def test_class_names_under_either_common_spelling(tmp_path):
    labels = np.repeat(np.arange(2), 10)
    for key in ("class_names", "classes"):
        path = tmp_path / f"{key}.npz"
        np.savez(path, images=_images(20), labels=labels, **{key: np.array(["cat", "dog"])})
        assert load_dataset(f"npz:{path}", "test").class_names == ("cat", "dog")
    both = tmp_path / "both.npz"
    np.savez(both, images=_images(20), labels=labels, classes=np.array(["a", "b"]), class_names=np.array(["a", "b"]))
    with pytest.raises(InvalidInput, match="both class_names and classes given"):
        load_dataset(f"npz:{both}", "test")


def test_unknown_arrays_are_refused_with_the_accepted_names(tmp_path):
    """Before: a 'label_names' array was silently ignored and the classes became '0'..'9'."""
    path = tmp_path / "odd.npz"
    np.savez(path, images=_images(20), labels=np.arange(20) % 2, label_names=np.array(["cat", "dog"]))
    with pytest.raises(
        InvalidInput, match=r"unknown arrays label_names; accepted: images, labels, .*class_names, classes"
    ):
        load_dataset(f"npz:{path}", "test")
