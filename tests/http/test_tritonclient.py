"""``tritonclient.http``, unchanged, against a live ``carddeck serve``: the binding is wire-compatible."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from carddeck.deck import Deck
from tests.servers import noisy_images, smooth_images

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.url)
    yield c
    c.close()


def images(dtype: str, n: int = 4) -> np.ndarray:
    u8 = np.concatenate([noisy_images(n // 2, seed=3), smooth_images(n - n // 2, seed=4)])
    return u8 if dtype == "UINT8" else u8.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)


def test_health_and_metadata(client, server):
    deck = Deck.open(server.process.deck)
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "carddeck" and "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready("carddeck") and client.is_model_ready("g1", "1")
    assert not client.is_model_ready("g1", "7") and not client.is_model_ready("nope")
    model = client.get_model_metadata("carddeck")
    assert model["versions"] == [str(deck.version)]
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert [o["name"] for o in model["outputs"]] == ["probabilities", "labels", "routing_weights", "out_of_scope"]
    card = client.get_model_metadata("a1", "1")
    assert card["platform"] == "onnxruntime_onnx"
    assert [o["name"] for o in card["outputs"]] == ["probabilities", "labels"]


def test_config_and_statistics_equal_the_grpc_answers(client, server):
    import tritonclient.grpc as tg
    from google.protobuf import json_format

    from carddeck.wire.proto_gen.inference import model_config_pb2 as mc

    x = images("UINT8", 2)
    tensor = triton.InferInput("images", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)
    client.infer("a1", [tensor])
    over_grpc = tg.InferenceServerClient(server.process.address)
    for model, version in (("carddeck", ""), ("a1", "1")):
        config = client.get_model_config(model, version)
        assert config["input"][0]["dims"] == [3, 32, 32] and config["max_batch_size"] == 64
        want = over_grpc.get_model_config(model, version).config
        assert json_format.ParseDict(config, mc.ModelConfig()) == mc.ModelConfig.FromString(want.SerializeToString())
    stats = client.get_inference_statistics("a1")["model_stats"]
    grpc_stats = over_grpc.get_inference_statistics("a1").model_stats
    assert [s["inference_count"] for s in stats] == [s.inference_count for s in grpc_stats] and stats[0][
        "inference_count"
    ] >= 2
    every = client.get_inference_statistics()["model_stats"]
    assert [s["name"] for s in every] == ["carddeck", "g1", "a1"]
    over_grpc.close()


@pytest.mark.parametrize("dtype", ["FP32", "UINT8"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_infer_equals_the_in_process_deck(client, server, dtype, binary_in, binary_out):
    x = images(dtype)
    deck = Deck.open(server.process.deck)
    want = deck.predict(x, policy="soft", per_sample=True)
    tensor = triton.InferInput("images", list(x.shape), dtype)
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary_out) for n in ("labels", "probabilities")]
    result = client.infer(
        "carddeck", [tensor], outputs=outputs, request_id="r-7", parameters={"policy": "soft", "per_sample": True}
    )
    response = result.get_response()
    assert response["id"] == "r-7" and response["model_version"] == str(deck.version)
    assert [o["name"] for o in response["outputs"]] == ["labels", "probabilities"]  # the order asked
    assert all(("data" in o) != binary_out for o in response["outputs"])
    np.testing.assert_allclose(result.as_numpy("probabilities"), want.probabilities, atol=1e-6)
    assert np.array_equal(result.as_numpy("labels"), want.labels)
    assert response["parameters"]["selected_cards"] == ",".join(want.routing.selected)
    assert response["parameters"]["policy"] == "soft"


def test_every_output_in_binary_by_default_and_cards_as_models(client, server):
    x = images("UINT8", 3)
    deck = Deck.open(server.process.deck)
    tensor = triton.InferInput("images", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)
    result = client.infer("carddeck", [tensor])  # no outputs named: tritonclient asks binary_data_output
    want = deck.predict(x)
    np.testing.assert_allclose(result.as_numpy("routing_weights"), want.routing.weights, atol=1e-7)
    assert np.array_equal(result.as_numpy("labels"), want.labels)
    card = client.infer("g1", [tensor], model_version="1")
    np.testing.assert_allclose(card.as_numpy("probabilities"), deck.run_card("g1", x), atol=1e-6)
    assert card.get_response()["model_version"] == "1"


def test_compressed_requests(client, server):
    x = images("FP32", 2)
    tensor = triton.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    plain = client.infer("carddeck", [tensor]).as_numpy("probabilities")
    for algorithm in ("gzip", "deflate"):
        got = client.infer("carddeck", [tensor], request_compression_algorithm=algorithm).as_numpy("probabilities")
        np.testing.assert_array_equal(got, plain)


@pytest.mark.parametrize(
    ("model", "version", "dtype", "shape", "status", "needle"),
    [
        ("nope", "", "UINT8", [1, 32, 32, 3], "404", "no model 'nope'"),
        ("g1", "9", "UINT8", [1, 32, 32, 3], "404", "version 1, not '9'"),
        ("carddeck", "", "INT32", [1, 32, 32, 3], "400", "inputs[0].datatype"),
        ("carddeck", "", "UINT8", [1, 16, 16, 3], "400", "[N, 32, 32, 3]"),
        ("carddeck", "", "UINT8", [65, 32, 32, 3], "413", "at most 64"),
    ],
)
def test_errors_reach_the_client_with_their_status(client, model, version, dtype, shape, status, needle):
    x = np.zeros(shape, np.int32 if dtype == "INT32" else np.uint8)
    tensor = triton.InferInput("images", shape, dtype)
    tensor.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, [tensor], model_version=version)
    assert info.value.status() == status and needle in info.value.message()
