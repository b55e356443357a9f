"""What uvicorn leaves to the application: a deadline for each whole request, a cap on open connections,
file descriptors to spare for gRPC and /metrics, and an answer for every request cut short.

uvicorn's ``timeout_keep_alive`` covers only the idle time after a response and restarts on every byte,
and it has no deadline for receiving a request: a client that connects and sends nothing, or one header
byte at a time, holds a file descriptor for ever (Slowloris). :class:`GuardedProtocol` (uvicorn's own
h11 protocol, one subclass) gives every request ``request_timeout_s`` from the connection's opening (or
the previous response) to its last body byte, else answers 408 and closes. Past ``max_connections`` open
connections, a new one closes the oldest connection that has no request being worked on, or is answered
503 when every one is busy. On shutdown, a request that has not been answered ``SHUTDOWN_ANSWER_S`` after
the drain ended is answered 503 (the documented status) instead of having its connection dropped.

An answer written here bypasses the application; :data:`CUT_KEY` in the request's ASGI scope tells the
route which status the client actually got, for its log line and metrics.
"""

from __future__ import annotations

import json
import logging
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("carddeck.http")
CUT_KEY = "carddeck.cut"  # ASGI scope key: the status this module answered in the application's place
SHUTDOWN_ANSWER_S = 0.5  # after the drain: time for answers already computed to go out before the 503s
FD_RESERVE = 256  # descriptors kept for everything but HTTP clients (gRPC, /metrics, cards, the store)
PHRASES = {408: "Request Timeout", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Limits:
    request_timeout_s: float
    max_connections: int


def connection_cap(wanted: int) -> int:
    """Raise this process's open-file soft limit to its hard limit, and cap HTTP connections below it.

    Clients of the HTTP port must never take the descriptors gRPC and /metrics need to accept their own
    connections: at most half of the limit, and :data:`FD_RESERVE` descriptors, stay for them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # e.g. an infinite hard limit the kernel will not take as soft
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft // 2, soft - FD_RESERVE))


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with :class:`Limits` (set on a subclass by :func:`guarded_protocol`)."""

    limits: ClassVar[Limits]

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._since = self.loop.time()  # when this connection last began waiting for a request
        self._deadline: Any = None
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            self.cut(503, f"the server has {self.limits.max_connections} HTTP connections open, each with a "
                          "request in progress; retry later", force=True)  # fmt: skip
            log.warning("HTTP connection cap (%d) reached with every connection busy: new connections are "
                        "answered 503", self.limits.max_connections)  # fmt: skip
            return
        self._arm()

    def _make_room(self) -> bool:
        """Close the connection that has waited longest without a request in progress; False: none has.

        Connections closed earlier in this turn of the event loop still count until their close completes."""
        live = [c for c in self.connections if not c.transport.is_closing()]
        if len(live) <= self.limits.max_connections:
            return True
        idle = [c for c in live if c is not self and isinstance(c, GuardedProtocol) and not c.busy]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c._since)
        log.warning("HTTP connection cap (%d) reached: closing the connection idle longest",
                    self.limits.max_connections)  # fmt: skip
        victim.cut(503, "too many HTTP connections: this one had no request in progress and was closed")
        return True

    @property
    def busy(self) -> bool:
        """A whole request arrived and is being answered (the drain, not this module, bounds its time)."""
        return self.cycle is not None and not self.cycle.response_complete and self.conn.their_state is h11.DONE

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.limits.request_timeout_s, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or self.busy:
            return
        self.cut(408, f"the request did not arrive within {self.limits.request_timeout_s:g} s "
                      "(headers and body; see --http-request-timeout-s)")  # fmt: skip

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._since = self.loop.time()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection has the same time again

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def shutdown(self) -> None:
        super().shutdown()
        if not self.transport.is_closing():
            self.loop.call_later(SHUTDOWN_ANSWER_S, self.cut, 503, "the server is shutting down; retry on another "
                                 "replica")  # fmt: skip

    def cut(self, status: int, message: str, *, force: bool = False) -> None:
        """End this connection, answering ``status`` first when a request began and has no answer yet.

        A connection with nothing of a request received is closed without an answer (as after keep-alive),
        unless ``force``: a new connection refused at once gets the reason before its request."""
        if self.transport.is_closing():
            return
        started = self.cycle is not None and self.cycle.response_started
        pending = self.cycle is not None or bool(self.conn.trailing_data[0]) or self.conn.their_state is not h11.IDLE
        if (pending or force) and not started:
            body = json.dumps({"error": message}).encode()
            head = (f"HTTP/1.1 {status} {PHRASES[status]}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
            self.transport.write(head.encode() + body)
            if self.cycle is not None:
                self.scope[CUT_KEY] = status  # type: ignore[literal-required]
                self.cycle.disconnected = True  # the application's own answer must not follow
                self.cycle.message_event.set()
        self.transport.close()


def guarded_protocol(limits: Limits) -> type[GuardedProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, with these limits."""
    return type("CarddeckHttpProtocol", (GuardedProtocol,), {"limits": limits})


__all__ = ["CUT_KEY", "GuardedProtocol", "Limits", "connection_cap", "guarded_protocol"]
