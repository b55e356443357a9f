"""Bearer tokens, checked by a server interceptor before any servicer code runs.

Each RPC declares its access level beside its handler with :func:`rpc` (``@rpc(ADMIN)``); the
interceptor looks the called method up in the table :func:`declared_access` builds from those
declarations, and registering a servicer with an undeclared RPC fails (:func:`declared_access`
raises), so no RPC is served under a guessed level. The levels and the token check are
:mod:`carddeck.serving.access`'s, shared with the HTTP binding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from carddeck.server.interceptors import HandlerInterceptor, handler_kind
from carddeck.serving.access import Access, Tokens, bearer_token

ADMIN, INFERENCE, OPEN = Access.ADMIN, Access.INFERENCE, Access.OPEN
F = TypeVar("F", bound=Callable[..., Any])


def rpc(access: Access, *, work: bool = False) -> Callable[[F], F]:
    """Declare a servicer method an RPC of ``access``. ``work``: it does work (inference, card changes), so it
    is counted in flight and refused once the server drains. Both are applied, with the error mapping, by
    the one wrapper every servicer method is registered through (:func:`carddeck.server.handlers.served`)."""

    def declare(method: F) -> F:
        method.access = access  # type: ignore[attr-defined]
        method.work = work  # type: ignore[attr-defined]
        return method

    return declare


def method_name(service: ServiceDescriptor, rpc_name: str) -> str:
    return f"/{service.full_name}/{rpc_name}"


def declared_access(servicer: Any, service: ServiceDescriptor) -> dict[str, Access]:
    """``/package.Service/Method`` -> its declared access, for every RPC of ``service``; TypeError naming
    the RPCs that declare nothing (an RPC left to the generated base class declares nothing either)."""
    found: dict[str, Access] = {}
    for m in service.methods:
        access = getattr(getattr(servicer, m.name, None), "access", None)
        if isinstance(access, Access):
            found[m.name] = access
    missing = [m.name for m in service.methods if m.name not in found]
    if missing:
        raise TypeError(
            f"{service.full_name}: RPCs {', '.join(missing)} declare no access level; "
            "decorate each handler with @rpc(ADMIN), @rpc(INFERENCE) or @rpc(OPEN) (carddeck.server.auth)"
        )
    return {method_name(service, name): access for name, access in found.items()}


def open_access(service: ServiceDescriptor) -> dict[str, Access]:
    """Every RPC of a service we do not write (health, reflection): open to anyone."""
    return {method_name(service, m.name): OPEN for m in service.methods}


def _deny(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def abort(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    _, factory = handler_kind(handler)
    return factory(abort)


class AuthInterceptor(HandlerInterceptor):
    def __init__(self, tokens: Tokens, access: Mapping[str, Access]) -> None:
        self.tokens = tokens
        self.access = dict(access)
        # methods every caller may call, token or not (open ones; inference on a server without an inference
        # token): their calls skip reading the metadata
        self._free = frozenset(m for m, a in self.access.items() if tokens.refusal(a, None) is None)

    def check(self, method: str, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message to refuse it with."""
        # A method no servicer has: grpc answers UNIMPLEMENTED after this, to callers with an inference token.
        refusal = self.tokens.refusal(self.access.get(method, INFERENCE), bearer_token(metadata))
        return None if refusal is None else (grpc.StatusCode.UNAUTHENTICATED, refusal)

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        if details.method in self._free:
            return handler
        refusal = self.check(details.method, details.invocation_metadata)
        if refusal is None:
            return handler
        return _deny(handler, *refusal)


__all__ = ["ADMIN", "INFERENCE", "OPEN", "AuthInterceptor", "declared_access", "open_access", "rpc"]
