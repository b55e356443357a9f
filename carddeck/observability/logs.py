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
import time
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

request_id_var: ContextVar[str | None] = ContextVar("carddeck_request_id", default=None)
REQUEST_ID_KEY = "x-request-id"  # gRPC metadata key and HTTP header
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"
# Attributes every LogRecord has; anything else was passed with ``extra=`` and goes into the JSON.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}


def request_id_from(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The caller's ``x-request-id`` when it is 1-64 of ``[A-Za-z0-9._:-]``, else a fresh random one."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _SAFE_ID.match(value):
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
    root.setLevel(level)


__all__ = [
    "REQUEST_ID_KEY",
    "JsonFormatter",
    "RequestIdFilter",
    "configure_logging",
    "current_request_id",
    "request_id_from",
    "request_id_var",
]
