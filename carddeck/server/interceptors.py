"""gRPC server interceptor: request ids, and requests/latency/in-flight metrics with the final status code.

The final code is what the client receives: the code a handler set (``context.set_code`` or
``context.abort``), ``UNKNOWN`` for an exception without one (what grpc sends), ``CANCELLED`` when
the client went away (cancel or deadline), else ``OK``. Streaming responses are finished when the
iterator ends, fails or is closed; a termination callback catches a stream abandoned mid-flight.
Unknown methods pass through uncounted (their names come from clients: unbounded cardinality).

Request ids: an incoming ``x-request-id`` metadata value is kept if it is a short safe string, else
one is generated; it is set in :data:`carddeck.observability.logs.request_id_var` while the handler runs and
returned to the client as trailing metadata ``x-request-id`` (on errors too).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from carddeck.observability.logs import REQUEST_ID_KEY, request_id_from, request_id_var

if TYPE_CHECKING:  # a type only: auth.py imports this module and must not need prometheus_client
    from carddeck.observability.metrics import Metrics

_LOG = logging.getLogger("carddeck.access")
# Access log levels: successes only at DEBUG (one line per RPC is too much at high rates); a failed
# call at INFO so a caller's request id can be found in the log; a server-side failure at WARNING.
_SERVER_SIDE = frozenset({"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNIMPLEMENTED"})


def split_method(method: str) -> tuple[str, str]:
    """``/inference.GRPCInferenceService/ModelInfer`` -> ``("inference.GRPCInferenceService", "ModelInfer")``."""
    service, _, rpc = method.lstrip("/").rpartition("/")
    return service or "unknown", rpc


def handler_kind(handler: grpc.RpcMethodHandler) -> tuple[Any, Callable[..., grpc.RpcMethodHandler]]:
    """``handler``'s behaviour and the grpc factory that builds a handler of the same streaming kind."""
    if handler.request_streaming and handler.response_streaming:
        return handler.stream_stream, grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return handler.stream_unary, grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return handler.unary_stream, grpc.unary_stream_rpc_method_handler
    return handler.unary_unary, grpc.unary_unary_rpc_method_handler


class HandlerInterceptor(grpc.ServerInterceptor):
    """Base for interceptors that replace the handler of a method the server has.

    Unknown methods (``continuation`` gives None) pass through untouched: gRPC answers UNIMPLEMENTED.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self.wrap(handler, handler_call_details)

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        raise NotImplementedError


def _code_name(code: grpc.StatusCode | None) -> str | None:
    return None if code is None else code.name


class _Call:
    """One RPC being measured; :meth:`finish` records it once, whichever path gets there first (a stream's
    end or its cancellation callback: only streams need the lock)."""

    __slots__ = ("_done", "_lock", "metrics", "request_id", "rpc", "service", "start")

    def __init__(self, metrics: Metrics | None, service: str, rpc: str, request_id: str, streaming: bool) -> None:
        self.metrics, self.service, self.rpc, self.request_id = metrics, service, rpc, request_id
        self.start = time.perf_counter()
        self._done = False
        self._lock = threading.Lock() if streaming else None
        if metrics is not None:
            metrics.rpc_started(service, rpc)

    def finish(self, code: str) -> None:
        if self._lock is None:
            if self._done:
                return
            self._done = True
        else:
            with self._lock:
                if self._done:
                    return
                self._done = True
        seconds = time.perf_counter() - self.start
        if self.metrics is not None:
            self.metrics.rpc_finished(self.service, self.rpc, code, seconds)
        level = logging.DEBUG if code == "OK" else logging.WARNING if code in _SERVER_SIDE else logging.INFO
        if not _LOG.isEnabledFor(level):  # the common case (successes at DEBUG): build no record arguments
            return
        _LOG.log(
            level, "rpc %s/%s %s in %.1f ms", self.service, self.rpc, code, seconds * 1e3,
            extra={"request_id": self.request_id, "rpc": self.rpc, "code": code, "duration_ms": seconds * 1e3},
        )  # fmt: skip


def _code_after_return(context: grpc.ServicerContext) -> str:
    set_code = _code_name(context.code())
    if set_code is not None:
        return set_code
    return "OK" if context.is_active() else "CANCELLED"


def _code_after_exception(context: grpc.ServicerContext) -> str:
    # grpc sends the code the handler set (abort sets it), else UNKNOWN; a handler that failed
    # because the client had gone away (e.g. reading a cancelled request stream) ends CANCELLED.
    set_code = _code_name(context.code())
    if set_code is not None:
        return set_code
    return "UNKNOWN" if context.is_active() else "CANCELLED"


class _Context:
    """The servicer context, with ``x-request-id`` kept in whatever trailing metadata the handler sets."""

    def __init__(self, context: grpc.ServicerContext, request_id: str) -> None:
        self._context = context
        self._pair = (REQUEST_ID_KEY, request_id)
        context.set_trailing_metadata((self._pair,))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        pairs = [p for p in trailing_metadata if p[0] != REQUEST_ID_KEY]
        self._context.set_trailing_metadata((*pairs, self._pair))

    def abort_with_status(self, status: grpc.Status) -> None:
        self.set_trailing_metadata(status.trailing_metadata or ())
        self._context.abort(status.code, status.details)


class ObservabilityInterceptor(HandlerInterceptor):
    """Counts and times every known RPC into ``metrics`` (optional) and assigns request ids."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        # method -> (the handler it wraps, the wrapper): grpc asks for a handler on every call, and building
        # one (closures and grpc's handler tuple) per call was a fifth of this interceptor's cost
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wrap(self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        known = self._wrapped.get(details.method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = self._measured(handler, details.method)
        self._wrapped[details.method] = (handler, wrapped)  # only methods the server has: a bounded table
        return wrapped

    def _measured(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        service, rpc = split_method(method)
        streaming = handler.response_streaming
        inner, factory = handler_kind(handler)
        metrics = self.metrics

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            request_id = request_id_from(context.invocation_metadata())
            call = _Call(metrics, service, rpc, request_id, streaming)
            token = request_id_var.set(request_id)
            try:
                result = inner(request, _Context(context, request_id))
            except BaseException:
                call.finish(_code_after_exception(context))
                raise
            finally:
                request_id_var.reset(token)
            if not streaming:
                call.finish(_code_after_return(context))
                return result
            context.add_callback(lambda: call.finish("CANCELLED"))  # a stream dropped before it ended
            return _stream(result, call, context)

        return factory(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _stream(responses: Iterator[Any], call: _Call, context: grpc.ServicerContext) -> Iterator[Any]:
    """Yield the handler's responses with the request id set while each is produced; finish at the end."""
    try:
        while True:
            token = request_id_var.set(call.request_id)
            try:
                response = next(responses)
            except StopIteration:
                call.finish(_code_after_return(context))
                return
            finally:
                request_id_var.reset(token)
            yield response
    except GeneratorExit:  # grpc closed the stream early: the client cancelled
        call.finish("CANCELLED")
        raise
    except BaseException:
        call.finish(_code_after_exception(context))
        raise


__all__ = ["ObservabilityInterceptor", "split_method"]
