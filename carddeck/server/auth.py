"""Bearer tokens, checked by a server interceptor before any servicer code runs.

Admin RPCs (changing the deck) need the admin token. When none is configured they are refused
outright, unless the operator opened them on purpose (``--allow-unauthenticated-admin``, which logs
a warning). Inference RPCs need the inference token when one is configured; the admin token is
accepted there too. Health checks, reflection and liveness/readiness probes are always open.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import grpc

from carddeck.server.interceptors import HandlerInterceptor, handler_kind

log = logging.getLogger(__name__)

ADMIN_METHODS = frozenset(
    {
        "/carddeck.v1.CardDeck/AddCard",
        "/carddeck.v1.CardDeck/RemoveCard",
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
    }
)
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
OPEN_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady"})


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _matches(given: str | None, expected: str) -> bool:
    return given is not None and bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def abort(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    _, factory = handler_kind(handler)
    return factory(abort)


class AuthInterceptor(HandlerInterceptor):
    def __init__(self, *, admin_token: str = "", inference_token: str = "", allow_unauthenticated_admin: bool = False):
        self.admin_token = admin_token
        self.inference_token = inference_token
        self.admin_open = allow_unauthenticated_admin and not admin_token
        if self.admin_open:
            log.warning(
                "admin RPCs (AddCard, RemoveCard, RepositoryModelLoad/Unload) are open to anyone who can reach "
                "this server: --allow-unauthenticated-admin is set and no admin token is configured"
            )
        elif not admin_token:
            log.info("admin RPCs are disabled: set CARDDECK_ADMIN_TOKEN or --admin-token-file to enable them")

    def check(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message to refuse it with."""
        if method.startswith(OPEN_PREFIXES) or method in OPEN_METHODS:
            return None
        token = bearer_token(metadata)
        if method in ADMIN_METHODS:
            if self.admin_open:
                return None
            if not self.admin_token:
                return (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "admin RPCs are disabled on this server: start it with CARDDECK_ADMIN_TOKEN (or --admin-token-file)"
                    " and send 'authorization: Bearer <token>'",
                )
            if not _matches(token, self.admin_token):
                why = "no bearer token" if token is None else "wrong bearer token"
                return grpc.StatusCode.UNAUTHENTICATED, f"{why}: this RPC needs 'authorization: Bearer <admin token>'"
            return None
        if self.inference_token and not (_matches(token, self.inference_token) or _matches(token, self.admin_token)):
            why = "no bearer token" if token is None else "wrong bearer token"
            return grpc.StatusCode.UNAUTHENTICATED, f"{why}: this server needs 'authorization: Bearer <token>'"
        return None

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        refusal = self.check(details.method, details.invocation_metadata)
        if refusal is None:
            return handler
        return _deny(handler, *refusal)


__all__ = ["ADMIN_METHODS", "AuthInterceptor", "bearer_token"]
