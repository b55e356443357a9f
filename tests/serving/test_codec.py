"""The codec on its own (no server): the datatype table, the one contract check, decoding, parameters, outputs.

Each test names the mutant of carddeck/serving/codec.py or carddeck/deck/contract.py it kills.
"""

from __future__ import annotations

import numpy as np
import pytest

from carddeck.card import InputSpec
from carddeck.deck.contract import accepted, prepare_images
from carddeck.errors import InvalidInput, TooLarge
from carddeck.serving.codec import InferRequest, InferResult, Tensor, raw_output

SPEC = InputSpec(height=2, width=3)  # NHWC [N, 2, 3, 3], NCHW [N, 3, 2, 3]: H != W, so a swapped layout shows
GRAY = InputSpec(height=2, width=2, channels=1, value_range=(-1.0, 1.0), mean=(0.0,), std=(1.0,))
PB_FIELDS = ("images.dtype", "images.shape", "images.data")  # how carddeck.v1 names a Tensor's parts


def images(datatype: str, shape, data, spec: InputSpec = SPEC, max_images: int = 8, fields=None) -> np.ndarray:
    tensor = Tensor("images", datatype, shape, data, *(() if fields is None else (fields,)))
    return InferRequest("carddeck", inputs=(tensor,)).images(spec, max_images)


def test_each_accepted_datatype_decodes_from_little_endian_bytes_and_from_values():
    """Mutants: FP32 mapped to float64 or to big-endian; UINT8 read as int8 (values above 127 turn negative)."""
    x = np.random.default_rng(0).random((2, 3, 2, 3)).astype("<f4")
    got = images("FP32", x.shape, x.tobytes())
    assert got.dtype == np.float32 and np.array_equal(got, x)
    assert np.array_equal(images("FP32", x.shape, x.ravel().tolist()), x)  # flat values
    u = np.arange(36, dtype=np.uint8).reshape(2, 2, 3, 3) * 7  # up to 245
    got = images("UINT8", u.shape, u.tobytes())
    assert got.dtype == np.uint8 and np.array_equal(got, u)
    assert np.array_equal(images("UINT8", u.shape, u.tolist()), u)  # nested like the shape


def test_bytes_are_a_view_not_a_copy():
    """Mutant: array_from_bytes copies (a 4 GB request would cost 4 GB more)."""
    data = bytearray(np.zeros((1, 2, 3, 3), np.uint8).tobytes())
    got = images("UINT8", [1, 2, 3, 3], memoryview(data))
    data[0] = 9
    assert got[0, 0, 0, 0] == 9


@pytest.mark.parametrize(
    ("datatype", "shape", "needle"),
    [
        ("INT32", [1, 3, 2, 3], "inputs[0].datatype: 'INT32' is not accepted"),
        ("FP32", [3, 2, 3], "inputs[0].shape: expected 4 dimensions"),
        ("FP32", [0, 3, 2, 3], "inputs[0].shape: empty batch"),
        ("FP32", [1, 3, 0, 3], "inputs[0].shape: every dimension must be positive"),
        ("FP32", [1, 2, 3, 3], "inputs[0].shape: FP32 [1, 2, 3, 3] is not this deck's input"),  # NHWC sent as FP32
        ("UINT8", [1, 3, 2, 3], "inputs[0].shape: UINT8 [1, 3, 2, 3] is not this deck's input"),  # NCHW as UINT8
    ],
)
def test_the_layout_is_checked_against_the_contract_before_the_data_is_read(datatype, shape, needle):
    """The data is 5 bytes, right for no shape: each rejection is about the layout and says the one accepted
    text. Mutants: the layout check dropped (the deck would see it only after decoding, here: the bytes error),
    UINT8 and FP32 layouts swapped, a zero batch let through."""
    with pytest.raises(InvalidInput) as info:
        images(datatype, shape, b"\0" * 5)
    message = str(info.value)
    assert needle in message and "bytes" not in message, message
    assert accepted(SPEC) in message, message


def test_every_way_in_rejects_with_the_one_message_naming_its_own_field():
    """The Python API, carddeck.v1 and the OIP name the same fault the same way, each with its own field name.
    Mutant: a transport checking with an "accepted" text of its own (the three of before)."""
    one = accepted(GRAY)
    assert one == "UINT8 [N, 2, 2, 1] or FP32 [N, 1, 2, 2] in [-1, 1]"
    wrong = np.zeros((1, 2, 2, 3), np.uint8)
    messages = []
    for call in (
        lambda: prepare_images(wrong, GRAY),
        lambda: images("UINT8", wrong.shape, wrong.tobytes(), GRAY, fields=PB_FIELDS),
        lambda: images("UINT8", wrong.shape, wrong.tobytes(), GRAY),
    ):
        with pytest.raises(InvalidInput) as info:
            call()
        messages.append(str(info.value))
    assert [m.split(":")[0] for m in messages] == ["images.shape", "images.shape", "inputs[0].shape"]
    assert len({m.split(": ", 1)[1] for m in messages}) == 1 and messages[0].endswith(one), messages


