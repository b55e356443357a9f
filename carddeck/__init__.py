"""CARD-Deck: robust image classification from a gated deck of CARDs.

The public API. Serving-path names import without torch.
"""

from carddeck.card import CardMeta
from carddeck.errors import (
    CarddeckError,
    CardNotFound,
    CardRejected,
    DeckConflict,
    InvalidInput,
    NotReady,
    TooLarge,
    Unauthenticated,
)

__version__ = "0.1.0"

__all__ = [
    "CardMeta",
    "CardNotFound",
    "CardRejected",
    "CarddeckError",
    "DeckConflict",
    "InvalidInput",
    "NotReady",
    "TooLarge",
    "Unauthenticated",
    "__version__",
]
