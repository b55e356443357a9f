"""A tiny real gRPC server for observability tests: grpc health plus a raw-bytes test service.

The test service's methods end every way an RPC can end (OK, a set code, abort, an exception, a
stream that aborts or raises midway, a slow call the client cancels), so the interceptor's final
status codes can be checked one by one against what the client actually receives.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from prometheus_client import CollectorRegistry

from carddeck.observability.logs import current_request_id
from carddeck.observability.metrics import Metrics
from carddeck.server.interceptors import ObservabilityInterceptor

SERVICE = "carddeck.test.Probe"
_LOG = logging.getLogger("carddeck.test.probe")


class ProbeService:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.seen_ids: list[str | None] = []

    def ok(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.seen_ids.append(current_request_id())
        _LOG.info("probe ok")
        return request

    def set_code(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        context.set_details("bad probe")
        return b""

    def abort(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-extra", "kept"),))
        context.abort(grpc.StatusCode.NOT_FOUND, "no such card")
        raise AssertionError("abort returned")

    def boom(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        raise RuntimeError("boom")

    def wait(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        # Like a real handler: give up once the client has gone (or when released).
        while context.is_active() and not self.release.wait(0.01):
            pass
        return b"late"

    def stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request or b"3")):
            self.seen_ids.append(current_request_id())
            yield str(i).encode()

    def stream_abort(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"0"
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many")

    def stream_boom(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"0"
        raise RuntimeError("stream boom")

    def echo_all(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from requests

    def count(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return str(sum(1 for _ in requests)).encode()

    def infinite(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        while True:
            time.sleep(0.01)
            yield b"."


def _handler(probe: ProbeService) -> grpc.GenericRpcHandler:
    uu, us = grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Ok": uu(probe.ok),
            "SetCode": uu(probe.set_code),
            "Abort": uu(probe.abort),
            "Boom": uu(probe.boom),
            "Wait": uu(probe.wait),
            "Stream": us(probe.stream),
            "StreamAbort": us(probe.stream_abort),
            "StreamBoom": us(probe.stream_boom),
            "Infinite": us(probe.infinite),
            "EchoAll": grpc.stream_stream_rpc_method_handler(probe.echo_all),
            "Count": grpc.stream_unary_rpc_method_handler(probe.count),
        },
    )


@dataclass
class TinyServer:
    server: grpc.Server
    port: int
    metrics: Metrics
    probe: ProbeService

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.probe.release.set()
        self.server.stop(grace=None)


def start_tiny_server(metrics: Metrics | None = None) -> TinyServer:
    metrics = metrics or Metrics(CollectorRegistry())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=[ObservabilityInterceptor(metrics)])
    probe = ProbeService()
    server.add_generic_rpc_handlers((_handler(probe),))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return TinyServer(server, port, metrics, probe)
