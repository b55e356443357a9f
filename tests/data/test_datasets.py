import numpy as np
import pytest

from carddeck.data import load_dataset
from carddeck.errors import InvalidInput


def test_digits32_split_is_fixed_disjoint_and_complete():
    parts = {s: load_dataset("digits32", s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [1078, 359, 360]
    for d in parts.values():
        assert d.images.shape[1:] == (32, 32, 3) and d.images.dtype == np.uint8
        assert set(np.unique(d.labels)) == set(range(10))
    # the same split every time
    again = load_dataset("digits32", "test")
    assert np.array_equal(again.images, parts["test"].images)
    # no image shared between train and test (digits has a few exact duplicates, so compare counts)
    flat = {s: {img.tobytes() for img in parts[s].images} for s in parts}
    assert len(flat["train"] & flat["test"]) < 5


def test_unknown_dataset_and_split_are_named():
    with pytest.raises(InvalidInput, match="unknown dataset 'mnist'; valid choices: .*digits32"):
        load_dataset("mnist")
    with pytest.raises(InvalidInput, match="unknown split 'dev'"):
        load_dataset("digits32", "dev")


def test_leaves32_split_is_fixed_disjoint_and_named():
    parts = {s: load_dataset("leaves32", s) for s in ("train", "val", "test")}
    assert [len(parts[s]) for s in ("train", "val", "test")] == [2400, 800, 800]
    for d in parts.values():
        assert d.images.shape[1:] == (32, 32, 3) and d.images.dtype == np.uint8
        assert list(np.bincount(d.labels)) == [len(d) // 10] * 10
        assert d.class_names[:2] == ("red-disk", "red-bar") and len(set(d.class_names)) == 10
    flat = {s: {img.tobytes() for img in parts[s].images} for s in parts}
    assert not flat["train"] & flat["test"] and not flat["val"] & flat["test"]
    with pytest.raises(InvalidInput, match="takes no path"):
        load_dataset("leaves32:/tmp/x")


def test_leaves32_has_a_natural_spectrum_and_the_cache_is_exact(tmp_path, monkeypatch):
    """Power falls as 1/f^a with a near 2 (photographs: about 2), unlike digits32; each image is
    seeded on its own, so the cached and a fresh rendering agree bit for bit."""
    from carddeck.data import leaves

    def slope(images):
        g = images.astype(np.float32).mean(-1)
        g -= g.mean(axis=(1, 2), keepdims=True)
        power = (np.abs(np.fft.fft2(g)) ** 2).mean(0)
        r = np.hypot(*np.meshgrid(np.fft.fftfreq(32), np.fft.fftfreq(32), indexing="ij"))
        band = (r > 0.05) & (r < 0.45)
        return np.polyfit(np.log(r[band]), np.log(power[band]), 1)[0]

    test = load_dataset("leaves32", "test")
    assert -3.0 < slope(test.images) < -1.8
    assert not -3.0 < slope(load_dataset("digits32", "test").images) < -1.8
    monkeypatch.setenv("CARDDECK_CACHE", str(tmp_path))
    fresh, labels = leaves._render_all(3, leaves.SEED)
    cached, _ = leaves.generate()
    per = leaves.PER_CLASS
    for c in range(10):
        np.testing.assert_array_equal(fresh[3 * c : 3 * c + 3], cached[per * c : per * c + 3])
    assert list(labels) == [c for c in range(10) for _ in range(3)]


def test_leaves32_objects_carry_their_class_hue_and_clutter_is_muted():
    """The class objects are the only saturated leaves, in their class's hue family: the saturated
    pixels of an image name its hue family (the first version's clutter of every hue did not)."""
    from matplotlib.colors import rgb_to_hsv

    from carddeck.data import leaves

    test = load_dataset("leaves32", "test")
    hsv = rgb_to_hsv(test.images.astype(np.float32) / 255.0)
    centres = np.array(list(leaves.HUES.values()))
    right = []
    for image, label in zip(hsv, test.labels, strict=True):
        vivid = image[(image[..., 1] > 0.5) & (image[..., 2] > 0.3)]
        assert len(vivid) > 10  # every image shows its objects
        angle = np.angle(np.exp(2j * np.pi * vivid[:, 0]).mean()) / (2 * np.pi) % 1.0
        family = np.argmin(np.abs((angle - centres + 0.5) % 1.0 - 0.5))
        right.append(family == label // len(leaves.OBJECT_SHAPES))
    assert np.mean(right) > 0.95


def test_a_mistyped_data_name_is_the_error_not_a_warning_about_other_data(capsys):
    """--data digit32 for a digits32 card: before, a WARNING that the figures would describe digit32 came first,
    then the unknown-dataset error. Mutant: the name checked only when loading (as before)."""
    from carddeck.data.datasets import data_for_cards

    with pytest.raises(InvalidInput, match="unknown dataset 'digit32'; valid choices: cifar10, cifar100, digits32"):
        data_for_cards("digit32", ["digits32"], "card x/1")
    assert "WARNING" not in capsys.readouterr().err
    assert data_for_cards("leaves32", ["digits32"], "card x/1") == "leaves32"  # a real other dataset: announced
    assert "WARNING: card x/1 was trained on digits32, but --data leaves32" in capsys.readouterr().err
