"""Two `carddeck serve` replicas on one deck in S3 (moto's server): a card loaded through one is served by both."""

from __future__ import annotations

import base64
import os
import time

import pytest

from tests.deck.test_s3 import bucket, location, s3_endpoint, s3_env  # noqa: F401 - fixtures
from tests.http.conftest import http_server, request
from tests.servers import ADMIN_TOKEN, card, noisy_images, start_server

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_replicas_share_an_s3_deck(location, tmp_path):  # noqa: F811 - fixture
    env = {k: v for k, v in os.environ.items() if k.startswith(("AWS_", "CARDDECK_CACHE_DIR"))}
    env["CARDDECK_ADMIN_TOKEN"] = ADMIN_TOKEN
    replicas = [http_server(location, tmp_path, "--poll-interval-s", "0.2", env=env) for _ in range(2)]
    try:
        load = {"parameters": {"file:model.onnx": base64.b64encode(card("s1", "gaussian", seed=9)).decode()}}
        assert request(replicas[0], "POST", "/v2/repository/models/s1/load", load, ADMIN).status == 200
        deadline = time.monotonic() + 10
        while request(replicas[1], "GET", "/v2/models/s1/ready").status != 200:
            assert time.monotonic() < deadline, "the second replica never served the new card"
            time.sleep(0.1)
        x = noisy_images(2)
        body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        answers = [request(r, "POST", "/v2/models/s1/infer", body).json() for r in replicas]
        assert answers[0]["outputs"] == answers[1]["outputs"]
        assert answers[0]["model_version"] == "1"
    finally:
        for r in replicas:
            r.process.terminate()


def test_serve_refuses_a_missing_bucket_at_start(s3_env, tmp_path):  # noqa: F811 - fixture
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    with pytest.raises(AssertionError, match="carddeck: error: s3://no-such-bucket-zz: no such bucket"):
        start_server("s3://no-such-bucket-zz/deck", tmp_path, env=env)
