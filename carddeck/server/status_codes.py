"""The one table from carddeck.errors to gRPC status codes.

Domain code raises :mod:`carddeck.errors`; servicers never abort themselves: the one wrapper around every
servicer method (:func:`carddeck.server.handlers.served`) aborts with :func:`status_for`'s code and the
exception's message (:func:`abort_with`), or INTERNAL for anything else (:func:`internal_error`).
The most specific class wins (``TooLarge`` is an ``InvalidInput`` but maps to RESOURCE_EXHAUSTED), so
the table is looked up along the MRO.
"""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc

from carddeck import errors

log = logging.getLogger(__name__)

MAX_DETAILS_BYTES = 2000
ERROR_KEY = "carddeck-error"  # trailing metadata: the carddeck.errors class (carddeck.client.results reads it)
STATUS_CODES: dict[type[BaseException], grpc.StatusCode] = {
    errors.TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.CardNotFound: grpc.StatusCode.NOT_FOUND,
    errors.CardRejected: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ConcurrentChange: grpc.StatusCode.ABORTED,  # a lost race: retry on the new deck
    errors.DeckConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code of an exception: the table's entry for its nearest class, else INTERNAL."""
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def details(exc: BaseException) -> str:
    """The status message: ``str(exc)``, cut to :data:`MAX_DETAILS_BYTES` of UTF-8 so that, percent-encoded
    (up to 3 bytes per byte), it always fits gRPC's 8 KiB header limit. Echoed values are capped where
    they are written (:func:`carddeck.errors.shown`); this is the net under every other message."""
    text = str(exc)
    raw = text.encode()
    return text if len(raw) <= MAX_DETAILS_BYTES else raw[: MAX_DETAILS_BYTES - 3].decode(errors="ignore") + "..."


def abort_with(context: grpc.ServicerContext, exc: errors.CarddeckError) -> NoReturn:
    """End the call with ``exc``'s status and message (DEADLINE_EXCEEDED for a Cancelled past its deadline)."""
    code = status_for(exc)
    remaining = context.time_remaining()
    if isinstance(exc, errors.Cancelled) and remaining is not None and remaining <= 0:
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    context.set_trailing_metadata(((ERROR_KEY, type(exc).__name__),))  # the client raises the same class
    context.abort(code, details(exc))
    raise AssertionError("context.abort returned")  # it raises; this tells type checkers so


def internal_error(context: grpc.ServicerContext, name: str, exc: BaseException) -> NoReturn:
    """End the call INTERNAL for an exception that is not a carddeck error: a bug, logged with its traceback;
    the client learns only its class (servicers never call ``context.abort`` themselves)."""
    log.error("internal error in %s", name, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}: {type(exc).__name__}")
    raise AssertionError("context.abort returned")


__all__ = ["STATUS_CODES", "abort_with", "internal_error", "status_for"]
