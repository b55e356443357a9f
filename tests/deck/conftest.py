import numpy as np
import pytest

from carddeck.deck import DeckStore
from carddeck.gating import SIGNATURE_DIM
from tests.cards import tiny_card_bytes, tiny_meta

# Synthetic references: a domain of noisy images (high rings lifted) and one of smooth images.
NOISE_SIG = tuple(float(v) for v in np.r_[0.3, np.linspace(-2.0, -2.5, SIGNATURE_DIM - 1)])
SMOOTH_SIG = tuple(float(v) for v in np.r_[0.3, np.linspace(-1.5, -7.0, SIGNATURE_DIM - 1)])


def card(name: str, domain: str, *, version: int = 1, seed: int = 0, **kw) -> bytes:
    sig = kw.pop("signature", NOISE_SIG if domain == "gaussian" else SMOOTH_SIG)
    return tiny_card_bytes(tiny_meta(name, version=version, domain=domain, signature=sig, **kw), seed=seed)


@pytest.fixture
def store(tmp_path) -> DeckStore:
    s = DeckStore.create(tmp_path / "deck")
    s.add_card(card("g1", "gaussian", seed=1))
    s.add_card(card("a1", "augmix", seed=2))
    return s


@pytest.fixture
def images() -> np.ndarray:
    """Smooth blobs: routed to the smooth (augmix) references."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    out = []
    for _ in range(6):
        cy, cx = rng.uniform(8, 24, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40.0)
        out.append(np.repeat((blob * 255).astype(np.uint8)[..., None], 3, axis=-1))
    return np.stack(out)


def add_noise(images: np.ndarray, seed: int = 0) -> np.ndarray:
    x = images / 255.0 + np.random.default_rng(seed).normal(0, 0.15, images.shape)
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)
