"""The one table per transport: a lost race is retryable (ABORTED / 409), other conflicts are not."""

import grpc
import pytest

from carddeck import errors
from carddeck.http.errors import status_for as http_status
from carddeck.server.status_codes import status_for as grpc_status


@pytest.mark.parametrize(
    ("exc", "code", "http"),
    [
        (errors.ConcurrentChange("another writer committed first"), grpc.StatusCode.ABORTED, 409),
        (
            errors.DeckConflict("card g1/1 is already in the deck with other bytes"),
            grpc.StatusCode.FAILED_PRECONDITION,
            409,
        ),
        (errors.ReadOnlyDeck("the deck is read-only"), grpc.StatusCode.FAILED_PRECONDITION, 409),
        (RuntimeError("a bug"), grpc.StatusCode.INTERNAL, 500),
    ],
)
def test_each_error_class_has_its_status(exc, code, http):
    assert grpc_status(exc) == code
    assert http_status(exc) == http
