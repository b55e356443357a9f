"""The Python client of the carddeck.v1 API (:mod:`~carddeck.client.api`); the commands built on it are
``carddeck predict`` (:mod:`~carddeck.commands.predict`) and ``carddeck deck`` (:mod:`~carddeck.commands.deck`)."""

from carddeck.client.api import CardDeckClient, Result, StreamAnswer

__all__ = ["CardDeckClient", "Result", "StreamAnswer"]
