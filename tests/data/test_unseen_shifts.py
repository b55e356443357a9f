"""The shifts outside the corruption catalog (carddeck/data/corruptions/unseen.py): contract, determinism,
severity, known values, and that no fit can see them."""

import itertools

import numpy as np
import pytest
from scipy import ndimage

from carddeck.data.corruptions import CORRUPTIONS
from carddeck.data.corruptions.unseen import UNSEEN, UNSEEN_FAMILIES, family_of, unseen_conditions, unseen_shift
from carddeck.errors import InvalidInput

RANDOM = {"colour_cast", "rotate", "translate", "cutout"}  # the rest are fixed maps of the image
# where severity picks another member of the kind (a permutation, a flip, a quarter turn), not a larger change
NOT_MONOTONE = {"channel_permute", "rotate90", "flip"}


def _smooth(n=4, h=32, w=32, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    smooth = ndimage.uniform_filter(images, size=(1, 5, 5, 1)).astype(np.float64)  # blurs and warps show
    lo, hi = smooth.min(), smooth.max()
    return np.rint((smooth - lo) / (hi - lo) * 255).astype(np.uint8)  # the full range: thresholds show


def _distance(a, b):
    return float(np.abs(a.astype(np.float64) - b).mean())


def test_unseen_shifts_are_three_families_apart_from_the_catalog():
    """None is a catalog corruption (so `carddeck shift --fit` and `carddeck corrupt` cannot fit or write them);
    every family has shifts, each with 3-5 severities (kills registering them among CORRUPTIONS)."""
    assert not set(UNSEEN) & set(CORRUPTIONS)
    assert {family_of(n) for n in UNSEEN} == set(UNSEEN_FAMILIES)
    assert all(3 <= len(UNSEEN.get(n).levels) <= 5 for n in UNSEEN)
    conditions = unseen_conditions(("geometry",))
    assert ("rotate90", 3) in conditions and ("rotate90", 4) not in conditions
    assert all(family_of(n) == "geometry" for n, _ in conditions)
    with pytest.raises(InvalidInput, match="unknown unseen families"):
        unseen_conditions(("weather",))


@pytest.mark.parametrize("size", [(32, 32), (40, 48)])
def test_every_unseen_shift_keeps_shape_range_and_dtype_and_changes_the_image(size):
    images = _smooth(3, *size)
    for name, severity in unseen_conditions():
        out = unseen_shift(images, name, severity, seed=1)
        assert out.shape == images.shape and out.dtype == np.uint8, (name, severity)
        assert not np.array_equal(out, images), (name, severity)


def test_unseen_shifts_are_deterministic_per_seed_and_random_ones_differ_across_seeds():
    images = _smooth()
    for name, severity in unseen_conditions():
        a, b = unseen_shift(images, name, severity, seed=3), unseen_shift(images, name, severity, seed=3)
        assert np.array_equal(a, b), name
        if name in RANDOM and severity == 3:
            assert not np.array_equal(a, unseen_shift(images, name, severity, seed=4)), name


def test_severity_grows_the_change_where_it_has_a_size():
    images = _smooth(8)
    for name in UNSEEN:
        if name in NOT_MONOTONE:
            continue
        levels = range(1, len(UNSEEN.get(name).levels) + 1)
        d = [_distance(unseen_shift(images, name, s, seed=0), images) for s in levels]
        assert all(a < b for a, b in itertools.pairwise(d)), (name, d)


def test_known_values_on_a_tiny_image():
    x = np.zeros((1, 8, 8, 3), np.uint8)
    x[0, 0, 0] = (200, 100, 40)  # one pixel at the top left
    x[0, 1:, :, 1] = 64
    assert tuple(unseen_shift(x, "channel_permute", 2)[0, 0, 0]) == (40, 100, 200)  # R and B swapped
    assert tuple(unseen_shift(x, "invert", 3)[0, 0, 0]) == (55, 155, 215)
    assert tuple(unseen_shift(x, "invert", 1)[0, 0, 0]) == (200, 100, 215)  # blue only
    assert tuple(unseen_shift(x, "posterize", 2)[0, 0, 0]) == (192, 96, 32)  # 4 bits kept
    assert tuple(unseen_shift(x, "solarize", 2)[0, 0, 0]) == (55, 100, 40)  # 200/255 >= 0.75 inverted
    assert tuple(unseen_shift(x, "desaturate", 4)[0, 0, 0]) == (3 * (round(0.299 * 200 + 0.587 * 100 + 0.114 * 40),))
    assert tuple(unseen_shift(x, "gamma_dark", 2)[0, 0, 0]) == tuple(round(v**2 / 255) for v in (200, 100, 40))
    assert tuple(unseen_shift(x, "hue_rotate", 5)[0, 0, 0]) == (40, 140, 200)  # 180 degrees: the opposite hue
    assert tuple(unseen_shift(x, "flip", 1)[0, 0, 7]) == (200, 100, 40)
    assert tuple(unseen_shift(x, "flip", 2)[0, 7, 0]) == (200, 100, 40)
    assert np.array_equal(unseen_shift(x, "flip", 3), x.transpose(0, 2, 1, 3))
    assert np.array_equal(unseen_shift(x, "rotate90", 1), np.rot90(x, -1, axes=(1, 2)))  # clockwise
    assert np.array_equal(unseen_shift(x, "rotate90", 2), x[:, ::-1, ::-1])
    v = unseen_shift(np.full((1, 9, 9, 3), 200, np.uint8), "vignette", 5)[0, :, :, 0]
    assert v[4, 4] == 200 and v[0, 0] == 0 and v[0, 4] == 100  # corners lose all, edge midpoints half
    cut = unseen_shift(np.zeros((2, 20, 20, 3), np.uint8), "cutout", 1)
    assert [(c == 128).all(-1).sum() for c in cut] == [25, 25]  # one 5x5 grey square each
    moved = unseen_shift(np.full((1, 16, 16, 3), 255, np.uint8), "translate", 4)  # 4 px: black comes in
    assert 0 < (moved == 0).all(-1).sum() < 16 * 16 and ((moved == 0) | (moved == 255)).all()


def test_bad_requests_name_what_is_accepted():
    with pytest.raises(InvalidInput, match="unknown unseen shift 'fog'"):
        unseen_shift(_smooth(), "fog", 1)
    with pytest.raises(InvalidInput, match=r"valid severities: 1\.\.3"):
        unseen_shift(_smooth(), "flip", 4)
    with pytest.raises(InvalidInput, match="uint8"):
        unseen_shift(_smooth().astype(np.float32), "flip", 1)
    with pytest.raises(InvalidInput, match="seed"):
        unseen_shift(_smooth(), "flip", 1, seed=-1)
