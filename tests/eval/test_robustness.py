import json

import numpy as np
import pytest

from carddeck.commands.eval import verdict
from carddeck.deck import Deck, DeckStore
from carddeck.eval.report import markdown, write_report
from carddeck.eval.robustness import CLEAN, ConditionRun, evaluate, fit_router_on, run_condition
from carddeck.gating import sample_signatures
from tests.deck.conftest import NOISE_SIG, SMOOTH_SIG, add_noise, card

C = 10


@pytest.fixture
def deck(tmp_path) -> Deck:
    store = DeckStore.create(tmp_path / "deck")
    store.add_card(card("g1", "gaussian", seed=1))
    store.add_card(card("a1", "augmix", seed=2))
    return Deck.open(store.root)


def smooth_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    c = rng.uniform(8, 24, (n, 2))
    blobs = np.exp(-((yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2) / 40.0)
    return np.repeat((blobs * 255).astype(np.uint8)[..., None], 3, axis=-1)


def planted_run(condition, images, right: int) -> ConditionRun:
    """A condition where card ``right`` is always correct and the other always wrong."""
    labels = np.arange(len(images)) % C
    probs = np.full((2, len(images), C), 0.01, np.float32)
    probs[right, np.arange(len(images)), labels] = 0.91
    probs[1 - right, np.arange(len(images)), (labels + 1) % C] = 0.91
    return ConditionRun(condition, labels, probs, sample_signatures(images))


def test_run_condition_matches_the_cards(deck):
    images = smooth_images(10, 0)
    run = run_condition(deck, ("blob", 1), images, np.zeros(10, np.int64))
    assert run.probabilities.shape == (2, 10, C) and run.signatures.shape[0] == 10
    np.testing.assert_allclose(run.probabilities[1], deck.run_card("a1", images), rtol=1e-6)


def test_policies_are_scored_on_what_they_route(deck):
    smooth = smooth_images(40, 1)
    runs = [
        planted_run(CLEAN, smooth, right=1),
        planted_run(("noise", 1), add_noise(smooth), right=0),  # noise: the gaussian card is right
        planted_run(("blur", 1), smooth, right=1),
    ]
    result = evaluate(deck, runs, router=None, batch_size=16)
    assert result.accuracy["card:g1"] == {CLEAN: 0.0, ("noise", 1): 1.0, ("blur", 1): 0.0}
    assert result.accuracy["oracle"] == {CLEAN: 1.0, ("noise", 1): 1.0, ("blur", 1): 1.0}
    assert result.mean_corrupted("nearest-domain") == 1.0 and result.cards_per_image["nearest-domain"] == 1.0
    assert result.cards_per_image["uniform"] == 2.0 and result.cards_per_image["card:a1"] == 1.0
    assert "calibrated" not in result.methods  # no router, no calibrated row
    assert "nearest-domain/per-sample" in result.methods
    assert "nearest-domain" in verdict(result)


def test_calibrated_router_fitted_on_validation_runs(deck):
    val = [planted_run(("noise", 1), add_noise(smooth_images(32, 2), 5), 0)]
    val.append(planted_run(("blur", 1), smooth_images(32, 3), 1))
    router = fit_router_on(deck, val, batch_size=16, max_cards=1)
    test = [planted_run(("noise", 1), add_noise(smooth_images(32, 4), 6), 0)]
    test.append(planted_run(("blur", 1), smooth_images(32, 5), 1))
    result = evaluate(deck, test, router=router, batch_size=16)
    assert result.mean_corrupted("calibrated") == 1.0 and result.cards_per_image["calibrated"] == 1.0


def test_reports(deck, tmp_path):
    runs = [planted_run(CLEAN, smooth_images(8, 0), 1), planted_run(("fog", 2), smooth_images(8, 1), 1)]
    result = evaluate(deck, runs, router=None, batch_size=8)
    table = markdown(result)
    assert "| nearest-domain | 100.0 | 100.0 | 1.00 | 100.0 |" in table
    paths = write_report(result, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["methods"]["uniform"]["cards_per_image"] == 2.0
    assert data["methods"]["oracle"]["per_condition"]["fog/2"] == 1.0
    assert paths["png"].stat().st_size > 1000


def test_synthetic_signatures_are_what_the_gate_uses(deck):
    assert deck.gate.domains == ("gaussian", "augmix")
    np.testing.assert_allclose(deck.gate.references, [NOISE_SIG, SMOOTH_SIG], rtol=1e-6)


def test_set_oracle_is_at_least_the_single_card_oracle_on_every_condition(tmp_path):
    """Four cards, each right on a different half of the images: no single card beats 50%, but
    cards 0+1 together are right on every image of the first condition (2 = half the deck)."""
    store = DeckStore.create(tmp_path / "deck4")
    for i, domain in enumerate(("gaussian", "augmix", "gaussian", "augmix")):
        store.add_card(card(f"c{i}", domain, seed=i))
    deck = Deck.open(store.root)
    images = smooth_images(40, 7)
    labels = np.arange(40) % C
    runs = []
    for condition, (a, b) in ((CLEAN, (0, 1)), (("fog", 1), (2, 3)), (("noise", 1), (1, 2))):
        probs = np.full((4, 40, C), 0.02, np.float32)
        wrong = (labels + 1) % C
        for k in range(4):
            right_rows = np.arange(40) < 20 if k == a else np.arange(40) >= 20 if k == b else np.zeros(40, bool)
            probs[k, np.arange(40), labels] = np.where(right_rows, 0.7, 0.02)  # right: confident
            probs[k, np.arange(40), wrong] = np.where(right_rows, 0.02, 0.5)  # wrong: less so
        runs.append(ConditionRun(condition, labels, probs, sample_signatures(images)))
    result = evaluate(deck, runs, router=None, batch_size=8, per_sample=False)
    for condition in result.conditions:
        assert result.accuracy["set-oracle"][condition] >= result.accuracy["oracle"][condition]
        assert result.accuracy["oracle"][condition] == 0.5
        assert result.accuracy["set-oracle"][condition] == 1.0
    assert result.cards_per_image["set-oracle"] == 2.0
