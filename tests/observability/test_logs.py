"""JSON logs carry the request id of the RPC that logged them, the same id the client gets back."""

from __future__ import annotations

import io
import json
import logging

import grpc
import pytest

from carddeck.observability.logs import JsonFormatter, RepeatFilter, RequestIdFilter, configure_logging, request_id_var
from tests.observability.tiny_server import SERVICE, start_tiny_server


@pytest.fixture
def captured():
    """A JSON handler on the root logger, removed afterwards."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(old_level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_rpc_logs_carry_the_request_id_sent_back(captured):
    tiny = start_tiny_server()
    try:
        with grpc.insecure_channel(tiny.target) as channel:
            _, call = channel.unary_unary(f"/{SERVICE}/Ok").with_call(b"x")
            rid = dict(call.trailing_metadata())["x-request-id"]
            _, call = channel.unary_unary(f"/{SERVICE}/Ok").with_call(b"x", metadata=(("x-request-id", "mine-1"),))
    finally:
        tiny.stop()
    records = lines(captured)
    probe = [r for r in records if r["message"] == "probe ok"]
    assert [r["request_id"] for r in probe] == [rid, "mine-1"]
    assert probe[0]["level"] == "INFO" and probe[0]["logger"] == "carddeck.test.probe"
    assert probe[0]["time"].endswith("Z")
    access = [r for r in records if r["logger"] == "carddeck.access"]
    assert [(r["request_id"], r["rpc"], r["code"]) for r in access] == [(rid, "Ok", "OK"), ("mine-1", "Ok", "OK")]
    assert all(r["duration_ms"] >= 0 for r in access)


def test_outside_an_rpc_there_is_no_request_id_and_extras_and_exceptions_are_kept(captured):
    log = logging.getLogger("carddeck.test")
    log.info("plain %s", "message", extra={"card": "clean-a", "blob": object()})
    try:
        raise ValueError("bad")
    except ValueError:
        log.exception("failed")
    token = request_id_var.set("abc")
    try:
        log.warning("inside")
    finally:
        request_id_var.reset(token)
    plain, failed, inside = lines(captured)
    assert "request_id" not in plain and plain["message"] == "plain message" and plain["card"] == "clean-a"
    assert plain["blob"].startswith("<object")
    assert "ValueError: bad" in failed["exception"]
    assert inside["request_id"] == "abc"


def test_configure_logging_switches_the_root_handlers():
    root = logging.getLogger()
    saved = [(h, h.formatter, list(h.filters)) for h in root.handlers]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        configure_logging(json_logs=True)
        logging.getLogger("carddeck.test").info("as json")
        configure_logging(json_logs=False)
        logging.getLogger("carddeck.test").info("as text")
    finally:
        root.removeHandler(handler)
        for h, formatter, filters in saved:
            h.setFormatter(formatter)
            h.filters[:] = filters
    first, second = stream.getvalue().splitlines()
    assert json.loads(first)["message"] == "as json"
    assert second.endswith("carddeck.test [-]: as text")


def test_repeated_lines_are_rate_limited_and_the_count_left_out_is_said(captured):
    (handler,) = [h for h in logging.getLogger().handlers if getattr(h, "stream", None) is captured]
    repeat = RepeatFilter(burst=3, window_s=60)  # the flood fits in one window however slow the machine
    handler.addFilter(repeat)
    log = logging.getLogger("carddeck.flood")
    for i in range(1000):
        log.warning("accept failed on connection %d: Too many open files", i)
    log.warning("another message")  # a different template has its own budget
    first = [line["message"] for line in lines(captured)]
    assert len(first) == 4 and first[-1] == "another message", first
    repeat.window_s = 0.0  # the window is over: the next line of the template says what was left out
    log.warning("accept failed on connection %d: Too many open files", 1000)
    assert lines(captured)[-1]["message"].endswith("[997 more lines like this left out in 0 s]")


def test_the_access_log_keeps_every_request(captured):
    """One INFO line per request, all of one template: none may be left out by the repeat limit."""
    (handler,) = [h for h in logging.getLogger().handlers if getattr(h, "stream", None) is captured]
    handler.addFilter(RepeatFilter(burst=3, window_s=60))
    access = logging.getLogger("carddeck.access")
    for i in range(20):
        access.info("http %s %s %d in %.1f ms", "POST", "/v2/models/{model}/infer", 200, float(i))
    assert len([line for line in lines(captured) if line["logger"] == "carddeck.access"]) == 20


def test_json_lines_leave_out_uvicorns_colour_copy_of_the_message(captured):
    logging.getLogger("uvicorn.error").info("Started %s", "server", extra={"color_message": "\x1b[1mStarted\x1b[0m"})
    (entry,) = lines(captured)
    assert entry["message"] == "Started server" and "color_message" not in entry
