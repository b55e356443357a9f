"""Register a servicer with handlers that take the raw request bytes; the one wrapper around every servicer method.

:func:`served` is where each of our RPCs gets its drain accounting (the RPCs declared ``work=True``:
counted in flight, refused once the data plane drains) and its error mapping (carddeck errors to their
status, anything else INTERNAL, logged, no internals in the message), for unary and streaming calls
alike; the Ray Serve ingress calls its RPCs through it too.

The message is parsed here as well: grpcio keeps about 16 KB for good each time a handler's
``request_deserializer`` raises (measured: RSS 152 -> 630 MB over 40,000 undecodable bodies, each answered
INTERNAL with a logged traceback and missing from the metrics; a bare grpc server does the same). So no
handler has a deserializer: a body that is not the RPC's message is bad input like any other, INVALID_ARGUMENT
naming the expected message, counted by the interceptor, logged as one warning line, and nothing is kept.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from carddeck.errors import CarddeckError, InvalidInput
from carddeck.server.status_codes import abort_with, internal_error

log = logging.getLogger(__name__)


def parser(method: MethodDescriptor) -> Callable[[bytes], Message]:
    """Bytes -> the method's request message; InvalidInput (logged as one warning line) when they are not one."""
    cls = GetMessageClass(method.input_type)
    what = method.input_type.full_name
    rpc = f"{method.containing_service.full_name}/{method.name}"

    def parse(raw: bytes) -> Message:
        try:
            return cls.FromString(raw)
        except Exception as exc:  # protobuf's DecodeError (upb may raise others for hostile input)
            log.warning("%s: request body (%d bytes) is not a valid %s: %s", rpc, len(raw), what, exc)
            raise InvalidInput(f"request body is not a valid {what}") from None

    return parse


_FACTORIES = {  # (client streaming, server streaming) -> grpc's handler factory
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}
Admit = Callable[[], AbstractContextManager[Any]]


def served(
    behavior: Callable[..., Any],
    *,
    streaming: bool,
    admit: Admit,
    read: Callable[[Any], Any] = lambda request: request,
) -> Callable[..., Any]:
    """``behavior(read(request), context)`` with drain accounting (``admit``, when the RPC declares
    ``work=True``: :func:`carddeck.server.auth.rpc`) and the one error mapping: carddeck errors end as their
    status (:func:`~carddeck.server.status_codes.abort_with`), anything else as INTERNAL. The server never
    dies of a request. A bad body (``read``) is refused before the call is admitted."""
    name = behavior.__name__
    work = getattr(behavior, "work", False)

    if streaming:

        def call_stream(request: Any, context: grpc.ServicerContext, *a: Any) -> Iterator[Any]:
            try:
                parsed = read(request)
                with admit() if work else contextlib.nullcontext():
                    yield from behavior(parsed, context, *a)
            except CarddeckError as exc:
                abort_with(context, exc)
            except Exception as exc:
                internal_error(context, name, exc)

        return functools.wraps(behavior)(call_stream)

    def call(request: Any, context: grpc.ServicerContext, *a: Any) -> Any:
        try:
            parsed = read(request)
            with admit() if work else contextlib.nullcontext():
                return behavior(parsed, context, *a)
        except CarddeckError as exc:
            abort_with(context, exc)
        except Exception as exc:
            internal_error(context, name, exc)

    return functools.wraps(behavior)(call)


def _handler(behavior: Callable[..., Any], method: MethodDescriptor, admit: Admit) -> grpc.RpcMethodHandler:
    parse = parser(method)

    def read(raw: Any) -> Any:  # a request stream is parsed as the servicer reads it
        return (parse(chunk) for chunk in raw) if method.client_streaming else parse(raw)

    handle = served(behavior, streaming=method.server_streaming, admit=admit, read=read)
    factory = _FACTORIES[(method.client_streaming, method.server_streaming)]
    return factory(handle, response_serializer=GetMessageClass(method.output_type).SerializeToString)


def add_servicer(
    server: grpc.Server, servicer: Any, service: ServiceDescriptor, admit: Admit = contextlib.nullcontext
) -> None:
    """What the generated ``add_*Servicer_to_server`` does, with raw-bytes handlers through :func:`served`;
    ``admit``: the data plane's ``request`` (drain accounting)."""
    handlers = {m.name: _handler(getattr(servicer, m.name), m, admit) for m in service.methods}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


__all__ = ["add_servicer", "parser", "served"]
