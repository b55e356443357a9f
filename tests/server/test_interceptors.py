"""The interceptor on a real gRPC server: exact counts by final status code, latency, in-flight, request ids."""

from __future__ import annotations

import threading
import time
from collections import namedtuple

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from carddeck.observability.logs import request_id_from
from carddeck.observability.metrics import start_metrics_server
from carddeck.server.interceptors import split_method
from tests.observability.scrape import scrape, value
from tests.observability.tiny_server import SERVICE, start_tiny_server

HEALTH = "grpc.health.v1.Health"
Details = namedtuple("Details", "method invocation_metadata")  # what grpc passes an interceptor


@pytest.fixture
def live():
    tiny = start_tiny_server()
    endpoint = start_metrics_server(tiny.metrics, "127.0.0.1", 0)
    channel = grpc.insecure_channel(tiny.target)
    yield tiny, endpoint, channel
    channel.close()
    endpoint.stop()
    tiny.stop()


def unary(channel, method):
    return channel.unary_unary(f"/{SERVICE}/{method}")


def stream(channel, method):
    return channel.unary_stream(f"/{SERVICE}/{method}")


def requests_total(samples, rpc, code, service=SERVICE):
    return value(samples, "carddeck_requests_total", service=service, rpc=rpc, code=code)


def test_exact_counts_by_final_status_code(live):
    _tiny, endpoint, channel = live
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(3):
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for _ in range(5):
        assert unary(channel, "Ok")(b"x") == b"x"
    expected = {
        "SetCode": grpc.StatusCode.INVALID_ARGUMENT,
        "Abort": grpc.StatusCode.NOT_FOUND,
        "Boom": grpc.StatusCode.UNKNOWN,
    }
    for method, code in expected.items():
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                unary(channel, method)(b"")
            assert err.value.code() == code
    assert list(stream(channel, "Stream")(b"4")) == [b"0", b"1", b"2", b"3"]
    for method, code in {
        "StreamAbort": grpc.StatusCode.RESOURCE_EXHAUSTED,
        "StreamBoom": grpc.StatusCode.UNKNOWN,
    }.items():
        got = []
        with pytest.raises(grpc.RpcError) as err:
            for item in stream(channel, method)(b""):
                got.append(item)
        assert err.value.code() == code and got == [b"0"]
    assert list(channel.stream_stream(f"/{SERVICE}/EchoAll")(iter([b"a", b"b"]))) == [b"a", b"b"]
    assert channel.stream_unary(f"/{SERVICE}/Count")(iter([b"a", b"b", b"c"])) == b"3"
    with pytest.raises(grpc.RpcError) as err:
        unary(channel, "NoSuchMethod")(b"")
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    samples = scrape(endpoint.port)
    assert requests_total(samples, "Check", "OK", HEALTH) == 3
    assert requests_total(samples, "Check", "NOT_FOUND", HEALTH) == 1
    assert requests_total(samples, "Ok", "OK") == 5
    assert requests_total(samples, "SetCode", "INVALID_ARGUMENT") == 2
    assert requests_total(samples, "Abort", "NOT_FOUND") == 2
    assert requests_total(samples, "Boom", "UNKNOWN") == 2
    assert requests_total(samples, "Stream", "OK") == 1
    assert requests_total(samples, "StreamAbort", "RESOURCE_EXHAUSTED") == 1
    assert requests_total(samples, "StreamBoom", "UNKNOWN") == 1
    assert requests_total(samples, "EchoAll", "OK") == 1
    assert requests_total(samples, "Count", "OK") == 1
    # Every finished RPC is counted exactly once, and unknown methods not at all.
    total = sum(v for (name, _), v in samples.items() if name == "carddeck_requests_total")
    assert total == 3 + 1 + 5 + 6 + 1 + 2 + 2
    assert not any("NoSuchMethod" in dict(labels).get("rpc", "") for _, labels in samples)
    # Latency histograms count the same RPCs; nothing left in flight.
    hist = "carddeck_request_duration_seconds_count"
    assert value(samples, hist, service=SERVICE, rpc="Ok") == 5
    assert value(samples, hist, service=HEALTH, rpc="Check") == 4
    assert value(samples, "carddeck_request_duration_seconds_bucket", service=SERVICE, rpc="Ok", le="10.0") == 5
    in_flight = [v for (name, _), v in samples.items() if name == "carddeck_requests_in_flight"]
    assert in_flight and all(v == 0 for v in in_flight)


