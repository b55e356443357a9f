"""The gRPC servicer and the HTTP app over any data plane (:class:`~carddeck.serving.plane.Plane`): the Ray Serve
ingress builds its transports here, over its own data plane."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from carddeck.observability.metrics import Metrics
from carddeck.server.app import CARDDECK_SERVICE
from carddeck.server.auth import AuthInterceptor, declared_access
from carddeck.server.carddeck_servicer import CardDeckServicer
from carddeck.server.handlers import served
from carddeck.serving.access import Tokens
from carddeck.serving.plane import Plane
from carddeck.serving.settings import Settings


def carddeck_rpcs(plane: Plane, settings: Settings) -> tuple[dict[str, Callable[..., Any]], AuthInterceptor]:
    """carddeck.v1's unary RPCs over ``plane`` by name, each ``(request, context) -> response`` through the
    servicer's one wrapper (drain accounting, error mapping), and the rule per method as each handler
    declares it (admin RPCs need the admin token)."""
    servicer = CardDeckServicer(plane, settings)
    unary = [m.name for m in CARDDECK_SERVICE.methods if not (m.client_streaming or m.server_streaming)]
    rpcs = {name: served(getattr(servicer, name), streaming=False, admit=plane.request) for name in unary}
    access = declared_access(CardDeckServicer, CARDDECK_SERVICE)
    return rpcs, AuthInterceptor(Tokens.from_settings(settings), access)


def http_app(plane: Plane, settings: Settings, metrics: Metrics | None = None) -> Any:
    """The Open Inference Protocol REST routes over ``plane`` (an ASGI app), each request counted and timed
    in ``metrics`` as ``carddeck serve`` counts them."""
    from carddeck.http.server import build_app

    return build_app(settings, plane, metrics=metrics)


__all__ = ["carddeck_rpcs", "http_app"]
