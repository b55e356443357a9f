"""A store that accepts connections but never answers (moto's server, SIGSTOPped) is reported down in time.

The endpoint is a ``moto_server`` process of its own, so that it can be frozen: the kernel still accepts
connections on its port, but no call returns. A poll not back within ``--store-timeout-s`` counts as failed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import boto3
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from carddeck.deck import DeckStore
from tests.http.conftest import http_server
from tests.http.test_store_outage import infer, until
from tests.observability.promql import free_port
from tests.observability.scrape import scrape, value
from tests.servers import card

pytestmark = pytest.mark.integration


@pytest.fixture
def frozen_s3(monkeypatch) -> Iterator[tuple[subprocess.Popen, dict[str, str]]]:
    port = free_port()
    proc = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}  # fmt: skip
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, v in env.items():
        monkeypatch.setenv(name, v)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3").list_buckets()
                break
            except Exception:
                assert time.monotonic() < deadline and proc.poll() is None, "moto_server did not start"
                time.sleep(0.2)
        yield proc, env
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def test_a_hung_store_is_reported_down_and_back(frozen_s3, tmp_path):
    moto, env = frozen_s3
    bucket = f"deck-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    location = f"s3://{bucket}/deck"
    store = DeckStore.create(location)
    store.add_card(card("g1", "gaussian", seed=1))
    store.add_card(card("a1", "augmix", seed=2))
    env = {**env, "CARDDECK_CACHE_DIR": str(tmp_path / "cache")}
    replica = http_server(location, tmp_path, "--poll-interval-s", "0.2", "--store-timeout-s", "1",  # type: ignore[arg-type]
                          "--metrics-port", "0", env={**{k: v for k, v in os.environ.items()}, **env})  # fmt: skip
    try:
        port = int(re.search(r"metrics on http://\S+:(\d+)/metrics", replica.process.log()).group(1))

        def store(name: str) -> float:
            return value(scrape(port), name)

        def health() -> int:
            with grpc.insecure_channel(replica.process.address) as channel:
                request = health_pb2.HealthCheckRequest(service="carddeck.store")
                return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status

        until("the store reported up", lambda: store("carddeck_store_up") == 1.0)
        assert health() == health_pb2.HealthCheckResponse.SERVING
        moto.send_signal(signal.SIGSTOP)  # connections are still accepted; nothing answers
        until("the hung store reported down", lambda: store("carddeck_store_up") == 0.0, timeout=20)
        assert store("carddeck_store_poll_errors_total") >= 1
        assert health() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert infer(replica)["model_version"] == "2"  # still serving its snapshot
        time.sleep(2)
        assert store("carddeck_store_poll_errors_total") >= 2  # a poll that stays out keeps counting
        moto.send_signal(signal.SIGCONT)
        until("the store back up", lambda: store("carddeck_store_up") == 1.0, timeout=60)
        assert health() == health_pb2.HealthCheckResponse.SERVING
        assert replica.process.log().count("cannot reach the deck store") == 1
    finally:
        moto.send_signal(signal.SIGCONT)
        replica.process.terminate()
