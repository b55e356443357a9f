"""No HTTP client can take a live server down (issue 22): silent, slow and vanishing clients, connection floods
at a small file limit, large and deeply nested JSON, and requests caught by SIGTERM."""

from __future__ import annotations

import base64
import json
import re
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from carddeck.deck import default_deck_path
from carddeck.wire.proto_gen.inference import grpc_service_pb2
from carddeck.wire.proto_gen.inference.grpc_service_pb2_grpc import GRPCInferenceServiceStub
from tests.http.conftest import HttpServer, http_server, request
from tests.observability.scrape import scrape, value
from tests.servers import ADMIN_TOKEN, card, make_deck, noisy_images

pytestmark = pytest.mark.integration
INFER = "/v2/models/carddeck/infer"


def connect(server: HttpServer, timeout: float = 15.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a socket timeout fails the test: it never closed)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def metrics_port(server: HttpServer) -> int:
    return int(re.search(r"metrics on http://\S+:(\d+)/metrics", server.process.log()).group(1))


def http_code(server: HttpServer, code: str, rpc: str = "/v2/models/{model}/infer") -> float:
    return value(scrape(metrics_port(server)), "carddeck_requests_total", service="http", rpc=rpc, code=code)


def until(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    """A server that gives each request 1 s to arrive, takes 1 MiB of JSON and 4 MiB of binary."""
    tmp = tmp_path_factory.mktemp("strict")
    srv = http_server(
        make_deck(tmp / "deck"), tmp, "--http-request-timeout-s", "1", "--metrics-port", "0",
        "--max-json-mb", "1", "--max-message-mb", "4", env={"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN},
    )  # fmt: skip
    yield srv
    srv.process.terminate()


def test_silent_slow_and_stalled_clients_are_cut(strict):
    """Nothing sent, headers that never end, a byte every 0.2 s, a body that stops: each connection is closed
    within the request deadline; those with a request begun are answered 408 first."""
    before = http_code(strict, "408")
    silent = connect(strict)
    half_headers = connect(strict)
    half_headers.sendall(b"POST /v2/models/carddeck/infer HTTP/1.1\r\nHost: x\r\nContent-Le")
    half_body = connect(strict)
    half_body.sendall(b'POST /v2/models/carddeck/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"in')
    drip = connect(strict)
    stop = threading.Event()

    def drip_headers() -> None:  # every byte restarts uvicorn's own timer: only a whole-request deadline ends it
        try:
            for byte in b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000:
                if stop.wait(0.2):
                    return
                drip.send(bytes([byte]))
        except OSError:
            pass

    threading.Thread(target=drip_headers, daemon=True).start()
    try:
        assert read_all(silent) == b""  # nothing of a request: closed, as after keep-alive
        for sock in (half_headers, half_body, drip):
            answer = read_all(sock)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b"did not arrive within 1 s" in answer, answer
    finally:
        stop.set()
        for sock in (silent, half_headers, half_body, drip):
            sock.close()
    until("the 408 in the metrics", lambda: http_code(strict, "408") == before + 1)  # the one the route saw
    assert request(strict, "GET", "/v2/health/live").status == 200


def test_a_client_gone_mid_body_is_499_at_info(strict):
    before = http_code(strict, "499")
    sock = connect(strict)
    sock.sendall(b"POST /v2/models/carddeck/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"1" * 100)
    time.sleep(0.2)
    sock.close()
    until("the 499 in the metrics", lambda: http_code(strict, "499") == before + 1)
    assert http_code(strict, "500") == 0
    # the access line may reach the log file just after the metric moved: wait for it, then read it
    until("the 499 in the log", lambda: " 499 " in strict.process.log())
    log = strict.process.log()
    lines = [line for line in log.splitlines() if " 499 " in line]
    assert all(" INFO " in line for line in lines), log[-2000:]
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_json_has_its_own_limit_and_points_at_binary_tensors(strict):
    x = noisy_images(200)  # ~2.3 MB of JSON numbers, 0.6 MB binary
    body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    answer = request(strict, "POST", INFER, body)
    assert answer.status == 413, answer.body
    assert "limit of 1048576 bytes for JSON" in answer.error and "binary tensor data extension" in answer.error
    chunked = request(strict, "POST", INFER, iter([json.dumps(body).encode()]))  # type: ignore[arg-type]
    assert chunked.status == 413 and "binary" in chunked.error  # no Content-Length: counted while reading
    header = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()  # fmt: skip
    binary = request(strict, "POST", INFER, header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))})
    assert binary.status == 200, binary.body  # the same tensor, binary, is under the message limit


