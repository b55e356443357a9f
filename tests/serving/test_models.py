"""Model names resolve in one place, on one snapshot, and a request keeps that snapshot to its end."""

import numpy as np
import pytest

from carddeck.deck import Deck
from carddeck.errors import CardNotFound, InvalidInput
from carddeck.serving.dataplane import Dataplane, DataplaneConfig
from carddeck.serving.models import resolve
from tests.servers import card, smooth_images


def test_the_deck_and_each_card_resolve_by_name_and_version(deck_path):
    deck = Deck.open(deck_path)
    whole = resolve(deck, "carddeck", "carddeck")
    assert whole.card is None and whole.version == str(deck.version) and whole.deck is deck
    a1 = resolve(deck, "carddeck", "a1", "1")
    assert a1.card is deck.card("a1") and a1.version == "1" and a1.input == deck.input
    with pytest.raises(CardNotFound, match=r"no model 'zz'; models: carddeck, g1, a1"):
        resolve(deck, "carddeck", "zz")
    with pytest.raises(CardNotFound, match=r"model 'a1' is served at version 1, not '7'"):
        resolve(deck, "carddeck", "a1", "7")
    with pytest.raises(CardNotFound, match=rf"model 'carddeck' has version {deck.version}, not '0'"):
        resolve(deck, "carddeck", "carddeck", "0")
    with pytest.raises(InvalidInput, match=r"name: empty; models: carddeck, g1, a1"):
        resolve(deck, "carddeck", "")


def test_a_card_not_in_the_deck_is_named_with_the_cards_there_are(deck_path):
    deck = Deck.open(deck_path)
    for lookup in (lambda: deck.card("zz"), lambda: deck.run_card("zz", smooth_images(1))):
        with pytest.raises(CardNotFound, match=r"no card 'zz' in the deck \(cards: g1, a1\)"):
            lookup()
    with pytest.raises(CardNotFound, match=r"no card 'a1/9' in the deck \(cards: g1/1, a1/1\)"):
        deck.card("a1", 9)
    assert deck.card("a1", 1) == deck.card("a1")  # a stored version, read from the store


def test_a_request_finishes_on_the_snapshot_it_resolved_its_model_on(deck_path):
    dp = Dataplane(DataplaneConfig(deck_path=deck_path, poll_interval_s=0))
    dp.start()
    try:
        model = dp.resolve()  # the request reads the snapshot here ...
        before = model.deck
        dp.add_card(card("g2", "gaussian", seed=7))  # ... a swap lands before it runs ...
        assert dp.deck is not before and "g2" in dp.deck.card_names
        prediction, deck = dp.predict(smooth_images(3), model=model, policy="uniform")
        assert deck is before  # ... and it runs on the snapshot it read, not the new one
        assert prediction.routing.card_names == before.card_names
        np.testing.assert_allclose(
            prediction.probabilities, before.predict(smooth_images(3), policy="uniform").probabilities, atol=1e-6
        )
        card_model = resolve(before, "carddeck", "a1")
        np.testing.assert_allclose(
            dp.run_card(card_model, smooth_images(2)), before.run_card("a1", smooth_images(2)), atol=1e-6
        )
    finally:
        dp.close()
