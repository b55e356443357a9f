"""No request can hurt a live server (issue 11): undecodable bodies, corrupted uploads, huge echoes, shutdown."""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from carddeck.deck import DeckStore, init_deck
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2_grpc
from carddeck.wire.proto_gen.inference import grpc_service_pb2 as oip
from carddeck.wire.proto_gen.inference import grpc_service_pb2_grpc as oip_grpc
from tests.observability.scrape import scrape, value
from tests.servers import ADMIN_TOKEN, ROOT, HeldUpload, card, make_deck, settled, start_server, wait_for

pytestmark = pytest.mark.integration
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
SERVICES = (
    pb.DESCRIPTOR.services_by_name["CardDeck"],
    oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
)


def unary_methods() -> list[tuple[str, str, str]]:
    """(service, rpc, request message) of every unary RPC of our API and the Open Inference Protocol."""
    return [
        (s.full_name, m.name, m.input_type.full_name)
        for s in SERVICES
        for m in s.methods
        if not m.client_streaming and not m.server_streaming
    ]


def undecodable(rng: random.Random) -> bytes:
    """Random bytes no protobuf message accepts: the first tag names field number 0, which is invalid."""
    body = bytearray(rng.randbytes(rng.randint(1, 256)))
    body[0] = rng.randint(0, 7)
    return bytes(body)


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024


def metrics_port(server) -> int:
    return int(re.search(r"metrics on http://\S+:(\d+)/metrics", server.log()).group(1))


