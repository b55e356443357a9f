"""What :class:`~carddeck.client.api.CardDeckClient` returns and raises: plain dataclasses, carddeck errors.

Results mirror the protobuf messages field by field (so ``listing.cards[0].name`` reads the same), but are
Python values a caller can compare, print and pickle. A failed call raises the :mod:`carddeck.errors`
class the server raised (it names it in the ``carddeck-error`` trailing metadata; else the status code
decides); the exception is a ``grpc.RpcError`` too, with ``code()`` and ``details()``, so code written
against the raw gRPC errors keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from carddeck import errors
from carddeck.card import CardMeta

ERROR_KEY = "carddeck-error"  # trailing metadata: the carddeck.errors class the server raised
BY_STATUS: dict[grpc.StatusCode, type[errors.CarddeckError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidInput,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.TooLarge,
    grpc.StatusCode.NOT_FOUND: errors.CardNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.DeckConflict,
    grpc.StatusCode.ABORTED: errors.ConcurrentChange,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.UNAVAILABLE: errors.NotReady,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.Cancelled,
}


class RemoteError(grpc.RpcError):
    """Mixed into every error the client raises: the call's status, as on a raw ``grpc.RpcError``."""

    _code: grpc.StatusCode
    _details: str
    _trailing: tuple[tuple[str, str], ...]

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


_remote: dict[type[errors.CarddeckError], type] = {}


def error_from_rpc(exc: grpc.RpcError) -> errors.CarddeckError:
    """The carddeck error a failed call stands for (ServerError for a status with no class of its own)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or str(code)
    trailing = tuple(exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else ()
    named = getattr(errors, dict(trailing).get(ERROR_KEY, ""), None)
    cls = named if isinstance(named, type) and issubclass(named, errors.CarddeckError) else BY_STATUS.get(code)
    cls = cls or errors.ServerError
    remote = _remote.get(cls) or _remote.setdefault(cls, type(cls.__name__, (cls, RemoteError), {}))
    err = remote(details)
    err._code, err._details, err._trailing = code, details, trailing
    return err


@dataclass(frozen=True)
class Card:
    name: str
    version: int
    domain: str
    architecture: str
    compression_method: str
    sparsity: float
    weight_bits: int
    signature: tuple[float, ...]
    meta_json: str  # the full CardMeta as JSON

    @property
    def meta(self) -> CardMeta:
        return CardMeta.from_json(self.meta_json)

    @classmethod
    def from_pb(cls, c: Any) -> Card:
        return cls(c.name, c.version, c.domain, c.architecture, c.compression_method, c.sparsity, c.weight_bits,
                   tuple(c.signature), c.meta_json)  # fmt: skip


@dataclass(frozen=True)
class CardListing:
    cards: list[Card]
    deck_version: int
    default_policy: str
    class_names: list[str]
    default_policy_note: str  # set when the default policy is not the configured one: why, and the way back


@dataclass(frozen=True)
class Added:
    card: Card
    deck_version: int
    already_present: bool  # the same bytes were in the deck already (a retried add): nothing changed


@dataclass(frozen=True)
class Removed:
    deck_version: int
    default_policy: str
    default_policy_note: str  # set when the removal changed the default policy: from what, and why


def listing(r: Any) -> CardListing:
    return CardListing([Card.from_pb(c) for c in r.cards], r.deck_version, r.default_policy, list(r.class_names),
                       r.default_policy_note)  # fmt: skip


__all__ = ["Added", "Card", "CardListing", "RemoteError", "Removed", "error_from_rpc", "listing"]
