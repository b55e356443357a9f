"""The one table from carddeck.errors to HTTP statuses, and the JSON error body.

The most specific class wins (``TooLarge`` is an ``InvalidInput`` but is 413), so the table is
looked up along the MRO; anything else is a bug, answered 500 without a traceback.
"""

from __future__ import annotations

from carddeck import errors

HTTP_STATUS: dict[type[BaseException], int] = {
    errors.TooLarge: 413,
    errors.InvalidInput: 400,
    errors.CardRejected: 400,
    errors.Unauthenticated: 401,
    errors.CardNotFound: 404,
    errors.DeckConflict: 409,
    errors.NotReady: 503,  # work refused; the health routes answer their "false" with 400 (routes.not_ready)
    errors.Overloaded: 429,
    errors.Cancelled: 503,  # HTTP has no deadline to miss; only a drain cancels, and a retry elsewhere helps
}


def status_for(exc: BaseException) -> int:
    """The HTTP status of an exception: the table's entry for its nearest class, else 500."""
    for cls in type(exc).__mro__:
        status = HTTP_STATUS.get(cls)
        if status is not None:
            return status
    return 500


__all__ = ["HTTP_STATUS", "status_for"]
