"""A replica whose S3 store goes away keeps serving its snapshot, says so, and catches up when it returns.

Two moto servers in this process share one S3 state: the replica talks to one (its endpoint), the test
writes through the other. Stopping the replica's server closes its port (connection refused, as for
an endpoint that is down); a card added through the other meanwhile is a change made while it was away.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moto.server import ThreadedMotoServer

from carddeck.deck import DeckStore
from carddeck.wire.proto_gen.inference import grpc_service_pb2
from carddeck.wire.proto_gen.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tests.deck.test_s3 import bucket, location, s3_endpoint, s3_env  # noqa: F401 - fixtures
from tests.http.conftest import HttpServer, http_server, request
from tests.observability.promql import free_port
from tests.observability.scrape import scrape, value
from tests.servers import card, noisy_images

pytestmark = pytest.mark.integration


class Endpoint:
    """The replica's S3 endpoint: a moto server that can be stopped and started again on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: ThreadedMotoServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    e = Endpoint()
    yield e
    e.stop()


def until(what: str, check: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def infer(server: HttpServer) -> dict:
    x = noisy_images(2)
    body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    answer = request(server, "POST", "/v2/models/carddeck/infer", body)
    assert answer.status == 200, answer.body
    return answer.json()


def store_health(server: HttpServer) -> tuple[int, str]:
    """grpc.health.v1's status of the "carddeck.store" service, and the store line of OIP ServerReady."""
    with grpc.insecure_channel(server.process.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        overall = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert overall == health_pb2.HealthCheckResponse.SERVING  # it serves its snapshot all along
        status = stub.Check(health_pb2.HealthCheckRequest(service="carddeck.store"), timeout=10).status
        oip = GRPCInferenceServiceStub(channel)
        ready, call = oip.ServerReady.with_call(grpc_service_pb2.ServerReadyRequest(), timeout=10)
        assert ready.ready
        return status, dict(call.trailing_metadata())["carddeck-store"]


def test_a_replica_rides_out_a_store_outage_and_catches_up(location, endpoint, tmp_path):  # noqa: F811 - fixture
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "CARDDECK_CACHE_DIR"))}
    env["AWS_ENDPOINT_URL"] = endpoint.url  # the replica's own way to the (shared) S3 state
    replica = http_server(location, tmp_path, "--poll-interval-s", "0.2", "--metrics-port", "0", env=env)
    try:
        metrics_port = int(re.search(r"metrics on http://\S+:(\d+)/metrics", replica.process.log()).group(1))

        def up() -> float:
            return value(scrape(metrics_port), "carddeck_store_up")

        assert up() == 1.0 and infer(replica)["model_version"] == "2"
        synced = value(scrape(metrics_port), "carddeck_store_last_sync_timestamp_seconds")
        assert abs(synced - time.time()) < 30
        ready = request(replica, "GET", "/v2/health/ready")
        assert ready.status == 200 and ready.headers["carddeck-store"] == "reachable"
        assert store_health(replica) == (health_pb2.HealthCheckResponse.SERVING, "reachable")

        endpoint.stop()  # the replica's endpoint goes away
        stopped_at = time.time()  # no poll can succeed after this
        until("the store gauge to go 0", lambda: up() == 0.0)
        assert infer(replica)["model_version"] == "2"  # still serving its last snapshot
        ready = request(replica, "GET", "/v2/health/ready")
        assert ready.status == 200, ready.body  # ready: it serves; the store's state is reported beside it
        assert ready.headers["carddeck-store"].startswith("unreachable")
        status, line = store_health(replica)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING and line.startswith("unreachable")
        samples = scrape(metrics_port)
        assert value(samples, "carddeck_store_poll_errors_total") >= 1
        stale = value(samples, "carddeck_store_last_sync_timestamp_seconds")
        assert synced <= stale <= stopped_at  # the last poll that reached the store, not a failed one

        DeckStore(location).add_card(card("away", "gaussian", seed=11))  # a change made while it was away
        time.sleep(1.0)  # several failed polls: one log line per outage, not one per poll
        assert infer(replica)["model_version"] == "2"

        endpoint.start()
        until("the store gauge back to 1", lambda: up() == 1.0)
        until("the change made while away", lambda: request(replica, "GET", "/v2/models/away/ready").status == 200)
        assert infer(replica)["model_version"] == "3"
        assert value(scrape(metrics_port), "carddeck_store_last_sync_timestamp_seconds") > stale
        assert request(replica, "GET", "/v2/health/ready").headers["carddeck-store"] == "reachable"
        assert store_health(replica) == (health_pb2.HealthCheckResponse.SERVING, "reachable")
        log = replica.process.log()
        assert log.count("cannot reach the deck store") == 1, log[-3000:]
        assert log.count("deck store reachable again") == 1, log[-3000:]
    finally:
        replica.process.terminate()
