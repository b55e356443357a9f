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
