"""`carddeck eval` reads the deck's shift detector as the server loads it, without the server's background refit."""

from __future__ import annotations

import threading

from carddeck.deck import Deck, init_deck
from carddeck.eval.adaptation import deck_detector


def test_a_deck_whose_detector_fits_other_cards_is_read_without_a_background_refit(tmp_path):
    """A card removed after the detector was fitted (as `deck add`/`remove` leave a deck until a server refits):
    no detector, and no refit thread left running, whose failure at interpreter exit printed a warning after the
    eval's report. Mutant: ShiftLoader with its default background refit (as before)."""
    store = init_deck(tmp_path / "deck")
    assert deck_detector(Deck.open(store.root)) is not None  # the copy's detector fits its cards
    store.remove_card(store.manifest().cards[0].name)
    assert deck_detector(Deck.open(store.root)) is None
    assert not [t for t in threading.enumerate() if t.name == "carddeck-shift-refit"]
