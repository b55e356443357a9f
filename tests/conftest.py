"""Fixtures shared by the test packages: real decks and real server processes (:mod:`tests.servers`)."""

from tests.servers import deck_path, server

__all__ = ["deck_path", "server"]