def test_in_flight_and_cancelled(live):
    _tiny, endpoint, channel = live
    future = unary(channel, "Wait").future(b"")
    deadline = time.monotonic() + 5
    while value(scrape(endpoint.port), "carddeck_requests_in_flight", service=SERVICE, rpc="Wait") != 1:
        assert time.monotonic() < deadline, "in-flight gauge never reached 1"
        time.sleep(0.02)
    future.cancel()
    # A client cancel mid-stream ends the stream CANCELLED too.
    responses = stream(channel, "Infinite")(b"")
    assert next(responses) == b"."
    responses.cancel()
    deadline = time.monotonic() + 5
    while True:
        samples = scrape(endpoint.port)
        done = requests_total(samples, "Wait", "CANCELLED") + requests_total(samples, "Infinite", "CANCELLED")
        if done == 2:
            break
        assert time.monotonic() < deadline, f"cancelled RPCs not recorded: {done}"
        time.sleep(0.02)
    assert requests_total(samples, "Wait", "OK") == 0
    assert value(samples, "carddeck_requests_in_flight", service=SERVICE, rpc="Wait") == 0
    assert value(samples, "carddeck_requests_in_flight", service=SERVICE, rpc="Infinite") == 0


def test_request_id_is_honoured_or_generated_and_sent_back(live):
    tiny, _, channel = live
    _, call = unary(channel, "Ok").with_call(b"x", metadata=(("x-request-id", "client-42.a:b"),))
    assert dict(call.trailing_metadata())["x-request-id"] == "client-42.a:b"
    assert tiny.probe.seen_ids[-1] == "client-42.a:b"

    _, call = unary(channel, "Ok").with_call(b"x", metadata=(("x-request-id", "bad id with spaces"),))
    generated = dict(call.trailing_metadata())["x-request-id"]
    assert generated != "bad id with spaces" and len(generated) == 32 and tiny.probe.seen_ids[-1] == generated

    # Errors carry it too, and trailing metadata the handler set is kept alongside.
    with pytest.raises(grpc.RpcError) as err:
        unary(channel, "Abort")(b"", metadata=(("x-request-id", "r1"),))
    trailing = dict(err.value.trailing_metadata())
    assert trailing["x-request-id"] == "r1" and trailing["x-extra"] == "kept"

    # Streams: the id is set while each response is produced.
    responses = stream(channel, "Stream")(b"2", metadata=(("x-request-id", "s1"),))
    assert list(responses) == [b"0", b"1"]
    assert dict(responses.trailing_metadata())["x-request-id"] == "s1"
    assert tiny.probe.seen_ids[-2:] == ["s1", "s1"]


def test_concurrent_requests_get_distinct_ids(live):
    tiny, _, channel = live
    ids = []

    def call():
        _, c = unary(channel, "Ok").with_call(b"x")
        ids.append(dict(c.trailing_metadata())["x-request-id"])

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 16 and sorted(ids) == sorted(tiny.probe.seen_ids[-16:])


def test_request_id_and_method_parsing():
    assert request_id_from([("x-request-id", "abc")]) == "abc"
    assert request_id_from([("x-request-id", "a" * 65)]) != "a" * 65
    assert request_id_from([("x-request-id", "a\nb")]) != "a\nb"
    assert request_id_from([("x-request-id-bin", b"abc")]) != "abc"
    assert len(request_id_from(None)) == 32
    assert split_method("/inference.GRPCInferenceService/ModelInfer") == (
        "inference.GRPCInferenceService",
        "ModelInfer",
    )


def test_a_method_wrapped_once_still_follows_what_the_next_interceptor_returns():
    """The wrapper is kept per method, but only for the handler it wraps: a refused call (auth's abort
    handler) and an allowed one on the same method each run their own handler, in any order."""
    from carddeck.server.interceptors import ObservabilityInterceptor

    allowed = grpc.unary_unary_rpc_method_handler(lambda request, context: b"allowed")
    refused = grpc.unary_unary_rpc_method_handler(lambda request, context: b"refused")
    obs = ObservabilityInterceptor()

    class Context:  # what the wrapper reads of a live call
        def invocation_metadata(self):
            return ()

        def set_trailing_metadata(self, pairs):
            pass

        def code(self):
            return None

        def is_active(self):
            return True

    def answer(handler):
        details = Details(f"/{SERVICE}/Ok", ())
        return obs.intercept_service(lambda d: handler, details).unary_unary(b"", Context())

    order = (allowed, allowed, refused, allowed, refused, refused)
    assert [answer(h) for h in order] == [b"allowed" if h is allowed else b"refused" for h in order]
