import numpy as np
import pytest

from carddeck.card import InputSpec
from carddeck.errors import InvalidInput, TooLarge
from carddeck.server import convert
from carddeck.serving.codec import InferResult
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb
from carddeck.wire.proto_gen.inference import grpc_service_pb2 as oip

SPEC4 = InputSpec(height=4, width=4)


def test_tensor_round_trip_both_layouts():
    u8 = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    f32 = np.random.default_rng(0).random((2, 3, 4, 4), dtype=np.float32)
    for arr in (u8, f32):
        back = convert.tensor(convert.tensor_from_images(arr)).images(SPEC4, 8)
        assert back.dtype == arr.dtype and np.array_equal(back, arr)


@pytest.mark.parametrize(
    ("tensor", "needle"),
    [
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1, 4, 4, 3], data=b"\0" * 48), "images.dtype"),
        (pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[4, 4, 3], data=b"\0" * 48), "images.shape"),
        (pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1, 0, 4, 3], data=b""), "images.shape"),
        (pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1, 4, 4, 3], data=b"\0" * 47), "images.data"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 3, 4, 4], data=b"\0" * 48), "images.data"),
    ],
)
def test_malformed_tensors_name_the_field(tensor, needle):
    with pytest.raises(InvalidInput, match=needle) as info:
        convert.tensor(tensor).images(SPEC4, 8)
    assert not isinstance(info.value, TooLarge)


def test_rejections_name_the_decks_own_input_contract():
    gray = InputSpec(height=28, width=28, channels=1, value_range=(-1.0, 1.0), mean=(0.0,), std=(1.0,))
    bad = pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1, 28, 28, 1], data=b"\0" * 784)
    with pytest.raises(InvalidInput) as info:
        convert.tensor(bad).images(gray, 8)
    assert "[N, 28, 28, 1]" in str(info.value) and "[N, 1, 28, 28] in [-1, 1]" in str(info.value)


def test_too_many_images_is_too_large():
    t = pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[9, 1, 1, 3], data=b"\0" * 27)
    with pytest.raises(TooLarge, match="at most 8"):
        convert.tensor(t).images(SPEC4, 8)


SPEC = InputSpec(height=2, width=2)


def oip_request(datatype: str, shape, raw: bytes | None = None, **contents) -> oip.ModelInferRequest:
    r = oip.ModelInferRequest(model_name="m")
    t = r.inputs.add(name="images", datatype=datatype, shape=shape)
    if raw is not None:
        r.raw_input_contents.append(raw)
    for k, v in contents.items():
        getattr(t.contents, k).extend(v)
    return r


def oip_images(request: oip.ModelInferRequest) -> np.ndarray:
    return convert.infer_request(request).images(SPEC, 4)


def test_oip_inputs_from_raw_and_typed_contents():
    x = np.random.default_rng(0).random((1, 3, 2, 2), dtype=np.float32)
    raw = oip_images(oip_request("FP32", x.shape, x.tobytes()))
    typed = oip_images(oip_request("FP32", x.shape, fp32_contents=x.ravel()))
    assert np.array_equal(raw, x) and np.array_equal(typed, x)
    u = oip_images(oip_request("UINT8", [1, 2, 2, 3], uint_contents=range(12)))
    assert u.dtype == np.uint8 and u.ravel().tolist() == list(range(12))


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (oip_request("INT32", [1, 3, 2, 2], b"\0" * 48), "inputs\\[0\\].datatype"),
        (oip_request("FP32", [1, 3, 2, 2], b"\0" * 4), "raw_input_contents\\[0\\]"),
        (oip_request("UINT8", [1, 2, 2, 3], uint_contents=[300] * 12), "0..255"),
        (oip.ModelInferRequest(model_name="m"), "exactly one input"),
    ],
)
def test_malformed_oip_inputs_name_the_field(request_, needle):
    with pytest.raises(InvalidInput, match=needle):
        oip_images(request_)


def test_oip_parameters_and_outputs():
    r = oip.ModelInferRequest()
    r.parameters["policy"].string_param = "soft"
    r.parameters["per_sample"].bool_param = True
    assert convert.infer_request(r).options() == ("soft", True, None)
    r.parameters["bogus"].int64_param = 1
    with pytest.raises(InvalidInput, match="bogus"):
        convert.infer_request(r).options()
    req = oip.ModelInferRequest()
    req.outputs.add(name="nope")
    result = InferResult("m", "1", {"probabilities": np.zeros((1, 2), np.float32)}, {})
    with pytest.raises(InvalidInput, match="outputs\\[0\\].name"):
        convert.oip_outputs(req, result)
