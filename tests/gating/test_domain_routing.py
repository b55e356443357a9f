"""Routing with real reference signatures: each domain's augmentation of digits32 training images."""

import numpy as np
import pytest

from carddeck.data.corruptions import corrupt
from carddeck.data.datasets import load_dataset
from carddeck.gating import Gate, domain_signature
from tests.cards import tiny_card_bytes, tiny_meta


@pytest.fixture(scope="module")
def references() -> dict[str, tuple[float, ...]]:
    train = load_dataset("digits32", "train").images[:256]
    return {d: domain_signature(d, train, seed=0) for d in ("gaussian", "augmix", "clean")}


@pytest.fixture(scope="module")
def test_images() -> np.ndarray:
    return load_dataset("digits32", "test").images[:64]


def test_domain_signature_is_seeded_and_tells_domains_apart(references):
    train = load_dataset("digits32", "train").images[:64]
    assert domain_signature("gaussian", train, seed=3) == domain_signature("gaussian", train, seed=3)
    assert domain_signature("gaussian", train, seed=3) != domain_signature("gaussian", train, seed=4)
    g, a, c = (np.array(references[d]) for d in ("gaussian", "augmix", "clean"))
    high = slice(9, None)
    assert (g[high] > c[high]).all()  # noise-augmented training images carry more high frequencies
    assert np.abs(g - a).sum() > 0.5


@pytest.mark.parametrize(
    ("corruption", "domain"),
    [
        ("gaussian_noise", "gaussian"),
        ("shot_noise", "gaussian"),
        ("impulse_noise", "gaussian"),
        ("fog", "augmix"),
        ("contrast", "augmix"),
        ("defocus_blur", "augmix"),
        ("motion_blur", "augmix"),
    ],
)
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_nearest_domain_routes_corruptions(references, test_images, corruption, domain, severity):
    names = (("g1", "gaussian"), ("a1", "augmix"), ("g2", "gaussian"), ("a2", "augmix"))
    gate = Gate.from_cards([(n, d, references[d]) for n, d in names])
    batch = corrupt(test_images, corruption, severity, seed=0)
    routing = gate.route(batch, policy="nearest-domain")
    want = ("g1", "g2") if domain == "gaussian" else ("a1", "a2")
    assert routing.selected == want, (corruption, severity, routing.distances[0])


def test_clean_batches_go_to_augmix_cards_in_a_deck(tmp_path, references, test_images):
    from carddeck.deck import Deck, DeckStore

    store = DeckStore.create(tmp_path / "deck")
    for name, domain in (("g1", "gaussian"), ("a1", "augmix")):
        store.add_card(tiny_card_bytes(tiny_meta(name, domain=domain, signature=references[domain])))
    deck = Deck.open(store.root)
    assert deck.predict(test_images).routing.selected == ("a1",)
    assert deck.predict(corrupt(test_images, "gaussian_noise", 2, seed=0)).routing.selected == ("g1",)
