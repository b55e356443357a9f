"""Logging: plain text or one JSON object per line, each carrying the request id of the RPC it came from.

The request id lives in a contextvar that the transports (the gRPC interceptor, the HTTP middleware)
set around the handler, so any log call made while serving a request (in the handler's thread)
carries it without passing it around.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

request_id_var: ContextVar[str | None] = ContextVar("carddeck_request_id", default=None)
REQUEST_ID_KEY = "x-request-id"  # gRPC metadata key and HTTP header
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # fullmatch: "$" matches before a final newline

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
# Attributes every LogRecord has; anything else was passed with ``extra=`` and goes into the JSON.
# uvicorn's ``color_message`` repeats the message with ANSI colours: not for a JSON line.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id", "color_message"}


def request_id_from(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The caller's ``x-request-id`` when it is 1-64 of ``[A-Za-z0-9._:-]``, else a fresh random one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _SAFE_ID.fullmatch(value):
            return value
    # 128 random bits like uuid4().hex, without its os.urandom call: that syscall hands the GIL over
    # on every request (5% of the server's Python time at batch 1 / concurrency 32, py-spy).
    # A request id is a label for logs, not a secret.
    return f"{random.getrandbits(128):032x}"


def current_request_id() -> str | None:
    return request_id_var.get()


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside an RPC) so text formats can print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get() or "-"
        return True


class RepeatFilter(logging.Filter):
    """At most ``burst`` warnings or errors per ``window_s`` of each message template (logger, level, format
    string).

    A client that makes the server fail the same way thousands of times a second (a connection flood, a
    bad request in a loop) must not fill the disk: past the burst the lines are counted, and the first line
    of that template after the window says how many were left out. INFO and below pass: the access log
    (one line per request, all of one template) must not lose requests."""

    def __init__(self, burst: int = 5, window_s: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # template -> [window start, lines, left out]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None or now - seen[0] >= self.window_s:
                left_out = int(seen[2]) if seen is not None else 0
                self._seen[key] = [now, 1, 0]
                if len(self._seen) > 10_000:  # templates are few; this only bounds a pathological logger
                    self._seen = {key: self._seen[key]}
                if left_out:
                    record.msg = f"{record.msg} [{left_out} more lines like this left out in {self.window_s:g} s]"
                return True
            seen[1] += 1
            if seen[1] <= self.burst:
                return True
            seen[2] += 1
            return False


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO-8601), level, logger, message, request_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None) or request_id_var.get()
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if rid and rid != "-":
            entry["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool | type(None)) else repr(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(*, json_logs: bool = False, level: int = logging.INFO) -> None:
    """Set the root logger's handlers to text (with the request id) or JSON lines, on stderr."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter(TEXT_FORMAT))
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(RepeatFilter())
    root.setLevel(level)


__all__ = [
    "REQUEST_ID_KEY",
    "JsonFormatter",
    "RepeatFilter",
    "RequestIdFilter",
    "configure_logging",
    "current_request_id",
    "request_id_from",
    "request_id_var",
]
