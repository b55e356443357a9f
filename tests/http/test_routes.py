"""Plain HTTP against a live server: every route, every error class, limits, auth and metrics."""

from __future__ import annotations

import base64
import gzip
import http.client
import json
import re
import ssl
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from carddeck.deck import Deck, DeckStore
from tests.http.conftest import HttpServer, http_server, request
from tests.observability.promql import free_port
from tests.observability.scrape import scrape, value
from tests.server.test_server import _self_signed
from tests.servers import ADMIN_TOKEN, HeldUpload, card, make_deck, noisy_images, smooth_images, start_server, wait_for

pytestmark = pytest.mark.integration
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def infer_json(x: np.ndarray, **extra) -> dict:
    datatype = "UINT8" if x.dtype == np.uint8 else "FP32"
    return {"inputs": [{"name": "images", "datatype": datatype, "shape": list(x.shape), "data": x.tolist()}], **extra}


def infer_binary(x: np.ndarray, header: dict | None = None) -> tuple[bytes, dict[str, str]]:
    datatype = "UINT8" if x.dtype == np.uint8 else "FP32"
    raw = np.ascontiguousarray(x).tobytes()
    doc = header or {
        "inputs": [{"name": "images", "datatype": datatype, "shape": list(x.shape),
                    "parameters": {"binary_data_size": len(raw)}}],
    }  # fmt: skip
    head = json.dumps(doc).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def test_health_metadata_and_model_routes(server):
    deck = Deck.open(server.process.deck)
    assert request(server, "GET", "/v2/health/live").status == 200
    assert request(server, "GET", "/v2/health/ready").status == 200
    meta = request(server, "GET", "/v2")
    assert meta.status == 200 and meta.headers["content-type"] == "application/json"
    extensions = ["model_repository", "model_configuration", "statistics", "binary_tensor_data", "parameters"]
    assert meta.json()["extensions"] == extensions
    for path in ("/v2/models/carddeck", f"/v2/models/carddeck/versions/{deck.version}"):
        doc = request(server, "GET", path).json()
        assert (doc["name"], doc["versions"], doc["platform"]) == ("carddeck", [str(deck.version)], "carddeck_deck")
        assert doc["outputs"][2] == {"name": "routing_weights", "datatype": "FP32", "shape": [-1, 2]}
    for path in ("/v2/models/g1/ready", "/v2/models/g1/versions/1/ready", "/v2/models/carddeck/ready"):
        assert request(server, "GET", path).status == 200, path
    rid = request(server, "GET", "/v2", headers={"x-request-id": "abc-123"})
    assert rid.headers["x-request-id"] == "abc-123"


def test_json_infer_with_nested_data_and_versioned_route(server):
    deck = Deck.open(server.process.deck)
    x = smooth_images(3)
    body = infer_json(x, id="q1", outputs=[{"name": "probabilities"}], parameters={"policy": "uniform"})
    answer = request(server, "POST", f"/v2/models/carddeck/versions/{deck.version}/infer", body)
    assert answer.status == 200 and "inference-header-content-length" not in answer.headers
    doc = answer.json()
    assert doc["id"] == "q1" and doc["model_name"] == "carddeck" and doc["parameters"]["policy"] == "uniform"
    (out,) = doc["outputs"]
    got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, deck.predict(x, policy="uniform").probabilities, atol=1e-6)
    flat = dict(infer_json(x))
    flat["inputs"][0]["data"] = x.ravel().tolist()  # flat row-major is accepted too
    assert request(server, "POST", "/v2/models/a1/infer", flat).status == 200


def test_binary_infer_layout(server):
    deck = Deck.open(server.process.deck)
    x = noisy_images(2)
    body, headers = infer_binary(x)
    doc = json.loads(body[: int(headers["Inference-Header-Content-Length"])])
    doc["outputs"] = [{"name": "labels", "parameters": {"binary_data": True}}, {"name": "probabilities"}]
    body, headers = infer_binary(x, doc)
    answer = request(server, "POST", "/v2/models/carddeck/infer", body, headers)
    assert answer.status == 200 and answer.headers["content-type"] == "application/octet-stream"
    n = int(answer.headers["inference-header-content-length"])
    head = json.loads(answer.body[:n])
    labels, probs = head["outputs"]
    assert labels["parameters"] == {"binary_data_size": 16} and len(answer.body) == n + 16
    want = deck.predict(x)
    assert np.array_equal(np.frombuffer(answer.body[n:], "<i8"), want.labels)
    np.testing.assert_allclose(np.asarray(probs["data"]).reshape(2, 10), want.probabilities, atol=1e-6)


