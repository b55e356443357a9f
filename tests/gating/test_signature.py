import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from carddeck.data.datasets import load_dataset
from carddeck.errors import InvalidInput
from carddeck.gating import SIGNATURE_DIM, batch_signature, pairwise_distances, sample_signatures


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_dataset("digits32", "test").images[:128]


def noisy(images: np.ndarray, sigma: float = 0.08, seed: int = 0) -> np.ndarray:
    x = images / 255.0 + np.random.default_rng(seed).normal(0, sigma, images.shape)
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def blurred(images: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    return gaussian_filter(images.astype(np.float32), sigma=(0, sigma, sigma, 0)).round().astype(np.uint8)


def test_shape_and_size_independence(digits):
    assert sample_signatures(digits[:5]).shape == (5, SIGNATURE_DIM)
    big = np.repeat(np.repeat(digits[:8], 2, axis=1), 2, axis=2)  # 64x64
    wide = np.zeros((3, 40, 56, 3), np.uint8)
    assert batch_signature(big).shape == batch_signature(wide).shape == (SIGNATURE_DIM,)


def test_batch_signature_is_the_mean_of_sample_signatures(digits):
    np.testing.assert_allclose(batch_signature(digits), sample_signatures(digits).mean(axis=0), rtol=1e-5)


def test_uint8_nhwc_and_float32_nchw_agree(digits):
    as_float = np.ascontiguousarray(digits.transpose(0, 3, 1, 2)).astype(np.float32) / 255.0
    np.testing.assert_allclose(batch_signature(digits), batch_signature(as_float), atol=1e-4)


def test_signatures_separate_noise_from_blur(digits):
    a, b = digits[:64], digits[64:]
    noise_a, noise_b = batch_signature(noisy(a, seed=1)), batch_signature(noisy(b, seed=2))
    blur_a, blur_b = batch_signature(blurred(a)), batch_signature(blurred(b))
    clean = batch_signature(a)
    for metric in ("l2", "l1", "cosine"):
        d = pairwise_distances(np.stack([noise_a, blur_a]), np.stack([noise_b, blur_b]), metric)
        # the same corruption on different images is much closer than noise vs blur on the same ones
        assert d[0, 0] * 5 < d[0, 1] and d[1, 1] * 5 < d[1, 0], (metric, d)
    high = slice(SIGNATURE_DIM // 2, None)
    assert (noise_a[high] > clean[high]).all()  # noise lifts the high frequencies
    assert blur_a[high].mean() < clean[high].mean() - 0.1  # blur removes them (down to uint8 rounding noise)


def test_per_sample_signatures_separate_too(digits):
    sig = sample_signatures(np.concatenate([noisy(digits[:32]), blurred(digits[:32])]))
    refs = np.stack([sig[:16].mean(0), sig[32:48].mean(0)])
    nearest = pairwise_distances(sig, refs).argmin(axis=1)
    assert (nearest[16:32] == 0).mean() > 0.9 and (nearest[48:] == 1).mean() > 0.9


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((0, 32, 32, 3), np.uint8),
        np.zeros((2, 32, 32), np.uint8),
        np.zeros((2, 32, 32, 3), np.float64),
        np.zeros((2, 32, 32, 3), np.float32),  # float32 must be NCHW
        np.zeros((2, 4, 4, 3), np.uint8),
        [[1, 2, 3]],
    ],
)
def test_bad_input_is_rejected(bad):
    with pytest.raises(InvalidInput):
        sample_signatures(bad)
