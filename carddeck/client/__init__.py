"""The Python client of the carddeck.v1 API (:mod:`~carddeck.client.api`) and the commands built on it:
``carddeck predict`` (:mod:`~carddeck.client.predict`) and ``carddeck deck`` (:mod:`~carddeck.client.deck`)."""

from carddeck.client.api import CardDeckClient, Result, StreamAnswer

__all__ = ["CardDeckClient", "Result", "StreamAnswer"]
