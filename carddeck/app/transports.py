"""The gRPC servicer and the HTTP app over a data plane that is not a :class:`Dataplane` (Ray's ingress)."""

from __future__ import annotations

from typing import Any, cast

from carddeck.server.app import CARDDECK_SERVICE
from carddeck.server.auth import AuthInterceptor, declared_access
from carddeck.server.carddeck_servicer import CardDeckServicer
from carddeck.serving.access import Tokens
from carddeck.serving.dataplane import Dataplane
from carddeck.serving.settings import Settings


def carddeck_servicer(plane: Any, settings: Settings) -> tuple[CardDeckServicer, AuthInterceptor]:
    """carddeck.v1's servicer over ``plane``, and the rule per method as each handler declares it (admin RPCs
    need the admin token)."""
    servicer = CardDeckServicer(cast(Dataplane, plane), settings)  # duck-typed: the servicer's surface
    access = declared_access(CardDeckServicer, CARDDECK_SERVICE)
    return servicer, AuthInterceptor(Tokens.from_settings(settings), access)


def http_app(plane: Any, settings: Settings) -> Any:
    """The Open Inference Protocol REST routes over ``plane`` (an ASGI app)."""
    from carddeck.http.server import build_app

    return build_app(settings, cast(Dataplane, plane))  # duck-typed: the routes' surface


__all__ = ["carddeck_servicer", "http_app"]
