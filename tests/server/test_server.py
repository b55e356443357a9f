"""Integration: a real ``carddeck serve`` process on a free loopback port, real gRPC clients."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from carddeck.client.api import CardDeckClient
from carddeck.deck import Deck
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2_grpc
from carddeck.wire.proto_gen.inference import grpc_service_pb2 as oip
from carddeck.wire.proto_gen.inference import grpc_service_pb2_grpc as oip_grpc
from tests.observability.scrape import scrape, value
from tests.servers import (
    ADMIN_TOKEN,
    ROOT,
    HeldUpload,
    card,
    make_deck,
    noisy_images,
    settled,
    smooth_images,
    start_server,
    wait_for,
)  # fmt: skip

pytestmark = pytest.mark.integration
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def stubs(address: str):
    channel = grpc.insecure_channel(address)
    return channel, carddeck_pb2_grpc.CardDeckStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)


def code_of(call, *args, **kw) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=10, **kw)
    return info.value.code()


def test_predictions_equal_the_in_process_deck(server):
    deck = Deck.open(server.deck)
    with CardDeckClient(server.address) as client:
        cases = [smooth_images(5), noisy_images(4), (smooth_images(3).transpose(0, 3, 1, 2) / np.float32(255))]
        for images in cases:
            for policy, per_sample in (("", False), ("uniform", False), ("soft", True)):
                got = client.predict(images, policy=policy, per_sample=per_sample)
                want = deck.predict(images, policy=policy or None, per_sample=per_sample)
                np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-6)
                assert np.array_equal(got.labels, want.labels)
                assert got.routing["selected"] == list(want.routing.selected)
                np.testing.assert_allclose(got.routing["weights"], want.routing.weights, atol=1e-7)
        assert client.predict(smooth_images(2)).routing["selected"] == ["a1"]
        assert client.route(noisy_images(2))["selected"] == ["g1"]


def _oip_request(model: str, images: np.ndarray) -> oip.ModelInferRequest:
    datatype = "UINT8" if images.dtype == np.uint8 else "FP32"
    request = oip.ModelInferRequest(model_name=model, id="req-1")
    request.inputs.add(name="images", datatype=datatype, shape=images.shape)
    request.raw_input_contents.append(np.ascontiguousarray(images).tobytes())
    return request


def test_oip_model_infer_round_trips_fp32_and_uint8(server):
    deck = Deck.open(server.deck)
    channel, _, stub = stubs(server.address)
    with channel:
        u8 = noisy_images(3)
        f32 = u8.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
        for images in (u8, f32):
            r = stub.ModelInfer(_oip_request("carddeck", images), timeout=10)
            assert r.id == "req-1" and r.model_version == str(deck.version)
            names = [o.name for o in r.outputs]
            assert names == ["probabilities", "labels", "routing_weights"]
            probs = np.frombuffer(r.raw_output_contents[0], "<f4").reshape(r.outputs[0].shape)
            labels = np.frombuffer(r.raw_output_contents[1], "<i8")
            want = deck.predict(images)
            np.testing.assert_allclose(probs, want.probabilities, atol=1e-6)
            assert np.array_equal(labels, want.labels)
            assert r.parameters["selected_cards"].string_param == "g1"
            card_r = stub.ModelInfer(_oip_request("a1", images), timeout=10)
            card_probs = np.frombuffer(card_r.raw_output_contents[0], "<f4").reshape(-1, 10)
            np.testing.assert_allclose(card_probs, deck.run_card("a1", images), atol=1e-6)
        assert stub.ServerLive(oip.ServerLiveRequest()).live
        assert stub.ServerReady(oip.ServerReadyRequest()).ready
        assert stub.ModelReady(oip.ModelReadyRequest(name="g1")).ready
        for unknown in (oip.ModelReadyRequest(name="nope"), oip.ModelReadyRequest(name="g1", version="7")):
            assert code_of(stub.ModelReady, unknown) == grpc.StatusCode.NOT_FOUND  # as Triton, and HTTP's 404
        index = {m.name for m in stub.RepositoryIndex(oip.RepositoryIndexRequest()).models}
        assert {"carddeck", "g1", "a1"} <= index
        stats = stub.ModelStatistics(oip.ModelStatisticsRequest(name="carddeck")).model_stats[0]
        assert stats.inference_count >= 6 and stats.inference_stats.success.count >= 2


def test_tritonclient_talks_to_the_server(server):
    import tritonclient.grpc as tc

    deck = Deck.open(server.deck)
    client = tc.InferenceServerClient(server.address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("carddeck")
    with pytest.raises(tc.InferenceServerException, match="nope") as unknown:  # what Triton's own server does
        client.is_model_ready("nope")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert "statistics" in client.get_server_metadata().extensions
    assert client.get_model_config("carddeck").config.input[0].dims == [3, 32, 32]
    images = smooth_images(4)
    for arr, datatype in ((images, "UINT8"), (images.transpose(0, 3, 1, 2).astype(np.float32) / 255, "FP32")):
        inp = tc.InferInput("images", list(arr.shape), datatype)
        inp.set_data_from_numpy(np.ascontiguousarray(arr))
        result = client.infer("carddeck", [inp], parameters={"policy": "uniform"})
        want = deck.predict(arr, policy="uniform")
        np.testing.assert_allclose(result.as_numpy("probabilities"), want.probabilities, atol=1e-6)
        assert np.array_equal(result.as_numpy("labels"), want.labels)
    assert client.get_inference_statistics("carddeck").model_stats[0].inference_count > 0
    client.close()


def test_each_bad_input_class_gets_its_status_code(server):
    channel, cd, stub = stubs(server.address)
    good = smooth_images(1)
    ok = pb.Tensor(dtype=pb.DTYPE_UINT8, shape=good.shape, data=good.tobytes())
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    with channel:
        bad_requests = [
            pb.PredictRequest(images=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1, 32, 32, 3], data=b"\0" * 10)),
            pb.PredictRequest(images=pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1, 32, 32, 3], data=good.tobytes())),
            pb.PredictRequest(images=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1, 16, 16, 3], data=b"\0" * 768)),
            pb.PredictRequest(images=ok, policy="best-of-all"),
            pb.PredictRequest(),
        ]  # fmt: skip
        for request in bad_requests:
            with pytest.raises(grpc.RpcError) as info:
                cd.Predict(request, timeout=10)
            assert info.value.code() == invalid, request
            assert info.value.details()  # names the field and what is accepted
        nan = np.full((1, 3, 32, 32), np.nan, np.float32)
        with pytest.raises(grpc.RpcError) as info:
            cd.Predict(pb.PredictRequest(images=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=nan.shape, data=nan.tobytes())))
        assert info.value.code() == invalid and "NaN" in info.value.details()
        too_many = np.zeros((257, 1, 1, 3), np.uint8)
        big = pb.Tensor(dtype=pb.DTYPE_UINT8, shape=too_many.shape, data=too_many.tobytes())
        assert code_of(cd.Predict, pb.PredictRequest(images=big)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert code_of(cd.GetCard, pb.GetCardRequest(name="nope")) == grpc.StatusCode.NOT_FOUND
        assert code_of(cd.GetCard, pb.GetCardRequest(name="../etc")) == invalid
        assert code_of(cd.RemoveCard, pb.RemoveCardRequest(name="nope"), metadata=ADMIN) == grpc.StatusCode.NOT_FOUND
        assert code_of(cd.RemoveCard, pb.RemoveCardRequest(name="../../x"), metadata=ADMIN) == invalid
        assert code_of(stub.ModelInfer, _oip_request("nope", good)) == grpc.StatusCode.NOT_FOUND
        bad_oip = _oip_request("carddeck", good)
        bad_oip.inputs[0].datatype = "INT32"
        assert code_of(stub.ModelInfer, bad_oip) == invalid
        huge = iter([pb.AddCardChunk(data=b"\0" * (1 << 20)), pb.AddCardChunk(data=b"\0" * 10)])
        assert code_of(cd.AddCard, huge, metadata=ADMIN) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the server is still fine
        assert cd.Predict(
            pb.PredictRequest(images=pb.Tensor(dtype=pb.DTYPE_UINT8, shape=good.shape, data=good.tobytes()))
        )


def test_admin_rpcs_without_the_token_are_unauthenticated(server):
    channel, cd, stub = stubs(server.address)
    unauth = grpc.StatusCode.UNAUTHENTICATED
    wrong = (("authorization", "Bearer wrong"),)
    with channel:
        for metadata in ((), wrong):
            chunks = iter([pb.AddCardChunk(data=card("x1", "gaussian"))])
            assert code_of(cd.AddCard, chunks, metadata=metadata) == unauth
            assert code_of(cd.RemoveCard, pb.RemoveCardRequest(name="g1"), metadata=metadata) == unauth
            load = oip.RepositoryModelLoadRequest(model_name="x1")
            assert code_of(stub.RepositoryModelLoad, load, metadata=metadata) == unauth
            unload = oip.RepositoryModelUnloadRequest(model_name="g1")
            assert code_of(stub.RepositoryModelUnload, unload, metadata=metadata) == unauth
        assert {c.name for c in cd.ListCards(pb.ListCardsRequest()).cards} == {"g1", "a1"}


def test_a_rejected_upload_leaves_the_deck_untouched(server):
    with CardDeckClient(server.address, token=ADMIN_TOKEN) as client:
        before = client.list_cards()
        # unreadable: INVALID_ARGUMENT; g1/1 again with other bytes: FAILED_PRECONDITION (the README's contract)
        for bad, code in ((b"garbage", grpc.StatusCode.INVALID_ARGUMENT),
                          (card("g1", "gaussian"), grpc.StatusCode.FAILED_PRECONDITION)):  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                client.add_card(bad)
            assert info.value.code() == code, info.value.details()
        after = client.list_cards()
        assert after.deck_version == before.deck_version
        assert [c.name for c in after.cards] == [c.name for c in before.cards]


def test_add_card_under_concurrent_predict_load_loses_no_request(server):
    stop = threading.Event()
    failures: list[BaseException] = []
    served = [0]

    def load(seed: int) -> None:
        with CardDeckClient(server.address) as client:
            while not stop.is_set():
                try:
                    r = client.predict(noisy_images(2, seed=seed) if seed % 2 else smooth_images(2, seed=seed))
                    assert r.probabilities.shape == (2, 10)
                    served[0] += 1
                except BaseException as exc:  # any failure is the finding
                    failures.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()

    def serves(more: int) -> None:  # wait until ``more`` further requests were answered (or one failed)
        target = served[0] + more
        wait_for(lambda: served[0] >= target or failures, f"{more} more requests served")

    try:
        with CardDeckClient(server.address, token=ADMIN_TOKEN) as admin:
            serves(6)
            version = admin.list_cards().deck_version
            added = admin.add_card(card("g2", "gaussian", seed=5, signature=None))  # signed from calibration.npz
            try:
                assert added.card.name == "g2" and len(added.card.signature) > 0
                assert added.deck_version == version + 1
                serves(6)
            finally:  # after the server's own refit for the new cards, stored as a version of its own
                refitted = settled(server)
                assert admin.remove_card("g2").deck_version == refitted + 1
            serves(6)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures[:3]


def test_oip_repository_load_and_unload_change_the_deck(server):
    channel, _, stub = stubs(server.address)
    with channel:
        load = oip.RepositoryModelLoadRequest(model_name="g4")
        load.parameters["file:model.onnx"].bytes_param = card("g4", "gaussian", seed=4)
        stub.RepositoryModelLoad(load, metadata=ADMIN, timeout=30)
        assert stub.ModelReady(oip.ModelReadyRequest(name="g4")).ready
        mismatch = oip.RepositoryModelLoadRequest(model_name="other")
        mismatch.parameters["file:model.onnx"].bytes_param = card("g5", "gaussian")
        assert code_of(stub.RepositoryModelLoad, mismatch, metadata=ADMIN) == grpc.StatusCode.INVALID_ARGUMENT
        stub.RepositoryModelUnload(oip.RepositoryModelUnloadRequest(model_name="g4"), metadata=ADMIN, timeout=30)
        assert code_of(stub.ModelReady, oip.ModelReadyRequest(name="g4")) == grpc.StatusCode.NOT_FOUND


def test_a_manifest_from_another_replica_is_served(server):
    from carddeck.deck import DeckStore

    with CardDeckClient(server.address, token=ADMIN_TOKEN) as client:
        DeckStore(server.deck).add_card(card("g6", "gaussian", seed=6))  # another replica wrote it
        try:
            wait_for(lambda: "g6" in [c.name for c in client.list_cards().cards], "g6 to be served", timeout=30)
        finally:
            client.remove_card("g6")  # the module's server is shared


def test_the_server_runs_blas_on_one_thread(server):
    # carddeck.deck.runtime.one_blas_thread, called by serve(): a second BLAS thread spun through the gate's
    # small products and cost a third of the server's CPU at batch 1 (tests/deck/test_runtime.py checks the call)
    assert re.search(r"BLAS on the calling thread \(1 thread|BLAS threads as \w+=", server.log())


def test_health_and_reflection(server):
    channel = grpc.insecure_channel(server.address)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "carddeck.v1.CardDeck", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(responses).list_services_response.service}
        assert {"carddeck.v1.CardDeck", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        responses = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")])
        )
        assert next(responses).file_descriptor_response.file_descriptor_proto


def test_cli_predict_and_deck_list(server, tmp_path):
    images = noisy_images(2)
    np.save(tmp_path / "batch.npy", images)
    import PIL.Image as pil

    pil.fromarray(smooth_images(1)[0]).resize((64, 64)).save(tmp_path / "blob.png")
    cmd = [sys.executable, "-m", "carddeck"]
    files = [str(tmp_path / "batch.npy"), str(tmp_path / "blob.png")]
    out = subprocess.run(
        [*cmd, "predict", "--server", server.address, "--json", *files],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    import json

    results = json.loads(out.stdout)
    want = Deck.open(server.deck).predict(images)
    assert [r["label"] for r in results[:2]] == want.labels.tolist()
    assert results[2]["cards"] == ["a1"]
    listing = subprocess.run(
        [*cmd, "deck", "list", "--server", server.address], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0 and "g1/1" in listing.stdout and "a1/1" in listing.stdout
    denied = subprocess.run(
        [*cmd, "deck", "remove", "g1", "--server", server.address],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
    (tmp_path / "g7.onnx").write_bytes(card("g7", "gaussian", seed=7))
    admin_env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN}
    for action in (["add", str(tmp_path / "g7.onnx")], ["remove", "g7"]):
        done = subprocess.run(
            [*cmd, "deck", *action, "--server", server.address],
            cwd=ROOT, capture_output=True, text=True, timeout=60, env=admin_env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert ("added g7/1" if action[0] == "add" else "removed g7") in done.stdout


def test_sigterm_drains_with_health_not_serving(tmp_path):
    """No admin token here: admin RPCs are disabled. On SIGTERM a Watch sees NOT_SERVING, work sent
    during the shutdown delay is still served, and the process exits 0."""
    srv = start_server(make_deck(tmp_path / "deck"), tmp_path, "--shutdown-delay-s", "1.0", "--drain-timeout-s", "5")
    try:
        channel, cd, stub = stubs(srv.address)
        with channel:
            chunks = iter([pb.AddCardChunk(data=card("x1", "gaussian"))])
            assert code_of(cd.AddCard, chunks, metadata=ADMIN) == grpc.StatusCode.UNAUTHENTICATED
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            srv.proc.send_signal(__import__("signal").SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert not stub.ServerReady(oip.ServerReadyRequest(), timeout=5).ready
            images = smooth_images(2)
            tensor = pb.Tensor(dtype=pb.DTYPE_UINT8, shape=images.shape, data=images.tobytes())
            r = cd.Predict(pb.PredictRequest(images=tensor), timeout=10)
            assert len(r.labels) == 2  # still served during the shutdown delay
        assert srv.proc.wait(20) == 0
        assert "drained" in srv.log()
    finally:
        srv.terminate()


def test_grpc_work_is_refused_once_the_drain_began(tmp_path):
    """An AddCard held open keeps the drain waiting; meanwhile Predict, Route and ModelInfer are UNAVAILABLE
    (retry on another replica), health already NOT_SERVING, and the held upload still finishes."""
    srv = start_server(make_deck(tmp_path / "deck"), tmp_path, "--drain-timeout-s", "120", "--metrics-host",
                       "127.0.0.1", "--metrics-port", "0", env={"CARDDECK_ADMIN_TOKEN": ADMIN_TOKEN})  # fmt: skip
    held = HeldUpload(srv.address, card("held", "gaussian", seed=11))
    images = smooth_images(2)
    tensor = pb.Tensor(dtype=pb.DTYPE_UINT8, shape=images.shape, data=images.tobytes())
    try:
        port = int(re.search(r"metrics on http://\S+:(\d+)/metrics", srv.log()).group(1))
        wait_for(lambda: value(scrape(port), "carddeck_requests_in_flight", service="carddeck.v1.CardDeck",
                               rpc="AddCard"), "the held AddCard to be in flight")  # fmt: skip
        channel, cd, stub = stubs(srv.address)
        with channel:
            assert len(cd.Predict(pb.PredictRequest(images=tensor), timeout=30).labels) == 2
            srv.proc.send_signal(signal.SIGTERM)

            def refused() -> bool:
                try:
                    cd.Predict(pb.PredictRequest(images=tensor), timeout=30)
                    return False
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in exc.details(), exc
                    return True

            wait_for(refused, "Predict to be refused once the drain began", timeout=30)
            assert code_of(cd.Route, pb.RouteRequest(images=tensor)) == grpc.StatusCode.UNAVAILABLE
            assert code_of(stub.ModelInfer, _oip_request("carddeck", images)) == grpc.StatusCode.UNAVAILABLE
            assert code_of(stub.ModelInfer, _oip_request("g1", images)) == grpc.StatusCode.UNAVAILABLE
            assert not stub.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
        assert srv.proc.poll() is None  # still draining: the held upload is in flight
        held.release()
        assert held.wait() == "OK" and srv.proc.wait(60) == 0
        assert "drained" in srv.log()
    finally:
        held.release()
        srv.terminate()


def _self_signed(tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return tmp_path / "cert.pem", tmp_path / "key.pem"


def test_tls_and_inference_token(tmp_path):
    cert, key = _self_signed(tmp_path)
    srv = start_server(
        make_deck(tmp_path / "deck"), tmp_path, "--tls-cert", str(cert), "--tls-key", str(key),
        env={"CARDDECK_INFERENCE_TOKEN": "inf-token"},
    )  # fmt: skip
    try:
        address = srv.address.replace("127.0.0.1", "localhost")
        with CardDeckClient(address, tls_ca=cert, token="inf-token") as client:
            assert client.predict(smooth_images(1)).routing["selected"] == ["a1"]
        with CardDeckClient(address, tls_ca=cert) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.predict(smooth_images(1))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with CardDeckClient(address, timeout=5) as plaintext, pytest.raises(grpc.RpcError):
            plaintext.list_cards()  # a plaintext client cannot talk to a TLS server
    finally:
        assert srv.terminate() == 0


def test_oip_grpc_refuses_what_it_would_ignore_as_http_does(server):
    """Mutants: Triton's `classification` output parameter ignored over gRPC (the caller gets probabilities
    where it asked for class strings; HTTP refuses it); a shared-memory input read as an empty tensor;
    contents sent beside raw_input_contents silently dropped (Triton refuses the pair)."""
    import tritonclient.grpc as tc
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    images = smooth_images(1)
    http_port = re.search(r"HTTP \(Open Inference Protocol, /v2\) on \S+:(\d+)", server.log()).group(1)
    messages = []
    for module, url in ((tc, server.address), (th, f"127.0.0.1:{http_port}")):
        client = module.InferenceServerClient(url)
        inp = module.InferInput("images", list(images.shape), "UINT8")
        inp.set_data_from_numpy(images)
        with pytest.raises(InferenceServerException) as info:
            client.infer("carddeck", [inp], outputs=[module.InferRequestedOutput("probabilities", class_count=2)])
        assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "400"), info.value.status()
        messages.append(info.value.message())
        client.close()
    assert "parameters['classification']: not supported" in messages[0] and messages[0] in messages[1], messages
    messages = []  # an input in Triton's shared memory: the data is not in the request (was: "0 values do not match")
    for module, url in ((tc, server.address), (th, f"127.0.0.1:{http_port}")):
        client = module.InferenceServerClient(url)
        inp = module.InferInput("images", list(images.shape), "UINT8")
        inp.set_shared_memory("region0", images.nbytes)
        with pytest.raises(InferenceServerException) as info:
            client.infer("carddeck", [inp])
        assert info.value.status() in ("StatusCode.INVALID_ARGUMENT", "400"), info.value.status()
        messages.append(info.value.message())
        client.close()
    assert "shared memory is not supported" in messages[0] and messages[0] in messages[1], messages
    channel, _, stub = stubs(server.address)
    with channel:
        both = _oip_request("carddeck", images)
        both.inputs[0].contents.uint_contents.extend(images.ravel().tolist())
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(both, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not both" in info.value.details()
        assert stub.ModelInfer(_oip_request("carddeck", images), timeout=10).outputs  # either alone is fine
