"""The 19 CIFAR-10-C corruptions: contract, determinism, strength and parameter statistics."""

import itertools

import numpy as np
import pytest
from scipy import ndimage

from carddeck.data import load_dataset
from carddeck.data.corruptions import BENCHMARK_CORRUPTIONS, CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES, corrupt
from carddeck.data.corruptions._common import clipped_zoom
from carddeck.data.corruptions.blur import glass_swap_codes, glass_swap_index
from carddeck.errors import InvalidInput

ALL = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
    "spatter",
}
# Where CIFAR-10-C's own parameters make pixel distance non-monotone in severity; each is checked
# below with what does grow.
NOT_MONOTONE = {"glass_blur", "elastic_transform", "frost", "spatter"}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits32", "test").images[:200]


def _noise_images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def _distance(a, b):
    return float(np.abs(a.astype(np.float64) - b).mean())


def test_registry_holds_the_15_benchmark_and_4_extra_corruptions():
    assert len(BENCHMARK_CORRUPTIONS) == 15 and len(EXTRA_CORRUPTIONS) == 4
    assert not set(BENCHMARK_CORRUPTIONS) & set(EXTRA_CORRUPTIONS)
    assert sorted(CORRUPTIONS.names()) == sorted(ALL)
    assert BENCHMARK_CORRUPTIONS[:3] == ("gaussian_noise", "shot_noise", "impulse_noise")


@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_every_corruption_keeps_shape_and_dtype_and_changes_the_image(size):
    images = _noise_images(3, *size)
    smooth = ndimage.uniform_filter(images, size=(1, 5, 5, 1))  # a smooth image, so blurs show too
    for name in ALL:
        for severity in SEVERITIES:
            out = corrupt(smooth, name, severity, seed=1)
            assert out.shape == smooth.shape and out.dtype == np.uint8, (name, severity)
        assert _distance(corrupt(smooth, name, 5), smooth) > 0.5, name
    assert not np.shares_memory(corrupt(images, "contrast", 1), images)


def test_empty_batch_is_returned_empty():
    empty = np.zeros((0, 32, 32, 3), np.uint8)
    assert corrupt(empty, "fog", 3).shape == (0, 32, 32, 3)


def test_same_seed_same_output_and_random_corruptions_depend_on_the_seed():
    images = ndimage.uniform_filter(_noise_images(4, 32, 32), size=(1, 3, 3, 1))
    for name in ALL:
        a, b, c = corrupt(images, name, 3, seed=7), corrupt(images, name, 3, seed=7), corrupt(images, name, 3, seed=8)
        assert np.array_equal(a, b), name
        assert (not np.array_equal(a, c)) if name in RANDOM else np.array_equal(a, c), name


def test_output_does_not_depend_on_what_ran_before():
    images = _noise_images(4, 32, 32)
    first = corrupt(images, "snow", 4, seed=3)
    for name in ALL:
        corrupt(images, name, 2, seed=3)
    np.random.seed(123)  # the global numpy stream is never used either
    assert np.array_equal(corrupt(images, "snow", 4, seed=3), first)


@pytest.mark.parametrize("name", [n for n in ALL if n not in NOT_MONOTONE])
def test_strength_grows_with_severity_on_digits(digits, name):
    dist = [_distance(corrupt(digits, name, s), digits) for s in SEVERITIES]
    assert dist[-1] > 0, name
    assert all(b >= a for a, b in itertools.pairwise(dist)), (name, dist)
    if name != "saturate":  # grey digits have no saturation to scale until severity 4 adds some
        assert dist[-1] > dist[0], (name, dist)


def test_frost_grows_on_the_background_and_decorrelates(digits):
    # The image weight drops (1 -> 0.75) as the frost weight grows, which cancels on bright strokes;
    # on the black background only the frost weight acts, and correlation with the clean image falls.
    background = digits == 0
    outs = [corrupt(digits, "frost", s).astype(np.float64) for s in SEVERITIES]
    on_bg = [float(o[background].mean()) for o in outs]
    decor = [1 - np.corrcoef(o.ravel(), digits.ravel())[0, 1] for o in outs]
    assert all(b >= a for a, b in itertools.pairwise(on_bg)), on_bg
    assert all(b > a for a, b in itertools.pairwise(decor)), decor


def test_spatter_grows_within_water_and_within_mud(digits):
    dist = [_distance(corrupt(digits, "spatter", s), digits) for s in SEVERITIES]
    assert dist[0] < dist[1] < dist[2] and dist[3] < dist[4], dist


def test_glass_blur_moves_more_with_more_swap_passes(digits):
    # Severities (sigma, passes): 2 = (0.25, 1), 4 = (0.25, 2); 3 = (0.4, 1), 5 = (0.4, 2). A larger
    # sigma blurs the swapped pixels back towards the clean image, so only equal sigmas compare.
    dist = {s: _distance(corrupt(digits, "glass_blur", s), digits) for s in SEVERITIES}
    assert dist[4] > 1.2 * dist[2] and dist[5] > 1.2 * dist[3], dist


def test_elastic_transform_moves_pixels_without_changing_brightness(digits):
    for s in SEVERITIES:
        out = corrupt(digits, "elastic_transform", s)
        assert _distance(out, digits) > 5, s
        assert abs(float(out.mean()) - float(digits.mean())) < 3, s


