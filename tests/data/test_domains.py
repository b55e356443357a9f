"""Augmentation domains and AugMix ops: numpy only, seeded, in range, doing what they say."""

import subprocess
import sys

import numpy as np
import pytest

from carddeck.data import augmix_ops as ops
from carddeck.data.domains import DOMAINS, augment
from carddeck.errors import InvalidInput

# The documented values (README, domains table), not the module's constants: a changed constant must
# fail here until the documentation changes with it.
DOC_GAUSSIAN_P = 0.5  # "with probability 0.5 per image"
DOC_GAUSSIAN_MAX_SIGMA = 0.15  # "sigma ~ U(0, 0.15)"
DOC_LOWFREQ_P = 0.8  # "80% of the images go through 1-3 rounds"


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)


def test_domains_registry():
    assert set(DOMAINS.names()) == {"clean", "gaussian", "augmix", "lowfreq"}


@pytest.mark.parametrize("domain", ["clean", "gaussian", "augmix", "lowfreq"])
def test_augment_returns_unit_float_images_and_is_seeded(images, domain):
    out = augment(images, domain, np.random.default_rng(1))
    assert out.dtype == np.float32 and out.shape == images.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    again = augment(images, domain, np.random.default_rng(1))
    np.testing.assert_array_equal(out, again)


def test_clean_is_a_plain_rescale(images):
    np.testing.assert_array_equal(augment(images, "clean", np.random.default_rng(0)), images / np.float32(255))


def test_gaussian_noises_about_half_the_images_within_the_documented_sigma():
    flat = np.full((400, 16, 16, 3), 128, dtype=np.uint8)  # mid-grey: clipping never bites
    out = augment(flat, "gaussian", np.random.default_rng(0))
    std = (out - 128 / 255).reshape(len(out), -1).std(axis=1)
    noisy = std > 1e-6
    assert noisy.mean() == pytest.approx(DOC_GAUSSIAN_P, abs=0.1)
    assert DOC_GAUSSIAN_MAX_SIGMA * 0.9 < std.max() < DOC_GAUSSIAN_MAX_SIGMA * 1.1  # sigma reaches the bound
    assert std[noisy].mean() == pytest.approx(DOC_GAUSSIAN_MAX_SIGMA / 2, rel=0.15)


def test_augmix_changes_images_but_keeps_them_close(images):
    out = augment(images, "augmix", np.random.default_rng(0))
    diff = np.abs(out - images / 255.0).mean(axis=(1, 2, 3))
    assert (diff > 0).all() and diff.mean() < 0.5


def test_unknown_domain_lists_choices(images):
    with pytest.raises(InvalidInput, match="augmix, clean, gaussian"):
        augment(images, "fog", np.random.default_rng(0))
    with pytest.raises(InvalidInput, match="uint8"):
        augment(images.astype(np.float32), "clean", np.random.default_rng(0))


def test_domains_do_not_import_torch():
    code = "import sys, numpy as np, carddeck.data.domains as d\n"
    code += "d.augment(np.zeros((2, 8, 8, 3), np.uint8), 'augmix', np.random.default_rng(0))\n"
    code += "assert 'torch' not in sys.modules and 'PIL' not in sys.modules\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- the AugMix ops ----------------------------------------------------------------------------------
RNG = np.random.default_rng(0)


def test_posterize_keeps_the_top_bits():
    img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    out = ops.posterize(img, 10.0, RNG)  # level 10: 4 - 4 = 0 bits kept
    assert out.max() == 0
    out = ops.posterize(img, 3.0, RNG)  # 4 - 1 = 3 bits kept
    assert set(np.unique(out)) == {i << 5 for i in range(8)}


def test_solarize_inverts_above_threshold():
    img = np.array([[[10, 200, 255]]], dtype=np.uint8)
    out = ops.solarize(img, 5.0, RNG)  # threshold 256 - 128 = 128
    np.testing.assert_array_equal(out, [[[10, 55, 0]]])


def test_autocontrast_stretches_each_channel():
    img = np.stack([np.full((4, 4), 7), np.linspace(50, 100, 16).reshape(4, 4), np.full((4, 4), 9)], -1)
    out = ops.autocontrast(img.astype(np.uint8), 1.0, RNG)
    assert out[..., 1].min() == 0 and out[..., 1].max() == 255
    np.testing.assert_array_equal(out[..., 0], 7)  # a flat channel is left alone


def test_equalize_flattens_the_histogram():
    img = np.concatenate([np.full(700, 10), np.full(300, 20), np.full(24, 240)]).astype(np.uint8)
    img = img.reshape(32, 32, 1).repeat(3, axis=2)
    out = ops.equalize(img, 1.0, RNG)  # PIL's table: step (1024 - 24) // 255 = 3
    np.testing.assert_array_equal(np.unique(out), [0, 233, 255])
    tiny = img[:8, :8]  # fewer than 256 pixels: PIL leaves the image alone
    np.testing.assert_array_equal(ops.equalize(tiny, 1.0, RNG), tiny)


def test_translate_x_shifts_and_fills_black():
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[:, 10] = 255
    out = ops.translate_x(img, 3.0, np.random.default_rng(5))  # int(3 * 32/3 / 10) = 3 pixels
    col = int(np.argmax(out[0, :, 0]))
    assert abs(col - 10) == 3 and out[0, col, 0] == 255 and out[..., 0].sum() == 255 * 32


def test_rotate_and_shear_keep_shape_and_dtype():
    img = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    for op in (ops.rotate, ops.shear_x, ops.shear_y, ops.translate_y):
        out = op(img, 3.0, np.random.default_rng(0))
        assert out.dtype == np.uint8 and out.shape == img.shape and not np.array_equal(out, img)


def test_lowfreq_lowers_the_low_frequency_rings_of_the_signature():
    """The low-frequency domain cuts contrast and adds haze: the signature's low rings (1..4, the
    coarse structure that fog and contrast loss flatten) drop, on natural-statistics images."""
    from carddeck.data import load_dataset
    from carddeck.gating.signature import batch_signature

    images = load_dataset("leaves32", "val").images[:200]
    clean = batch_signature(images)
    low = augment(images, "lowfreq", np.random.default_rng(0))
    sig = batch_signature(np.ascontiguousarray(low.transpose(0, 3, 1, 2)))
    assert (sig[1:5] < clean[1:5] - 0.1).all(), (sig[1:5], clean[1:5])
    # and it differs from AugMix and noise there, so the gate can tell them apart
    for other in ("augmix", "gaussian"):
        aug = augment(images, other, np.random.default_rng(0))
        other_sig = batch_signature(np.ascontiguousarray(aug.transpose(0, 3, 1, 2)))
        assert (sig[1:5] < other_sig[1:5] - 0.1).all(), other


def test_lowfreq_leaves_a_fifth_clean_and_fields_are_smooth(images):
    from carddeck.data.domains import spectral_fields

    out = augment(np.repeat(images, 25, axis=0), "lowfreq", np.random.default_rng(0))
    unchanged = (out == np.repeat(images, 25, axis=0) / np.float32(255)).all(axis=(1, 2, 3))
    assert unchanged.mean() == pytest.approx(1 - DOC_LOWFREQ_P, abs=0.06)
    fields = spectral_fields(64, 32, 32, np.random.default_rng(0))
    assert fields.min() == 0.0 and fields.max() == pytest.approx(1.0)
    # smooth: neighbouring pixels differ far less than the field's range
    assert np.abs(np.diff(fields, axis=2)).mean() < 0.05
