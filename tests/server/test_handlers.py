"""The one wrapper around every servicer method (carddeck/server/handlers.py ``served``), on a real gRPC server.

A throw-away servicer of the health service (a real ServiceDescriptor: unary Check, server-streaming Watch),
registered as the server registers ours: drain accounting where a method declares ``work=True``, carddeck
errors to their status, anything else INTERNAL without internals, for unary calls and streams alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from carddeck.errors import CardNotFound
from carddeck.server.auth import OPEN, rpc
from carddeck.server.handlers import add_servicer
from carddeck.serving.admission import Admission

SERVING = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class Servicer:
    """``service`` names what each call does: ok, missing (a carddeck error) or bug (anything else)."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.inflight_seen: list[int] = []

    @rpc(OPEN, work=True)
    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> object:
        self.inflight_seen.append(self.admission.inflight)
        if request.service == "missing":
            raise CardNotFound("no card 'missing' in the deck")
        if request.service == "bug":
            raise KeyError("secret internals")
        return SERVING

    @rpc(OPEN)
    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Iterator[object]:
        self.inflight_seen.append(self.admission.inflight)
        yield SERVING
        if request.service == "missing":
            raise CardNotFound("no card 'missing' in the deck")
        if request.service == "bug":
            raise KeyError("secret internals")


class StreamWorks(Servicer):
    """The other way round: the stream does work, the unary call does not."""

    @rpc(OPEN)
    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> object:
        return super().Check(request, context)

    @rpc(OPEN, work=True)
    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Iterator[object]:
        yield from super().Watch(request, context)


@contextlib.contextmanager
def serving(cls: type[Servicer]) -> Iterator[tuple[health_pb2_grpc.HealthStub, Servicer, Admission]]:
    admission = Admission()
    servicer = cls(admission)
    server = grpc.server(ThreadPoolExecutor(4))
    add_servicer(server, servicer, health_pb2.DESCRIPTOR.services_by_name["Health"], admission.request)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            stub.channel = channel  # type: ignore[attr-defined]  (for raw calls)
            yield stub, servicer, admission
    finally:
        server.stop(None)


@pytest.fixture(params=[Servicer, StreamWorks])
def served(request) -> Iterator[tuple[health_pb2_grpc.HealthStub, Servicer, Admission]]:
    with serving(request.param) as running:
        yield running


def test_work_is_counted_in_flight_and_refused_once_draining(served):
    """Mutants: the wrapper skipping admission for unary calls or for streams that declare work; counting
    those that do not."""
    stub, servicer, admission = served
    unary, stream = stub.Check, lambda r: list(stub.Watch(r))
    work, other = (unary, stream) if type(servicer) is Servicer else (stream, unary)
    assert work(health_pb2.HealthCheckRequest()) in (SERVING, [SERVING])
    assert other(health_pb2.HealthCheckRequest()) in (SERVING, [SERVING])
    assert servicer.inflight_seen == [1, 0]  # counted while it runs; the other is not counted
    assert admission.drain(1.0)
    with pytest.raises(grpc.RpcError) as info:
        work(health_pb2.HealthCheckRequest())
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
    assert other(health_pb2.HealthCheckRequest()) in (SERVING, [SERVING])  # no work: still answered
    assert servicer.inflight_seen == [1, 0, 0]  # the refused call never reached the servicer


@pytest.mark.parametrize(
    ("service", "code", "details"),
    [
        ("missing", grpc.StatusCode.NOT_FOUND, "no card 'missing' in the deck"),
        ("bug", grpc.StatusCode.INTERNAL, "internal error in {rpc}: KeyError"),
    ],
)
def test_errors_end_as_their_status_in_unary_calls_and_streams(served, service, code, details):
    """Mutants: a stream's carddeck error or bug left to grpc (UNKNOWN, or the exception's text); a bug's
    message sent to the client."""
    stub, _, _ = served
    for rpc_name, call in (("Check", stub.Check), ("Watch", lambda r: list(stub.Watch(r)))):
        with pytest.raises(grpc.RpcError) as info:
            call(health_pb2.HealthCheckRequest(service=service))
        assert (info.value.code(), info.value.details()) == (code, details.format(rpc=rpc_name))
        assert "secret" not in info.value.details()
        if code != grpc.StatusCode.INTERNAL:  # the client raises the same class (carddeck.client.results)
            assert ("carddeck-error", "CardNotFound") in tuple(info.value.trailing_metadata())


def test_a_body_that_is_not_the_message_is_refused_before_it_is_admitted():
    """Mutant: admission before parsing (a draining server would answer UNAVAILABLE to garbage, and count it)."""
    with serving(Servicer) as (stub, servicer, admission):  # Check does work
        admission.drain(1.0)
        check = stub.channel.unary_unary("/grpc.health.v1.Health/Check")  # raw bytes, no serializer
        with pytest.raises(grpc.RpcError) as info:
            check(b"\xff\xff\xff")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "request body is not a valid grpc.health.v1.HealthCheckRequest"
        assert servicer.inflight_seen == []
