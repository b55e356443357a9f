"""Who may call what: the three access levels and the bearer-token check, the same for every transport.

Admin calls (changing the deck) need the admin token. When none is configured they are refused
outright, unless the operator opened them on purpose (``--allow-unauthenticated-admin``, which logs
a warning). Inference calls need the inference token when one is configured; the admin token is
accepted there too. Open calls (health, liveness and readiness probes) need nothing.

Each transport declares the level of each call beside its handler (:func:`carddeck.server.auth.rpc`
for gRPC, the route table of :mod:`carddeck.http.routes`) and asks :meth:`Tokens.refusal`.
"""

from __future__ import annotations

import enum
import hmac
import logging
from collections.abc import Iterable
from typing import Any

log = logging.getLogger(__name__)


class Access(enum.Enum):
    OPEN = "open"  # probes: no token
    INFERENCE = "inference"  # the inference token, when one is configured (the admin token works too)
    ADMIN = "admin"  # the admin token, always


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` pair (gRPC metadata, HTTP headers), else None."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _matches(given: str | None, expected: str) -> bool:
    return given is not None and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


class Tokens:
    """The configured tokens, and the check of one call against them."""

    def __init__(self, *, admin_token: str = "", inference_token: str = "", allow_unauthenticated_admin: bool = False):
        self.admin_token = admin_token
        self.inference_token = inference_token
        self.admin_open = allow_unauthenticated_admin and not admin_token

    def announce(self) -> None:
        """Log, once per process (both transports build their own Tokens), how admin RPCs are guarded."""
        if self.admin_open:
            log.warning(
                "admin RPCs (AddCard, RemoveCard, RepositoryModelLoad/Unload) are open to anyone who can reach "
                "this server: --allow-unauthenticated-admin is set and no admin token is configured"
            )
        elif not self.admin_token:
            log.info("admin RPCs are disabled: set CARDDECK_ADMIN_TOKEN or --admin-token-file to enable them")

    @classmethod
    def from_settings(cls, settings: Any) -> Tokens:
        """From ``carddeck serve``'s settings (:class:`carddeck.serving.settings.Settings`)."""
        return cls(
            admin_token=settings.resolved_admin_token(),
            inference_token=settings.resolved_inference_token(),
            allow_unauthenticated_admin=settings.allow_unauthenticated_admin,
        )

    def refusal(self, access: Access, token: str | None) -> str | None:
        """None when a call of ``access`` with ``token`` may proceed, else why not (the Unauthenticated message)."""
        if access is Access.OPEN:
            return None
        if access is Access.ADMIN:
            if self.admin_open:
                return None
            if not self.admin_token:
                return (
                    "admin RPCs are disabled on this server: start it with CARDDECK_ADMIN_TOKEN (or --admin-token-file)"
                    " and send 'authorization: Bearer <token>'"
                )
            if not _matches(token, self.admin_token):
                why = "no bearer token" if token is None else "wrong bearer token"
                return f"{why}: this RPC needs 'authorization: Bearer <admin token>'"
            return None
        if self.inference_token and not (_matches(token, self.inference_token) or _matches(token, self.admin_token)):
            why = "no bearer token" if token is None else "wrong bearer token"
            return f"{why}: this server needs 'authorization: Bearer <token>'"
        return None


__all__ = ["Access", "Tokens", "bearer_token"]
