"""Streaming inference RPCs: many requests over one call, answered in request order.

A reader thread takes the stream's requests as they arrive, decodes each and starts it on the data
plane without waiting (:meth:`carddeck.serving.dataplane.Dataplane.submit`), so the requests of one
stream fill micro-batches together; the RPC's own thread sends the answers in request order as
they finish. A request that fails (bad input, unknown model, a card error) is answered with its
error and the stream goes on; at most ``window`` requests are held at once, so a client that sends
faster than the deck runs waits (gRPC flow control) instead of queueing without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc

from carddeck.errors import CarddeckError
from carddeck.server.status_codes import details, status_for

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Requests one stream may hold at once: two full micro-batches of single images keep the batcher busy
# while the answers of the previous ones are sent.
STREAM_WINDOW = 128
_END = object()


def failed(exc: BaseException) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_exception(exc)
    return future


def answer_in_order(
    requests: Iterator[Req],
    context: grpc.ServicerContext,
    start: Callable[[Req], Future[Any]],
    respond: Callable[[Req, Future[Any]], Resp],
    *,
    coming: tuple[Callable[[], None], Callable[[], None]] | None = None,
    window: int = STREAM_WINDOW,
    name: str = "stream",
) -> Iterator[Resp]:
    """``respond(request, start(request))`` for each request of the stream, in order. ``start`` raising
    answers that request with the error (``respond`` sees a failed future); reading the stream failing
    (client gone, undecodable message) ends it after the answers already started.

    ``coming``: (announce, withdraw), told before each read that a request is on its way and at the end
    that none is; ``start`` settles each announcement (the data plane's ``submit(announced=True)``). A
    stream's batches then wait, up to their queue delay, for its next requests instead of running each
    request alone as it arrives (measured: mean executed batch 4 without, on one stream of single images)."""
    announce, withdraw = coming or (lambda: None, lambda: None)
    held: queue.Queue[Any] = queue.Queue(maxsize=window)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                held.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        pending = False  # an announcement not settled yet
        try:
            while True:
                announce()
                pending = True
                request: Any = next(requests, _END)
                if request is _END:
                    break
                pending = False  # start settles it, whichever way it goes
                try:
                    future = start(request)
                except Exception as exc:  # this request's own error; the stream goes on
                    future = failed(exc)
                if not put((request, future)):
                    return
            put(_END)
        except BaseException as exc:  # reading the stream itself failed
            put(exc)
        finally:
            if pending:
                withdraw()  # the request announced last never came

    reader = threading.Thread(target=read, name=f"carddeck-{name}-read", daemon=True)
    reader.start()
    try:
        while True:
            try:
                item = held.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                if isinstance(item, CarddeckError):
                    raise item
                if context.is_active():  # the client did not go away: say why the stream ended
                    log.warning("%s: reading the request stream failed: %r", name, item)
                return
            request, future = item
            yield respond(request, future)
    finally:
        stop.set()


def error_of(future: Future[Any]) -> tuple[str, str] | None:
    """None when the future succeeded (waits for it), else its error as a unary call would end: the gRPC
    status code's name and the message (a bug: INTERNAL, logged, no internals in the message)."""
    try:
        future.result()
    except CarddeckError as exc:
        return status_for(exc).name, details(exc)
    except BaseException as exc:
        log.error("internal error in a streamed request", exc_info=exc)
        return grpc.StatusCode.INTERNAL.name, f"internal error: {type(exc).__name__}"
    return None


__all__ = ["STREAM_WINDOW", "answer_in_order", "error_of", "failed"]