def test_too_many_images_is_too_large_at_exactly_one_past_the_limit():
    """Mutants: the limit off by one (max-images-off-by-one), or too many images a plain InvalidInput (400, not 413)."""
    assert len(images("UINT8", [3, 2, 3, 3], b"\0" * 54, max_images=3)) == 3
    with pytest.raises(TooLarge, match="4 images in one request; the server accepts at most 3"):
        images("UINT8", [4, 2, 3, 3], b"\0" * 72, max_images=3)


@pytest.mark.parametrize(
    ("datatype", "data", "needle"),
    [
        ("UINT8", b"\0" * 17, "inputs[0].data: 17 bytes do not match shape [1, 2, 3, 3] of uint8 (18 bytes expected)"),
        ("FP32", b"\0" * 18, "(72 bytes expected)"),
        ("UINT8", [[1, 2], [3]], "not a rectangular array"),
        ("UINT8", [1] * 17, "17 values do not match shape"),
        ("UINT8", [0.5] * 18, "expected integers for UINT8, got fractional numbers"),
        ("UINT8", [256] + [0] * 17, "UINT8 values must be in 0..255, got 0..256"),
        ("UINT8", [-1] + [0] * 17, "UINT8 values must be in 0..255, got -1..0"),
        ("FP32", ["a"] * 18, "expected numbers for FP32, got strings"),  # numpy would say str32
        ("FP32", ["NaN"] * 18, "got strings"),
        ("FP32", [True] * 18, "got booleans"),
        ("FP32", "abc", "expected a list of numbers (flat, or nested like the shape), got 'abc'"),  # not "1 values"
        ("FP32", None, "expected a list of numbers (flat, or nested like the shape), got None"),
    ],
)
def test_data_that_does_not_fit_its_declared_tensor_is_named(datatype, data, needle):
    """Mutants: the byte count unchecked (frombuffer would raise a bare ValueError: 500), the 0..255 range
    unchecked (256 wraps to 0), floats truncated into UINT8, strings into FP32."""
    shape = [1, 2, 3, 3] if datatype == "UINT8" else [1, 3, 2, 3]
    with pytest.raises(InvalidInput) as info:
        images(datatype, shape, data)
    assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        ((), "inputs: expected exactly one input named 'images'"),
        ((Tensor("images", "UINT8", [1, 2, 3, 3], b"\0" * 18),) * 2, "got 2"),
        ((Tensor("pixels", "UINT8", [1, 2, 3, 3], b"\0" * 18),), "inputs[0].name: 'pixels' is not an input"),
    ],
)
def test_a_request_has_exactly_one_input_named_images(inputs, needle):
    """Mutants: a second input silently ignored; any name taken for 'images'."""
    with pytest.raises(InvalidInput) as info:
        InferRequest("carddeck", inputs=inputs).images(SPEC, 8)
    assert needle in str(info.value) and accepted(SPEC) in str(info.value)


def test_parameters_are_read_typed_and_unknown_ones_refused():
    """Mutants: an unknown parameter ignored (a typo'd 'polcy' would silently use the default), a truthy 1
    taken for per_sample, True taken for a risk bound of 1.0, a bound outside [0, 1] accepted."""
    ok = {"policy": "soft", "per_sample": True, "abstain_above_risk": 0.25, "triton_enable_empty_final": False}
    assert InferRequest("m", parameters=ok).options() == ("soft", True, 0.25)
    assert InferRequest("m").options() == (None, False, None)
    assert InferRequest("m", parameters={"policy": ""}).options()[0] is None  # empty: the deck's default
    for parameters, needle in [
        ({"polcy": "soft"}, "parameters['polcy']: unknown parameter; CARD-Deck reads policy, per_sample"),
        ({"policy": 3}, "parameters['policy']: must be a string"),
        ({"per_sample": 1}, "parameters['per_sample']: must be a bool"),
        ({"abstain_above_risk": True}, "parameters['abstain_above_risk']: must be a number in [0, 1]"),
        ({"abstain_above_risk": 1.5}, "must be a number in [0, 1]"),
    ]:
        with pytest.raises(InvalidInput) as info:
            InferRequest("m", parameters=parameters).options()
        assert needle in str(info.value), str(info.value)


def test_outputs_come_in_the_order_asked_and_optional_ones_only_by_name():
    """Mutants: out_of_scope sent by default (older clients see an output they never asked for); the
    order of the model's metadata instead of the request's; an unknown name ignored."""
    probabilities, labels = np.ones((2, 3), np.float32), np.zeros(2, np.int64)
    result = InferResult("m", "1", {"probabilities": probabilities, "labels": labels, "out_of_scope": np.ones(2)}, {})
    assert list(result.selected(())) == ["probabilities", "labels"]
    assert list(result.selected(("labels", "out_of_scope"))) == ["labels", "out_of_scope"]
    with pytest.raises(InvalidInput, match=r"outputs\[1\].name: 'nope' is not an output of this model; outputs: "):
        result.selected(("labels", "nope"))


def test_raw_outputs_are_little_endian_with_their_oip_datatype():
    """Mutant: an output's bytes in the array's own byte order (a big-endian array would reach clients swapped)."""
    big = np.array([[1.5, -2.0]], dtype=">f4")
    assert raw_output(big) == ("FP32", np.array([[1.5, -2.0]], "<f4").tobytes())
    assert raw_output(np.array([7], np.int64)) == ("INT64", (7).to_bytes(8, "little"))