@pytest.mark.parametrize("depth", [2_000, 100_000])
@pytest.mark.parametrize(
    "path", [INFER, "/v2/repository/index", "/v2/repository/models/a1/load", "/v2/repository/models/a1/unload"]
)
def test_deeply_nested_json_is_400(strict, path, depth):
    body = (b"[" * depth + b"]" * depth) if path != INFER else b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"
    answer = request(strict, "POST", path, body, {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert answer.status == 400, answer.body
    assert "nested too deeply" in answer.error
    nested_data = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3],
                               "data": json.loads("[" * 900 + "]" * 900)}]}  # fmt: skip
    assert request(strict, "POST", INFER, nested_data).status == 400


@pytest.mark.parametrize("name", ["relcard-119%0A", "rel%00card", "relcard-119%09"])
def test_card_names_with_control_characters_are_refused(strict, name):
    files = {"file:model.onnx": base64.b64encode(card("relcard-119", "gaussian")).decode()}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    load = request(strict, "POST", f"/v2/repository/models/{name}/load", {"parameters": files}, admin)
    assert load.status == 400 and "is not a card name" in load.error, load.body
    index = request(strict, "POST", "/v2/repository/index", {}).json()
    assert all("relcard" not in entry["name"] for entry in index), index


def test_sigterm_answers_an_unfinished_request_503(tmp_path):
    srv = http_server(make_deck(tmp_path / "deck"), tmp_path, "--drain-timeout-s", "0.5")
    try:
        sock = connect(srv)
        sock.sendall(b'POST /v2/models/carddeck/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{"in')
        time.sleep(0.3)
        assert srv.process.terminate() == 0
        answer = read_all(sock)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:300]
        assert b"shutting down" in answer
        assert "Traceback" not in srv.process.log(), srv.process.log()[-3000:]
    finally:
        srv.process.terminate()


def test_a_connection_flood_at_a_1024_file_limit_leaves_every_port_answering(tmp_path):
    """1,100 idle HTTP connections at a 1,024 file limit: HTTP (on a new connection), gRPC on a new channel and
    /metrics all answer, the server never runs out of descriptors, and the log does not flood."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1400:
        pytest.skip(f"this test process needs 1,400 file descriptors; its hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1400), hard))
    srv = http_server(make_deck(tmp_path / "deck"), tmp_path, "--metrics-port", "0",
                      preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)))  # fmt: skip
    flood: list[socket.socket] = []
    try:
        for _ in range(1100):
            flood.append(connect(srv))
        time.sleep(1.0)
        assert request(srv, "GET", "/v2/health/ready").status == 200
        with grpc.insecure_channel(srv.process.address) as channel:
            live = GRPCInferenceServiceStub(channel).ServerLive(grpc_service_pb2.ServerLiveRequest(), timeout=10)
            assert live.live
        assert value(scrape(metrics_port(srv)), "carddeck_deck_cards") == 2
        x = noisy_images(2)
        body = {"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(x.shape), "data": x.ravel().tolist()}]}
        assert request(srv, "POST", INFER, body).status == 200
        fds = len(list(Path(f"/proc/{srv.process.proc.pid}/fd").iterdir()))
        assert fds < 1024 - 100, fds  # headroom left for gRPC, /metrics and the cards
        log = srv.process.log()
        assert "Too many open files" not in log, log[-3000:]
        assert log.count("HTTP connection cap") < 20, log[-3000:]  # repeated lines are rate-limited
    finally:
        for sock in flood:
            sock.close()
        srv.process.terminate()


def test_images_past_the_in_flight_budget_are_answered_429(tmp_path):
    """A request that would take the server past --max-inflight-images is refused at once, not allocated,
    and the budget comes back when the request holding it ends."""
    srv = http_server(default_deck_path(), tmp_path, "--max-inflight-images", "4096", "--metrics-port", "0",
                      "--no-batching")  # fmt: skip
    x = noisy_images(4096)
    header = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8", "shape": list(x.shape),
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()  # fmt: skip
    big: list[int] = []

    def send_big() -> None:
        big.append(request(srv, "POST", INFER, header + x.tobytes(),
                           {"Inference-Header-Content-Length": str(len(header))}).status)  # fmt: skip

    def in_flight() -> float:
        return value(scrape(metrics_port(srv)), "carddeck_images_in_flight")

    small = noisy_images(1)
    body = {
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": small.ravel().tolist()}]
    }
    try:
        thread = threading.Thread(target=send_big)
        thread.start()
        until("the 4,096 images in flight", lambda: in_flight() == 4096, timeout=120)
        refused = request(srv, "POST", INFER, body)
        assert refused.status == 429, refused.body
        assert "--max-inflight-images" in refused.error and "retry" in refused.error
        thread.join(600)
        assert big == [200] and in_flight() == 0
        assert request(srv, "POST", INFER, body).status == 200  # the budget came back
    finally:
        srv.process.terminate()