def test_glass_swaps_equal_the_sequential_per_pixel_loop():
    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (13, 9), (8, 8)]:
        x = rng.random((5, h, w, 2))
        code = glass_swap_codes(5, h, w, rng)
        expected = x.copy()
        for k in range(5):  # make_cifar_c's loop: rows then columns, bottom-right first
            for r in range(h - 1, 1, -1):
                for c in range(w - 1, 1, -1):
                    dy, dx = -((code[k, r, c] >> 1) & 1), -(code[k, r, c] & 1)
                    a = expected[k, r, c].copy()
                    expected[k, r, c] = expected[k, r + dy, c + dx]
                    expected[k, r + dy, c + dx] = a
        src = glass_swap_index(code)
        got = np.take_along_axis(x.reshape(5, h * w, 2), src[..., None], 1).reshape(x.shape)
        assert np.array_equal(got, expected), (h, w)


def _gray(value, n=8, size=64):
    return np.full((n, size, size, 3), value, np.uint8)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_noise_std_matches_sigma(severity):
    sigma = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1] * 255
    residual = corrupt(_gray(128), "gaussian_noise", severity).astype(np.float64) - 128
    assert abs(residual.std() - sigma) < 0.1 * sigma and abs(residual.mean()) < 0.5


@pytest.mark.parametrize("severity", SEVERITIES)
def test_shot_noise_variance_is_x_over_c(severity):
    c = (500, 250, 100, 75, 50)[severity - 1]
    x = 128 / 255
    out = corrupt(_gray(128), "shot_noise", severity).astype(np.float64) / 255
    assert abs(out.var() - x / c) < 0.1 * x / c and abs(out.mean() - x) < 0.01


@pytest.mark.parametrize("severity", SEVERITIES)
def test_impulse_noise_changes_the_given_fraction_to_black_or_white(severity):
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    out = corrupt(_gray(128), "impulse_noise", severity)
    changed = out != 128
    assert abs(changed.mean() - amount) < 0.1 * amount
    assert set(np.unique(out[changed])) == {0, 255}
    assert 0.4 < (out[changed] == 255).mean() < 0.6


@pytest.mark.parametrize("severity", SEVERITIES)
def test_speckle_noise_std_is_proportional_to_intensity(severity):
    c = (0.06, 0.1, 0.12, 0.16, 0.2)[severity - 1]
    for value in (64, 128):
        residual = corrupt(_gray(value), "speckle_noise", severity).astype(np.float64) - value
        assert abs(residual.std() - value * c) < 0.1 * value * c, value


def test_contrast_and_brightness_follow_their_formulas():
    images = _noise_images(2, 32, 32)
    x = images / 255.0
    mean = x.mean(axis=(1, 2), keepdims=True)
    expected = np.rint(np.clip((x - mean) * 0.4 + mean, 0, 1) * 255)
    assert np.abs(corrupt(images, "contrast", 3) - expected).max() <= 1
    grey = _gray(100, n=1, size=16)
    assert np.all(corrupt(grey, "brightness", 4) == 100 + 0.2 * 255)


def test_zoom_blur_uses_the_original_clipped_zoom():
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    for z in (1.01, 1.13, 1.25):
        ch = int(np.ceil(32 / z))
        top = (32 - ch) // 2
        ref = ndimage.zoom(x[:, top : top + ch, top : top + ch], (1, z, z, 1), order=1)
        trim = (ref.shape[1] - 32) // 2
        assert np.abs(clipped_zoom(x, z) - ref[:, trim : trim + 32, trim : trim + 32]).max() < 1e-5


def test_pixelate_and_jpeg_match_pillow():
    import io

    import PIL.Image as image_mod

    images = _noise_images(3, 32, 32)
    for severity, c in enumerate((0.95, 0.9, 0.85, 0.75, 0.65), 1):
        ref = np.stack(
            [
                np.asarray(
                    image_mod.fromarray(i).resize((int(32 * c),) * 2, image_mod.BOX).resize((32, 32), image_mod.BOX)
                )
                for i in images
            ]
        )
        assert (
            np.abs(corrupt(images, "pixelate", severity).astype(int) - ref).max() <= 1
        )  # Pillow rounds in fixed point
    buf = io.BytesIO()
    image_mod.fromarray(images[0]).save(buf, "JPEG", quality=40)
    assert np.array_equal(corrupt(images, "jpeg_compression", 5)[0], np.asarray(image_mod.open(buf).convert("RGB")))


def test_invalid_names_severities_and_images_are_rejected_with_the_valid_choices():
    images = _noise_images(1, 32, 32)
    with pytest.raises(InvalidInput, match=r"unknown corruption 'blurry'; valid choices: .*gaussian_noise.*zoom_blur"):
        corrupt(images, "blurry", 1)
    for bad in (0, 6, "3", 2.0, True):
        with pytest.raises(InvalidInput, match=r"valid severities: 1, 2, 3, 4, 5"):
            corrupt(images, "fog", bad)
    with pytest.raises(InvalidInput, match="uint8"):
        corrupt(images.astype(np.float32), "fog", 1)
    with pytest.raises(InvalidInput, match=r"\[N, H, W, 3\]"):
        corrupt(images[..., 0], "fog", 1)
    with pytest.raises(InvalidInput, match="at least 8x8"):
        corrupt(images[:, :4, :4], "fog", 1)
    with pytest.raises(InvalidInput, match="seed"):
        corrupt(images, "fog", 1, seed=-1)