def test_undecodable_bodies_are_invalid_argument_counted_and_free(tmp_path):
    """20,000 undecodable bodies over every unary RPC: no INTERNAL, exact counters, RSS flat."""
    server = start_server(make_deck(tmp_path / "deck"), tmp_path, "--metrics-host", "127.0.0.1", "--metrics-port", "0",
                          env={"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN})  # fmt: skip
    methods = unary_methods()
    assert len(methods) == 16
    rng = random.Random(11)
    sent = {(s, r): 0 for s, r, _ in methods}
    codes: dict[str, int] = {}
    try:
        with grpc.insecure_channel(server.address) as channel:
            calls = [(key[:2], key[2], channel.unary_unary(f"/{key[0]}/{key[1]}")) for key in methods]

            def burst(n: int) -> None:
                for i in range(n):
                    key, _, call = calls[i % len(calls)]
                    sent[key] += 1
                    try:
                        call(undecodable(rng), timeout=30, metadata=ADMIN)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                        if i < len(calls):
                            assert exc.details() == f"request body is not a valid {calls[i][1]}", exc.details()
                    codes[code] = codes.get(code, 0) + 1

            burst(2000)  # warm-up: thread pool, allocator arenas, metric children
            before = rss_mb(server.proc.pid)
            burst(20000)
            growth = rss_mb(server.proc.pid) - before
        samples = scrape(metrics_port(server))
    finally:
        server.terminate()
    assert codes == {"INVALID_ARGUMENT": 22000}
    assert growth < 5.0, f"server RSS grew {growth:.1f} MB over 20,000 undecodable bodies"
    for (service, rpc), n in sent.items():
        assert value(samples, "carddeck_requests_total", service=service, rpc=rpc, code="INVALID_ARGUMENT") == n
        assert value(samples, "carddeck_request_duration_seconds_count", service=service, rpc=rpc) == n
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log
    warned = len(re.findall(r"WARNING .*request body \(\d+ bytes\) is not a valid", log))
    assert 0 < warned < 500, warned  # said, but rate-limited: a client in a loop must not flood the log (#22)


def test_corrupted_card_uploads_are_rejected_never_internal(tmp_path):
    """300 seeded 8-byte corruptions of a real card: AddCard and RepositoryModelLoad never answer INTERNAL."""
    data = (ROOT / "models" / "cards" / "resnet20-augmix-lrr" / "1" / "model.onnx").read_bytes()
    server = start_server(make_deck(tmp_path / "deck"), tmp_path, env={"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN})
    rng = np.random.default_rng(2)
    codes: dict[str, int] = {}
    try:
        with grpc.insecure_channel(server.address) as channel:
            add, load = carddeck_pb2_grpc.CardDeckStub(channel).AddCard, oip_grpc.GRPCInferenceServiceStub(channel)
            for i in range(300):
                bad = bytearray(data)
                at = int(rng.integers(0, len(bad) - 8))
                bad[at : at + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
                request = oip.RepositoryModelLoadRequest(model_name="resnet20-augmix-lrr")
                request.parameters["file:model.onnx"].bytes_param = bytes(bad)
                for rpc in ("AddCard", "RepositoryModelLoad")[:: 1 - 2 * (i % 2)]:
                    try:
                        if rpc == "AddCard":
                            add(iter([pb.AddCardChunk(data=bytes(bad))]), timeout=60, metadata=ADMIN)
                        else:
                            load.RepositoryModelLoad(request, timeout=60, metadata=ADMIN)
                        code = "OK"
                    except grpc.RpcError as exc:
                        code = exc.code().name
                        assert "upload" not in exc.details() and str(tmp_path) not in exc.details(), exc.details()
                        assert code != "INTERNAL", f"{rpc}, corruption at byte {at}: {exc.details()}"
                    codes[code] = codes.get(code, 0) + 1
    finally:
        server.terminate()
    assert set(codes) <= {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OK"}, codes
    assert codes.get("INVALID_ARGUMENT", 0) > 500, codes  # nearly every corruption is caught before it is stored


def copy_default_deck(dest: Path) -> Path:
    return init_deck(dest).root  # a writable copy (the default deck itself is read-only)


def test_shutdown_is_bounded_by_the_drain_timeout(tmp_path):
    """Requests still in flight when the drain times out: a 4096-image Predict on the default deck and an
    AddCard held open (so one is in flight whatever the machine's speed). The process exits 0 soon after
    the drain timeout, without waiting for them: a card run cannot be interrupted, so nothing waits for one."""
    drain = 0.5
    deck = copy_default_deck(tmp_path / "deck")
    server = start_server(deck, tmp_path, "--drain-timeout-s", str(drain), "--metrics-host", "127.0.0.1",
                          "--metrics-port", "0", env={"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN})  # fmt: skip
    images = np.random.default_rng(0).integers(0, 256, (4096, 32, 32, 3), dtype=np.uint8)
    request = pb.PredictRequest(images=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=images.shape, data=images.tobytes()))
    outcome: list[str] = []

    def predict() -> None:
        with grpc.insecure_channel(server.address) as channel:
            try:
                carddeck_pb2_grpc.CardDeckStub(channel).Predict(request, timeout=120)
                outcome.append("OK")
            except grpc.RpcError as exc:
                outcome.append(exc.code().name)

    held = HeldUpload(server.address, card("held", "gaussian"))
    client = threading.Thread(target=predict, daemon=True)
    client.start()
    port = metrics_port(server)

    def in_flight(rpc: str) -> float:
        return value(scrape(port), "carddeck_requests_in_flight", service="carddeck.v1.CardDeck", rpc=rpc)

    try:
        wait_for(lambda: in_flight("Predict") and in_flight("AddCard"), "Predict and AddCard in flight")
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(60)
        exited_after = time.monotonic() - start
    finally:
        held.release()
    client.join(30)
    assert re.search(r"drain timeout: [12] requests still in flight are cancelled", server.log()), server.log()[-2000:]
    # "at once": well under what the 4096-image request takes; generous for a loaded machine
    assert exited_after < drain + 10, f"exited {exited_after:.1f} s after SIGTERM (--drain-timeout-s {drain})"
    assert code == 0 and held.wait() in ("UNAVAILABLE", "CANCELLED"), (code, held.outcome)
    assert outcome in (["OK"], ["UNAVAILABLE"], ["CANCELLED"]), outcome


def test_errors_cap_what_they_echo(server):
    """Values of 17,000 characters come back as the right error, not RESOURCE_EXHAUSTED from the header limit."""
    huge, wide = "n" * 17000, "é" * 17000
    images = pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1, 32, 32, 3], data=bytes(32 * 32 * 3))
    with grpc.insecure_channel(server.address) as channel:
        cd, stub = carddeck_pb2_grpc.CardDeckStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)
        infer = oip.ModelInferRequest(model_name="carddeck")
        infer.inputs.add(name=huge, datatype="UINT8", shape=[1, 32, 32, 3])
        infer.raw_input_contents.append(bytes(32 * 32 * 3))
        params = oip.ModelInferRequest(model_name="carddeck")  # only the parameter is wrong
        params.inputs.add(name="images", datatype="UINT8", shape=[1, 32, 32, 3])
        params.raw_input_contents.append(bytes(32 * 32 * 3))
        params.parameters[wide].string_param = "x"
        shape = pb.PredictRequest(images=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1] * 5000, data=b""))
        cases = [
            (cd.Predict, pb.PredictRequest(images=images, policy=huge), "INVALID_ARGUMENT"),
            (cd.Predict, pb.PredictRequest(images=images, policy=wide), "INVALID_ARGUMENT"),
            (cd.Predict, shape, "INVALID_ARGUMENT"),
            (cd.GetCard, pb.GetCardRequest(name=huge), "INVALID_ARGUMENT"),
            (cd.RemoveCard, pb.RemoveCardRequest(name=wide), "INVALID_ARGUMENT"),
            (stub.ModelMetadata, oip.ModelMetadataRequest(name=wide), "NOT_FOUND"),
            (stub.ModelMetadata, oip.ModelMetadataRequest(name="carddeck", version=huge), "NOT_FOUND"),
            (stub.ModelInfer, infer, "INVALID_ARGUMENT"),
            (stub.ModelInfer, params, "INVALID_ARGUMENT"),
            (stub.RepositoryModelLoad, oip.RepositoryModelLoadRequest(model_name=huge), "INVALID_ARGUMENT"),
        ]
        for call, request, expected in cases:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10, metadata=ADMIN)
            assert info.value.code().name == expected, (call, info.value.code(), info.value.details()[:200])
            assert len(info.value.details()) < 400 and "..." in info.value.details(), info.value.details()


def test_the_deck_model_name_is_reserved(server):
    with grpc.insecure_channel(server.address) as channel:
        cd, stub = carddeck_pb2_grpc.CardDeckStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            cd.AddCard(iter([pb.AddCardChunk(data=card("carddeck", "gaussian"))]), timeout=30, metadata=ADMIN)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'carddeck' is reserved" in info.value.details()
        names = [m.name for m in stub.RepositoryIndex(oip.RepositoryIndexRequest(), timeout=10).models]
        assert names.count("carddeck") == 1


def test_a_retried_add_is_ok_and_changes_nothing(server):
    data = card("retry1", "gaussian", seed=21)
    with grpc.insecure_channel(server.address) as channel:
        cd, stub = carddeck_pb2_grpc.CardDeckStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)
        first = cd.AddCard(iter([pb.AddCardChunk(data=data)]), timeout=30, metadata=ADMIN)
        version = settled(server)  # the server's refit for the new cards, stored: nothing else changes it now
        again = cd.AddCard(iter([pb.AddCardChunk(data=data)]), timeout=30, metadata=ADMIN)
        assert not first.already_present and again.already_present
        assert again.deck_version == version and again.card.name == "retry1"
        load = oip.RepositoryModelLoadRequest(model_name="retry1")
        load.parameters["file:model.onnx"].bytes_param = data
        stub.RepositoryModelLoad(load, timeout=30, metadata=ADMIN)  # OK: the same card, already there
        assert cd.ListCards(pb.ListCardsRequest(), timeout=10).deck_version == version
        with pytest.raises(grpc.RpcError) as info:
            cd.AddCard(iter([pb.AddCardChunk(data=card("retry1", "gaussian", seed=22))]), timeout=30, metadata=ADMIN)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "other bytes" in info.value.details()
        cd.RemoveCard(pb.RemoveCardRequest(name="retry1"), timeout=30, metadata=ADMIN)


