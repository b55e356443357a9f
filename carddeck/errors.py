"""One error hierarchy for the whole package.

Domain code raises these; only the transports translate them, each through one table
(:mod:`carddeck.server.status_codes` to gRPC status codes, :mod:`carddeck.http.errors` to HTTP
statuses), and the CLI turns them into a one-line message and exit status 2.
"""

from __future__ import annotations

from collections.abc import Iterable

ECHO_LIMIT = 80


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters with an ellipsis.

    Messages echo what the caller sent; a 17,000-character name must not push the status past gRPC's
    8 KiB header limit (the caller would get RESOURCE_EXHAUSTED instead of the error).
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def install_hint(extra: str) -> str:
    """How to install an extra: pinned by constraints.txt (an unpinned torch pulls GBs of CUDA wheels)."""
    return f'pip install -c constraints.txt "carddeck[{extra}]"  (or -e ".[{extra}]" in a clone)'


class CarddeckError(Exception):
    """Base of every error CARD-Deck raises on purpose."""


class InvalidInput(CarddeckError, ValueError):
    """The caller sent something malformed: the message names the field and what is accepted."""


class TooLarge(InvalidInput):
    """Input larger than a configured limit (batch size, message size, upload size)."""


class CardNotFound(CarddeckError, KeyError):
    """No card (or card version) with that name in the deck."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "card not found"

    @classmethod
    def among(cls, wanted: str, cards: Iterable[str]) -> CardNotFound:
        """The one message for a card that is not in a deck: what was asked and what there is."""
        return cls(f"no card {shown(wanted)} in the deck (cards: {', '.join(cards) or 'none'})")


class CardRejected(CarddeckError):
    """A card file failed validation (unreadable ONNX, bad CardMeta, contract mismatch)."""


class DeckConflict(CarddeckError):
    """The change conflicts with the deck's state (duplicate card version, incompatible classes)."""


class ConcurrentChange(DeckConflict):
    """Another writer committed between this change's read and its commit; nothing of it stays. Retry it."""


class ReadOnlyDeck(DeckConflict):
    """The deck may not be changed (the packaged default deck); the message names the way out."""


class ServerError(CarddeckError):
    """A remote call failed in a way no other class names (an internal error, an unknown status)."""


class Overloaded(CarddeckError):
    """The server is at capacity (images in flight); retry later or on another replica."""


class Unauthenticated(CarddeckError):
    """Missing or wrong credentials for an RPC that requires them."""


class NotReady(CarddeckError):
    """The server or deck cannot serve right now (starting, draining, empty deck)."""


class Cancelled(CarddeckError):
    """The request was cancelled or its deadline passed before it could be served."""


__all__ = [
    "Cancelled",
    "CardNotFound",
    "CardRejected",
    "CarddeckError",
    "ConcurrentChange",
    "DeckConflict",
    "InvalidInput",
    "NotReady",
    "Overloaded",
    "ReadOnlyDeck",
    "ServerError",
    "TooLarge",
    "Unauthenticated",
    "shown",
]
