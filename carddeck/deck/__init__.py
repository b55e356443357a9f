"""The deck: on-disk store of cards, ONNX Runtime sessions, and the Deck (route -> run -> combine). No torch."""

from carddeck.deck.cardfile import read_card, read_card_meta
from carddeck.deck.deck import Deck, Prediction, prepare_images
from carddeck.deck.default import default_deck_path, init_deck
from carddeck.deck.runtime import CardSession, choose_providers
from carddeck.deck.store import CardEntry, DeckStore, Manifest

__all__ = [
    "CardEntry",
    "CardSession",
    "Deck",
    "DeckStore",
    "Manifest",
    "Prediction",
    "choose_providers",
    "default_deck_path",
    "init_deck",
    "prepare_images",
    "read_card",
    "read_card_meta",
]
