"""CARD-Deck: robust image classification from a gated deck of CARDs.

The public API. Everything here imports without torch; the deck and gate names load on first use,
so ``import carddeck`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import Any

from carddeck.card import CardMeta
from carddeck.errors import (
    CarddeckError,
    CardNotFound,
    CardRejected,
    DeckConflict,
    InvalidInput,
    NotReady,
    ReadOnlyDeck,
    TooLarge,
    Unauthenticated,
)

__version__ = "0.1.0"

_LAZY = {
    "Deck": "carddeck.deck",
    "DeckStore": "carddeck.deck",
    "Prediction": "carddeck.deck",
    "read_card": "carddeck.deck",
    "Routing": "carddeck.gating",
    "POLICIES": "carddeck.gating",
    "load_dataset": "carddeck.data",
    "load_corrupted": "carddeck.data",
    "corrupt": "carddeck.data.corruptions",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'carddeck' has no attribute {name!r}")


__all__ = [
    "POLICIES",
    "CardMeta",
    "CardNotFound",
    "CardRejected",
    "CarddeckError",
    "Deck",
    "DeckConflict",
    "DeckStore",
    "InvalidInput",
    "NotReady",
    "Prediction",
    "ReadOnlyDeck",
    "Routing",
    "TooLarge",
    "Unauthenticated",
    "__version__",
    "corrupt",
    "load_corrupted",
    "load_dataset",
    "read_card",
]
