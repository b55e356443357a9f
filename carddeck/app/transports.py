"""The gRPC servicer and the HTTP app over any data plane (:class:`~carddeck.serving.plane.Plane`): the Ray Serve
ingress builds its transports here, over its own data plane."""

from __future__ import annotations

from typing import Any

from carddeck.server.app import CARDDECK_SERVICE
from carddeck.server.auth import AuthInterceptor, declared_access
from carddeck.server.carddeck_servicer import CardDeckServicer
from carddeck.serving.access import Tokens
from carddeck.serving.plane import Plane
from carddeck.serving.settings import Settings


def carddeck_servicer(plane: Plane, settings: Settings) -> tuple[CardDeckServicer, AuthInterceptor]:
    """carddeck.v1's servicer over ``plane``, and the rule per method as each handler declares it (admin RPCs
    need the admin token)."""
    servicer = CardDeckServicer(plane, settings)
    access = declared_access(CardDeckServicer, CARDDECK_SERVICE)
    return servicer, AuthInterceptor(Tokens.from_settings(settings), access)


def http_app(plane: Plane, settings: Settings) -> Any:
    """The Open Inference Protocol REST routes over ``plane`` (an ASGI app)."""
    from carddeck.http.server import build_app

    return build_app(settings, plane)


__all__ = ["carddeck_servicer", "http_app"]