def _card_b64(name: str, version: int = 1, seed: int = 5) -> str:
    return base64.b64encode(card(name, "gaussian", version=version, seed=seed)).decode()


def test_repository_index_load_and_unload(server):
    index = request(server, "POST", "/v2/repository/index")
    assert index.status == 200
    assert {m["name"] for m in index.json()} == {"carddeck", "g1", "a1"}
    assert all(m["state"] == "READY" for m in index.json())
    load = {"parameters": {"file:model.onnx": _card_b64("h1")}}
    assert request(server, "POST", "/v2/repository/models/h1/load", load, ADMIN).status == 200
    assert {m["name"] for m in request(server, "POST", "/v2/repository/index", {"ready": True}).json()} == {
        "carddeck", "g1", "a1", "h1"
    }  # fmt: skip
    assert request(server, "POST", "/v2/models/h1/infer", infer_json(noisy_images(1))).status == 200
    assert request(server, "POST", "/v2/repository/models/h1/load", load, ADMIN).status == 200  # a retry: no-op
    other = {"parameters": {"file:model.onnx": _card_b64("h1", seed=9)}}
    again = request(server, "POST", "/v2/repository/models/h1/load", other, ADMIN)
    assert again.status == 409 and "already in the deck with other bytes" in again.error
    assert request(server, "POST", "/v2/repository/models/h1/load", {}, ADMIN).status == 200  # loaded: no-op
    unload = request(server, "POST", "/v2/repository/models/h1/unload", {"parameters": {"unload_dependents": False}},
                     ADMIN)  # fmt: skip
    assert unload.status == 200
    assert "h1" not in {m["name"] for m in request(server, "POST", "/v2/repository/index").json()}
    assert "h1" not in Deck.open(server.process.deck).card_names


