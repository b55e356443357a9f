"""The Python client of the carddeck.v1 API (:mod:`~carddeck.client.api`); the commands built on it are
``carddeck predict`` (:mod:`~carddeck.commands.predict`) and ``carddeck deck`` (:mod:`~carddeck.commands.deck`).
Every failed call raises its :mod:`carddeck.errors` class mixed with :class:`RemoteError` (status and details),
so callers need not import grpc."""

from carddeck.client.api import CardDeckClient, Result, StreamAnswer
from carddeck.client.results import RemoteError

__all__ = ["CardDeckClient", "RemoteError", "Result", "StreamAnswer"]