def test_crash_debris_is_removed_at_start_and_after_changes(tmp_path):
    """kill -9 mid-change leaves temporary files and orphan card dirs; the next server removes them."""
    deck = make_deck(tmp_path / "deck")
    env = {"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN}
    blobs = [card(f"c{i}", "augmix", version=v, seed=i) for i in range(2) for v in (1, 2, 3)]
    for run in range(3):  # real crashes, somewhere inside adds and removes
        victim = start_server(deck, tmp_path, env=env)
        with grpc.insecure_channel(victim.address) as channel:
            cd = carddeck_pb2_grpc.CardDeckStub(channel)
            for blob in blobs[run:]:
                future = cd.AddCard.future(iter([pb.AddCardChunk(data=blob)]), timeout=30, metadata=ADMIN)
            time.sleep(0.05 * run)
            victim.proc.kill()
            victim.proc.wait()
            future.cancel()
    # and what such a crash leaves, for certain: a half-written file and a card dir no manifest names
    (deck / ".manifest.json.k9.tmp").write_bytes(b"{")
    (deck / "cards/ghost/7").mkdir(parents=True)
    (deck / "cards/ghost/7/.model.onnx.k9.tmp").write_bytes(b"\x08")
    (deck / "cards/recent/1").mkdir(parents=True)  # removed by another replica a moment ago
    (deck / "cards/recent/1/.removed").write_bytes(b"")

    def debris() -> list[str]:
        named = {c.path for c in DeckStore(deck).manifest().cards}
        tmp = [p for p in deck.rglob("*.tmp")]
        orphans = [p for p in deck.glob("cards/*/*") if p.relative_to(deck).as_posix() not in named]
        return sorted(p.relative_to(deck).as_posix() for p in tmp + orphans)

    assert debris()
    server = start_server(deck, tmp_path, "--debris-grace-s", "30", env=env)
    try:
        assert debris() == ["cards/recent/1"]  # what a replica may still be loading stays for the grace period
        with grpc.insecure_channel(server.address) as channel:
            cd = carddeck_pb2_grpc.CardDeckStub(channel)
            cd.RemoveCard(pb.RemoveCardRequest(name="a1"), timeout=30, metadata=ADMIN)
            assert (deck / "cards/a1/1/model.onnx").exists()  # a replica on the old manifest may still read it
    finally:
        server.terminate()
    for mark in deck.glob("cards/*/*/.removed"):  # the grace period has passed
        os.utime(mark, (0, 0))
    server = start_server(deck, tmp_path, "--debris-grace-s", "30", env=env)
    server.terminate()
    assert debris() == []
    assert [c.name for c in DeckStore(deck).list_cards()][:1] == ["g1"]


def test_removing_a_card_that_changes_the_default_policy_says_so(tmp_path):
    deck = copy_default_deck(tmp_path / "deck")
    policy = DeckStore(deck).manifest().gate["policy"]  # what build.py configured (needs its router)
    server = start_server(deck, tmp_path, "--metrics-host", "127.0.0.1", "--metrics-port", "0",
                          env={"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN})  # fmt: skip
    try:
        with grpc.insecure_channel(server.address) as channel:
            cd = carddeck_pb2_grpc.CardDeckStub(channel)
            listed = cd.ListCards(pb.ListCardsRequest(), timeout=10)
            assert listed.default_policy == policy and listed.default_policy_note == ""
            s = scrape(metrics_port(server))
            assert value(s, "carddeck_default_policy_info", policy=policy, configured=policy) == 1
            removed = cd.RemoveCard(pb.RemoveCardRequest(name="resnet20-gaussian-lrr"), timeout=60, metadata=ADMIN)
            assert removed.default_policy == "nearest-domain"
            assert f"from '{policy}' to 'nearest-domain'" in removed.default_policy_note
            assert "resnet20-gaussian-lrr/1" in removed.default_policy_note
            listed = cd.ListCards(pb.ListCardsRequest(), timeout=10)
            assert listed.default_policy == "nearest-domain"
            assert "calibrated" in listed.default_policy_note and "carddeck calibrate" in listed.default_policy_note
            s = scrape(metrics_port(server))
            assert value(s, "carddeck_default_policy_info", policy="nearest-domain", configured=policy) == 1
            assert value(s, "carddeck_default_policy_info", policy=policy, configured=policy) == 0
            quiet = cd.RemoveCard(pb.RemoveCardRequest(name="resnet20-augmix-lrr"), timeout=60, metadata=ADMIN)
            assert quiet.default_policy == "nearest-domain" and quiet.default_policy_note == ""
    finally:
        server.terminate()
    assert re.search(rf"WARNING .*the default policy changed from '{policy}' to 'nearest-domain'", server.log())


def test_undecodable_bodies_on_streams_and_health_are_invalid_argument(server):
    rng = random.Random(5)
    calls = {
        "/grpc.health.v1.Health/Check": "unary_unary",
        "/grpc.health.v1.Health/Watch": "unary_stream",
        "/carddeck.v1.CardDeck/AddCard": "stream_unary",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "stream_stream",
    }
    with grpc.insecure_channel(server.address) as channel:
        for method, kind in calls.items():
            call = getattr(channel, kind)(method)
            body = undecodable(rng)
            with pytest.raises(grpc.RpcError) as info:
                answer = call(iter([body]) if kind.startswith("stream") else body, timeout=10, metadata=ADMIN)
                list(answer) if kind.endswith("stream") else None
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value.details())
            assert info.value.details().startswith("request body is not a valid "), info.value.details()
    assert "Traceback" not in server.log()
