"""The real ``carddeck serve`` process: /metrics after known traffic, request ids, and a real Prometheus on it.

Known traffic, exact values. Where a value depends on wiring between the server and
:mod:`carddeck.observability.metrics`, the assertion message names the call that is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from carddeck.client.api import CardDeckClient
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb
from tests.cards import tiny_card_bytes, tiny_meta
from tests.observability.deck_traffic import build_deck
from tests.observability.promql import check_every_expression, free_port, running_prometheus
from tests.observability.scrape import scrape, value

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "observability-admin-token"
SERVICE = "carddeck.v1.CardDeck"
BATCH = 16


@dataclass
class Live:
    proc: subprocess.Popen
    log_path: Path
    address: str
    metrics_port: int
    clean: np.ndarray
    shifted: np.ndarray

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self) -> CardDeckClient:
        return CardDeckClient(self.address, token=TOKEN, timeout=30)


def launch(deck: Path, tmp: Path, **env_extra: str) -> tuple[subprocess.Popen, Path, str, int]:
    """``carddeck serve`` on ``deck`` with free ports; returns (process, log path, gRPC address, metrics port)."""
    metrics_port = free_port()
    log_path = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDDECK_")}
    env.update(PYTHONPATH=str(ROOT), CARDDECK_ADMIN_TOKEN=TOKEN, **env_extra)
    cmd = [sys.executable, "-m", "carddeck", "serve", "--deck", str(deck), "--port", "0", "--http-port", "-1",
           "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--poll-interval-s", "0"]  # fmt: skip
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        text = log_path.read_text(errors="replace")
        match = re.search(r"serving deck .* on \S+:(\d+)", text)
        if match:
            return proc, log_path, f"127.0.0.1:{match.group(1)}", metrics_port
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start:\n{text[-3000:]}")
        time.sleep(0.05)


def start(tmp: Path, **env_extra: str) -> Live:
    rig = build_deck(tmp / "deck")
    return Live(*launch(rig.deck.root, tmp, **env_extra), rig.clean, rig.shifted)


def stop(server: Live) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(20)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(5)


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    server = start(tmp_path)
    yield server
    stop(server)


def wait_until(check, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def wait_for_shift_detector(live: Live) -> None:
    wait_until(
        lambda: value(scrape(live.metrics_port), "carddeck_shift_false_alarm_rate") > 0,
        "carddeck_shift_false_alarm_rate not set after 20 s: carddeck/app/process.py serve() must add "
        "`dataplane.on_swap.append(ShiftLoader(monitor))` (carddeck.observability.shift) before dataplane.start()",
    )


def test_metrics_after_known_traffic(live: Live) -> None:
    clean_n, shifted_n = 4, 3
    with live.client() as client:
        for i in range(clean_n):
            client.predict(live.clean[i * BATCH : (i + 1) * BATCH])
        for i in range(shifted_n):
            client.predict(live.shifted[i * BATCH : (i + 1) * BATCH])
        client.predict(live.clean[:8], per_sample=True)
        for bad in (np.zeros((2, 7, 7, 3), np.uint8), np.zeros((1, 32, 32, 3), np.float64)):
            with pytest.raises(grpc.RpcError) as err:
                client.predict(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        client.add_card(tiny_card_bytes(tiny_meta("extra", domain="clean"), seed=9))
        client.remove_card("extra")
        with pytest.raises(grpc.RpcError) as err:
            client.remove_card("no-such-card")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        version = client.list_cards()
    s = scrape(live.metrics_port)

    def requests(rpc: str, code: str) -> float:
        return value(s, "carddeck_requests_total", service=SERVICE, rpc=rpc, code=code)

    assert requests("Predict", "OK") == clean_n + shifted_n + 1
    assert requests("Predict", "INVALID_ARGUMENT") == 2
    assert requests("AddCard", "OK") == 1
    assert requests("RemoveCard", "OK") == 1
    assert requests("RemoveCard", "NOT_FOUND") == 1
    assert (
        value(s, "carddeck_request_duration_seconds_count", service=SERVICE, rpc="Predict") == clean_n + shifted_n + 3
    )
    assert value(s, "carddeck_requests_in_flight", service=SERVICE, rpc="Predict") == 0
    # The gate: one decision per batch-routed request, one per image when routed per sample.
    decisions = {dict(k[1])["mode"]: v for k, v in s.items() if k[0] == "carddeck_gate_decisions_total"}
    assert decisions == {"batch": clean_n + shifted_n, "sample": 8}
    assert value(s, "carddeck_domain_distance_count", domain="clean") == clean_n + shifted_n + 8
    images = sum(v for k, v in s.items() if k[0] == "carddeck_gate_weight_total")
    assert images == pytest.approx((clean_n + shifted_n) * BATCH + 8)
    # Every OK request ran as one deck batch (requests were sequential: batched or run alone, each counts).
    assert value(s, "carddeck_batch_size_count") == clean_n + shifted_n + 1, (
        "carddeck_batch_size misses deck runs: carddeck/serving/dispatch.py Dispatch._execute must call "
        "self.observe_batch(len(x), []) where it runs a request without the micro-batcher"
    )
    assert value(s, "carddeck_batch_size_sum") == (clean_n + shifted_n) * BATCH + 8
    assert value(s, "carddeck_queue_wait_seconds_count") <= clean_n + shifted_n + 1
    # The deck: three cards after add + remove; every change counted by outcome.
    assert value(s, "carddeck_deck_cards") == 3 == len(version.cards)
    assert value(s, "carddeck_deck_version") == version.deck_version
    changes = {
        (dict(k[1])["op"], dict(k[1])["outcome"]): v for k, v in s.items() if k[0] == "carddeck_card_changes_total"
    }
    assert changes[("add", "ok")] == 1 and changes[("remove", "ok")] == 1
    assert sum(v for (op, outcome), v in changes.items() if op == "remove" and outcome != "ok") == 1
    assert any(k[0] == "carddeck_build_info" for k in s)


def test_request_id_round_trip_on_the_real_server(live: Live) -> None:
    with live.client() as client:
        request = pb.ListCardsRequest()
        _, call = client.stub.ListCards.with_call(request, metadata=(("x-request-id", "live-7"),))
        assert dict(call.trailing_metadata())["x-request-id"] == "live-7"
        with pytest.raises(grpc.RpcError) as err:
            client.stub.RemoveCard(pb.RemoveCardRequest(name="nope"), metadata=(("x-request-id", "live-8"),))
        assert dict(err.value.trailing_metadata())["x-request-id"] == "live-8"


def test_json_logs_carry_the_request_id_the_client_got(tmp_path: Path) -> None:
    server = start(tmp_path, CARDDECK_LOG_FORMAT="json")
    try:
        with server.client() as client:
            model = tiny_card_bytes(tiny_meta("logged", domain="clean"), seed=3)
            chunks = iter([pb.AddCardChunk(data=model, sha256=hashlib.sha256(model).hexdigest())])
            _, call = client.stub.AddCard.with_call(chunks, metadata=(*client.metadata, ("x-request-id", "add-json-1")))
            assert dict(call.trailing_metadata())["x-request-id"] == "add-json-1"
            with pytest.raises(grpc.RpcError) as err:
                client.stub.Predict(pb.PredictRequest(), metadata=(("x-request-id", "bad-json-2"),))
            assert dict(err.value.trailing_metadata())["x-request-id"] == "bad-json-2"
    finally:
        stop(server)
    lines = [line for line in server.log().splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(
                f"not a JSON log line: {line!r}; CARDDECK_LOG_FORMAT=json needs a `log_format` setting "
                "(carddeck/serving/settings.py) and configure_logging(json_logs=...) at the start of serve() "
                "(carddeck/app/process.py)"
            ) from None
    added = [r for r in records if r.get("request_id") == "add-json-1"]
    assert any("logged" in r["message"] for r in added), added
    refused = [r for r in records if r.get("request_id") == "bad-json-2" and r["logger"] == "carddeck.access"]
    assert [(r["rpc"], r["code"], r["level"]) for r in refused] == [("Predict", "INVALID_ARGUMENT", "INFO")]


def test_card_latency_is_recorded_per_card(live: Live) -> None:
    with live.client() as client:
        result = client.predict(live.clean[:BATCH], policy="uniform")
    s = scrape(live.metrics_port)
    counts = {dict(k[1])["card"]: v for k, v in s.items() if k[0] == "carddeck_card_duration_seconds_count"}
    assert counts == dict.fromkeys(result.routing["selected"], 1.0), (
        "carddeck_card_duration_seconds has no observation per card run: Deck.run_routed (carddeck/deck/deck.py) "
        "must time each card and carddeck/serving/microbatch.py MicroBatchRun pass metrics.observe_card to it"
    )


def test_shift_states_are_counted(live: Live) -> None:
    wait_for_shift_detector(live)
    with live.client() as client:
        for i in range(3):
            client.predict(live.clean[i * BATCH : (i + 1) * BATCH])
        for i in range(2):
            client.predict(live.shifted[i * BATCH : (i + 1) * BATCH])
    s = scrape(live.metrics_port)

    def batches(state: str) -> float:
        return value(s, "carddeck_shift_batches_total", model="carddeck", state=state, unit="batch")

    assert (batches("in_distribution"), batches("covered"), batches("uncovered")) == (3, 0, 2), (
        "shift states are not counted: carddeck/app/process.py serve() must add "
        "`dataplane.on_predict.append(monitor)` (a carddeck.observability.shift.ShiftMonitor)"
    )


def test_every_dashboard_and_alert_expression_on_the_real_server(live: Live, prometheus_tools, tmp_path) -> None:
    wait_for_shift_detector(live)
    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        try:
            with live.client() as client:
                i = 0
                while not stop.is_set():
                    start = BATCH * (i % 20)
                    client.predict(live.clean[start : start + BATCH])
                    for _ in range(3):
                        client.predict(live.shifted[start : start + BATCH])
                    if i % 5 == 0:
                        client.predict(live.clean[:8], per_sample=True)
                        client.predict(live.clean[:8], policy="uniform")
                        with pytest.raises(grpc.RpcError):
                            client.remove_card("no-such-card")
                        name = f"extra-{i}"
                        client.add_card(tiny_card_bytes(tiny_meta(name, domain="clean"), seed=i))
                        client.remove_card(name)
                    i += 1
                    stop.wait(0.1)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=traffic, daemon=True)
    with running_prometheus(prometheus_tools["prometheus"], f"127.0.0.1:{live.metrics_port}", tmp_path) as prom:
        worker.start()
        try:
            prom.wait_for('up{job="carddeck"} == 1')
            # CarddeckStoreStale needs a store out of sync for 5 minutes: promtool tests it, the tiny server's
            # test gives it series, and here the dashboard panels read the same two metrics from this server.
            counts = check_every_expression(prom, timeout=40, quiet=frozenset({"CarddeckStoreStale"}))
            wait_until(
                lambda: (
                    {a["labels"]["alertname"] for a in prom.api("alerts")["data"]["alerts"]}
                    >= {"CarddeckUncoveredShift", "CarddeckExpectedAccuracyLow"}
                ),
                "the shift alerts never became pending on 75% shifted traffic to random tiny cards",
            )
        finally:
            stop.set()
            worker.join(timeout=30)
    assert not errors, errors
    assert [n for k, n in counts.items() if "Routing share" in k] == [3]