def _declared_too_large(server: HttpServer) -> tuple[int, str]:
    """Headers that announce 10 MB, then no body: the server answers 413 without reading it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.putrequest("POST", "/v2/models/carddeck/infer")
        conn.putheader("Content-Length", str(10_000_000))
        conn.endheaders()
        response = conn.getresponse()
        return response.status, json.loads(response.read())["error"]
    finally:
        conn.close()


def _chunked_too_large(server: HttpServer) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        chunks = (b"{" + b" " * 65535 for _ in range(40))  # 2.6 MB, no Content-Length
        conn.request("POST", "/v2/models/carddeck/infer", body=chunks, encode_chunked=True)
        response = conn.getresponse()
        return response.status, json.loads(response.read())["error"]
    finally:
        conn.close()


def test_bodies_over_the_limit_are_413(server):
    for status, error in (_declared_too_large(server), _chunked_too_large(server)):
        assert status == 413 and "limit of 1048576 bytes" in error
    bomb = gzip.compress(b" " * (8 << 20))  # 8 MiB of JSON whitespace in 8 KiB
    answer = request(server, "POST", "/v2/models/carddeck/infer", bomb, {"Content-Encoding": "gzip"})
    assert answer.status == 413 and "inflates past" in answer.error
    # each limit names the flag that sets it (mutant: the bare byte count, or one flag for every route)
    headers = {"Inference-Header-Content-Length": "2"}
    binary = request(server, "POST", "/v2/models/carddeck/infer", b"{}" + bytes(1_100_000), headers)
    assert binary.status == 413 and "limit of 1048576 bytes (--max-message-mb)" in binary.error, binary.error
    upload = request(server, "POST", "/v2/repository/models/h2/load", b" " * 3_000_000, ADMIN)
    assert upload.status == 413 and "(--max-card-mb)" in upload.error, upload.error
    assert request(server, "GET", "/v2/health/live").status == 200  # the server is fine


GOOD = infer_json(np.zeros((1, 32, 32, 3), np.uint8))


def _with(**changes) -> dict:
    doc = json.loads(json.dumps(GOOD))
    doc["inputs"][0].update(changes)
    return doc


ERRORS = [
    # (method, path, body, headers, status, needle in the error)
    ("POST", "/v2/models/carddeck/infer", b"{not json", {}, 400, "not valid JSON"),
    ("POST", "/v2/models/carddeck/infer", b"[1, 2]", {}, 400, "expected a JSON object"),
    ("POST", "/v2/models/carddeck/infer", {"inputs": "x"}, {}, 400, "inputs: expected a list"),
    ("POST", "/v2/models/carddeck/infer", _with(name="pixels"), {}, 400, "send 'images'"),
    ("POST", "/v2/models/carddeck/infer", _with(datatype="FP64"), {}, 400, "inputs[0].datatype"),
    ("POST", "/v2/models/carddeck/infer", _with(shape=[1, 32, "32", 3]), {}, 400, "inputs[0].shape"),
    ("POST", "/v2/models/carddeck/infer", _with(data=[1, 2, 3]), {}, 400, "3 values do not match"),
    ("POST", "/v2/models/carddeck/infer", _with(data=[[1], [2, 3]]), {}, 400, "not a rectangular array"),
    ("POST", "/v2/models/carddeck/infer", _with(data=[300] * 3072), {}, 400, "0..255"),
    ("POST", "/v2/models/carddeck/infer", _with(data=["a"] * 3072), {}, 400, "expected integers for UINT8"),
    ("POST", "/v2/models/carddeck/infer", {**GOOD, "parameters": {"bogus": 1}}, {}, 400, "unknown parameter"),
    ("POST", "/v2/models/carddeck/infer", {**GOOD, "outputs": [{"name": "x"}]}, {}, 400, "not an output"),
    (
        "POST",
        "/v2/models/carddeck/infer",
        {**GOOD, "outputs": [{"name": "labels", "parameters": {"classification": 2}}]},
        {},
        400,
        "classification",
    ),
    ("POST", "/v2/models/g1/infer", {**GOOD, "parameters": {"policy": "soft"}}, {}, 400, "apply to the deck"),
    (
        "POST",
        "/v2/models/carddeck/infer",
        b'{"inputs": []}xx',
        {"Inference-Header-Content-Length": "99"},
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "POST",
        "/v2/models/carddeck/infer",
        json.dumps(GOOD).encode() + b"xx",
        {"Inference-Header-Content-Length": str(len(json.dumps(GOOD)))},
        400,
        "no input declares",
    ),
    ("POST", "/v2/models/carddeck/infer", b"x", {"Content-Encoding": "br"}, 400, "Content-Encoding"),
    ("POST", "/v2/models/carddeck/infer", b"garbage", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
    (
        "POST",
        "/v2/models/carddeck/infer",
        {"inputs": [{**GOOD["inputs"][0], "shape": [65, 32, 32, 3]}]},
        {},
        413,
        "at most 64",
    ),
    ("POST", "/v2/models/nope/infer", GOOD, {}, 404, "no model 'nope'; models: carddeck, g1, a1"),
    ("POST", "/v2/models/g1/versions/2/infer", GOOD, {}, 404, "version 1, not '2'"),
    ("GET", "/v2/models/nope", None, {}, 404, "no model 'nope'"),
    ("GET", "/v2/models/nope/ready", None, {}, 404, "no model 'nope'"),
    ("GET", "/v2/models/nope/config", None, {}, 404, "no model 'nope'"),
    ("GET", "/v2/models/g1/versions/3/stats", None, {}, 404, "version 1, not '3'"),
    ("GET", "/v2/nothing/here", None, {}, 404, "GET /v2/nothing/here: Not Found"),
    ("GET", "/v2/models/carddeck/infer", None, {}, 405, "Method Not Allowed"),
    ("POST", "/v2/repository/models/h2/load", {}, {}, 401, "no bearer token"),
    ("POST", "/v2/repository/models/g1/unload", {}, {"Authorization": "Bearer wrong"}, 401, "wrong bearer token"),
    ("POST", "/v2/repository/models/zz/load", {}, ADMIN, 404, "no card 'zz'"),
    ("POST", "/v2/repository/models/BAD..NAME/load", {}, ADMIN, 400, "not a card name"),
    ("POST", "/v2/repository/models/h2/load", {"parameters": {"file:model.onnx": "%%%"}}, ADMIN, 400, "base64"),
    (
        "POST",
        "/v2/repository/models/h2/load",
        {"parameters": {"file:other.onnx": "AA=="}},
        ADMIN,
        400,
        "'file:model.onnx'",
    ),
    (
        "POST",
        "/v2/repository/models/h2/load",
        {"parameters": {"file:model.onnx": "AAAA"}},
        ADMIN,
        400,
        "not an ONNX model",
    ),
    (
        "POST",
        "/v2/repository/models/h3/load",
        {"parameters": {"file:model.onnx": _card_b64("h4")}},
        ADMIN,
        400,
        "does not match the card's own name",
    ),
    (
        "POST",
        "/v2/repository/models/h2/load",
        {"parameters": {"file:model.onnx": base64.b64encode(bytes(1_200_000)).decode()}},
        ADMIN,
        413,
        "limit of 1 MiB (max_card_mb)",
    ),
    ("POST", "/v2/repository/models/carddeck/unload", {}, ADMIN, 400, "cannot be unloaded"),
    ("POST", "/v2/repository/models/zz/unload", {}, ADMIN, 404, "zz"),
    ("POST", "/v2/repository/index", {"ready": "yes"}, {}, 400, "ready: must be a bool"),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "needle"), ERRORS)
def test_every_error_is_json_with_its_status(server, method, path, body, headers, status, needle):
    answer = request(server, method, path, body, headers)
    assert answer.status == status, answer.body[:500]
    assert answer.headers["content-type"] == "application/json"
    assert needle in answer.error and "Traceback" not in answer.error


LONG = "x" * 3000
ECHOES = [
    # (path, body, headers): a long value sent where an error message repeats it
    ("/v2/models/carddeck/infer", {"inputs": [{**GOOD["inputs"][0], "shape": [LONG]}]}, {}),
    ("/v2/models/carddeck/infer", b"{}", {"Inference-Header-Content-Length": LONG}),
    ("/v2/models/carddeck/infer", b"{}", {"Content-Encoding": LONG}),
    ("/v2/models/carddeck/infer", {**GOOD, "parameters": {"binary_data_output": LONG}}, {}),
    ("/v2/models/carddeck/infer", {**GOOD, "outputs": [{"name": "labels", "parameters": {"binary_data": LONG}}]}, {}),
    ("/v2/models/carddeck/infer", _with(data=None, parameters={"binary_data_size": LONG}), {}),
    ("/v2/repository/models/h2/load", {"parameters": {f"file:{LONG}": 1}}, ADMIN),
    ("/v2/repository/models/h2/load", {"parameters": {f"file:{LONG}": "%%%"}}, ADMIN),
    ("/v2/repository/index", {"ready": LONG}, {}),
]


@pytest.mark.parametrize(("path", "body", "headers"), ECHOES)
def test_errors_echo_at_most_80_characters_of_a_value(server, path, body, headers):
    """Mutant: a message that repeats what was sent with repr() rather than errors.shown() (the README promises
    at most 80 characters of any value sent; a header value echoed whole can be kilobytes)."""
    answer = request(server, "POST", path, body, headers)
    assert answer.status == 400, answer.body[:500]
    assert "x" * 70 in answer.error and "x" * 81 not in answer.error, answer.error[:300]


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def test_malformed_bodies_give_their_memory_back(server):
    """Malformed bodies (900 KB of bad JSON, binary data one byte short) leave resident memory where it was.

    The allocator keeps some freed memory for reuse (RSS moves by several MB either way), so growth is
    measured after a warm-up: requests that kept half their body would add over 20 MB across the 100
    measured ones.
    """
    garbage = b"{" + b"9" * 900_000
    x = np.zeros((60, 32, 32, 3), np.uint8)  # 184 KB of pixels, declared one byte short
    short, headers = infer_binary(x)
    for _ in range(20):  # warm up: thread pool, allocator arenas
        request(server, "POST", "/v2/models/carddeck/infer", garbage)
        request(server, "POST", "/v2/models/carddeck/infer", short[:-1], headers)
    before = _rss_kib(server.process.proc.pid)
    for _ in range(50):
        assert request(server, "POST", "/v2/models/carddeck/infer", garbage).status == 400
        assert request(server, "POST", "/v2/models/carddeck/infer", short[:-1], headers).status == 400
    grown = _rss_kib(server.process.proc.pid) - before
    assert grown < 15_000, f"resident memory grew by {grown} KiB over 100 malformed requests"


def test_not_ready_inference_token_and_metrics(tmp_path):
    """An empty deck: readiness answers 400 (the health routes' "false": OIP says 4xx, Triton answers 400), work
    503; an inference token guards inference; metrics label the route. Mutant: ModelReady of a known model that
    is not ready answered 503 (as before), or 404 like an unknown one."""
    DeckStore.create(tmp_path / "empty")
    metrics_port = free_port()
    srv = http_server(
        tmp_path / "empty", tmp_path, "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
        env={"CARDDECK_INFERENCE_TOKEN": "infer-me", "CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    token = {"Authorization": "Bearer infer-me"}
    try:
        assert request(srv, "GET", "/v2/health/live").status == 200  # probes are open
        ready = request(srv, "GET", "/v2/health/ready")
        assert ready.status == 400 and "has no cards" in ready.error
        model = request(srv, "GET", "/v2/models/carddeck/ready", None, token)  # known (the deck), not ready
        assert model.status == 400 and "has no cards" in model.error
        unknown = request(srv, "GET", "/v2/models/nope/ready", None, token)
        assert unknown.status == 404 and "no model 'nope'" in unknown.error
        assert request(srv, "GET", "/v2").status == 401
        assert request(srv, "POST", "/v2/models/carddeck/infer", GOOD, {"Authorization": "Bearer nope"}).status == 401
        answer = request(srv, "POST", "/v2/models/carddeck/infer", GOOD, token)
        assert answer.status == 503 and "no cards" in answer.error
        assert request(srv, "POST", "/v2/models/carddeck/infer", GOOD, ADMIN).status == 503  # admin token works too
        load = {"parameters": {"file:model.onnx": _card_b64("n1")}}
        assert request(srv, "POST", "/v2/repository/models/n1/load", load, token).status == 401  # not an admin
        assert request(srv, "POST", "/v2/repository/models/n1/load", load, ADMIN).status == 200
        assert request(srv, "GET", "/v2/health/ready").status == 200
        assert request(srv, "GET", "/v2/models/carddeck/ready", None, token).status == 200
        assert request(srv, "POST", "/v2/models/carddeck/infer", GOOD, token).status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        route = 'rpc="/v2/models/{model}/infer",service="http"'
        assert re.search(r'carddeck_requests_total\{code="200",' + re.escape(route) + r"\} 1\.0", text)
        assert re.search(r'carddeck_requests_total\{code="503",' + re.escape(route) + r"\} 2\.0", text)
        assert re.search(r'carddeck_requests_total\{code="401",' + re.escape(route) + r"\} 1\.0", text)
        assert 'carddeck_request_duration_seconds_count{rpc="/v2/models/{model}/infer",service="http"} 4.0' in text
        assert 'carddeck_requests_in_flight{rpc="/v2/models/{model}/infer",service="http"} 0.0' in text
    finally:
        srv.process.terminate()


def test_http_port_flag(tmp_path, server):
    deck = server.process.deck
    off = start_server(deck, tmp_path, "--http-port", "-1")
    try:
        assert "HTTP (Open Inference Protocol" not in off.log()
    finally:
        off.terminate()
    with pytest.raises(AssertionError, match=rf"cannot listen on 127.0.0.1: port {server.port} \(HTTP, --http-port\)"):
        start_server(deck, tmp_path, "--http-port", str(server.port))


def test_drain_refuses_new_http_work(tmp_path):
    """SIGTERM: readiness (server and model) is 400 at once, work is still served during the shutdown delay, and
    once the drain begins (an AddCard held open keeps it waiting) new HTTP work is refused with 503."""
    srv = http_server(make_deck(tmp_path / "deck"), tmp_path, "--shutdown-delay-s", "3", "--drain-timeout-s", "120",
                      "--metrics-host", "127.0.0.1", "--metrics-port", "0",
                      env={"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN})  # fmt: skip
    held = HeldUpload(srv.process.address, card("held", "gaussian", seed=11))
    try:
        port = int(re.search(r"metrics on http://\S+:(\d+)/metrics", srv.process.log()).group(1))
        wait_for(lambda: value(scrape(port), "carddeck_requests_in_flight", service="carddeck.v1.CardDeck",
                               rpc="AddCard"), "the held AddCard to be in flight")  # fmt: skip
        srv.process.proc.send_signal(15)
        ready = wait_for(lambda: (r := request(srv, "GET", "/v2/health/ready")).status != 200 and r, "not ready")
        assert ready.status == 400 and "shutting down" in ready.error
        model = request(srv, "GET", "/v2/models/g1/ready")
        assert model.status == 400 and "shutting down" in model.error
        assert request(srv, "POST", "/v2/models/carddeck/infer", GOOD).status == 200  # within the 3 s delay
        refused = wait_for(lambda: (r := request(srv, "POST", "/v2/models/carddeck/infer", GOOD)).status != 200 and r,
                           "HTTP infer to be refused once the drain began", timeout=30)  # fmt: skip
        assert refused.status == 503 and "shutting down" in refused.error, (refused.status, refused.body)
        assert request(srv, "GET", "/v2/models/carddeck").status == 200  # no work (routes.work): still answered
        assert srv.process.proc.poll() is None  # still draining: the held upload is in flight
        held.release()
        assert held.wait() == "OK"  # work in flight when the drain began finishes
        assert srv.process.proc.wait(60) == 0
        assert "drained" in srv.process.log()
    finally:
        held.release()
        srv.process.terminate()


def test_tls_uses_the_grpc_certificate(tmp_path, server):
    cert, key = _self_signed(tmp_path)
    srv = http_server(server.process.deck, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        conn = http.client.HTTPSConnection(
            "localhost", srv.port, timeout=10, context=ssl.create_default_context(cafile=str(cert))
        )
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().status == 200
        conn.close()
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            request(srv, "GET", "/v2/health/ready")  # plaintext HTTP to a TLS port
    finally:
        srv.process.terminate()
