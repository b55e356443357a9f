"""The REST side of the codec (carddeck/http/tensors.py) on its own: JSON and the binary tensor data extension.

Each test names the mutant it kills.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from carddeck.card import InputSpec
from carddeck.errors import InvalidInput
from carddeck.http import tensors
from carddeck.serving.codec import InferResult

SPEC = InputSpec(height=2, width=2)


def body(header: dict, binary: bytes = b"") -> tensors.InferBody:
    head = json.dumps(header).encode()
    return tensors.parse_infer_body(head + binary, str(len(head)) if binary else None)


def tensor(**extra) -> dict:
    return {"name": "images", "datatype": "UINT8", "shape": [1, 2, 2, 3], **extra}


def test_binary_input_data_is_read_in_place_after_the_json_part():
    """Mutants: the JSON part's length ignored (the binary part would start at 0); the bytes copied."""
    pixels = bytes(range(12))
    raw = bytearray(json.dumps({"inputs": [tensor(parameters={"binary_data_size": 12})]}).encode())
    n = len(raw)
    raw += pixels
    request, wanted, binary_default = tensors.infer_request("m", "", tensors.parse_infer_body(raw, str(n)))
    images = request.images(SPEC, 4)
    assert images.ravel().tolist() == list(range(12)) and (wanted, binary_default) == ({}, False)
    raw[n] = 99
    assert images[0, 0, 0, 0] == 99  # a view of the body


@pytest.mark.parametrize(
    ("parsed", "needle"),
    [
        (lambda: body({"inputs": [tensor(parameters={"binary_data_size": 13})]}, bytes(12)),
         "binary_data_size: 13 bytes declared, 12 bytes of binary data follow the JSON part"),
        (lambda: body({"inputs": [tensor(data=[0] * 12, parameters={"binary_data_size": 12})]}, bytes(12)),
         "send either 'data' or parameters.binary_data_size, not both"),
        (lambda: body({"inputs": [tensor(data=[0] * 12)]}, bytes(12)),
         "12 bytes follow the JSON part but no input declares parameters.binary_data_size"),
        (lambda: body({"inputs": [tensor(parameters={"binary_data_size": True})]}, bytes(12)),
         "binary_data_size: expected a byte count, got True"),
        (lambda: body({"inputs": [tensor()]}), "inputs[0]: no 'data' and no parameters.binary_data_size"),
        (lambda: body({"inputs": [tensor(shape=[1, 2, "2", 3], data=[0] * 12)]}),
         "inputs[0].shape: expected a list of integers"),
        (lambda: body({"inputs": [tensor(data=[0] * 12)], "id": 7}), "id: expected a string, got int"),
    ],
)  # fmt: skip
def test_binary_and_json_inputs_that_do_not_add_up_are_named(parsed, needle):
    """Mutants: the declared size unchecked (the codec would blame the shape's byte count, not the framing);
    data and binary both taken; stray binary bytes ignored; True taken as a size of 1."""
    with pytest.raises(InvalidInput) as info:
        tensors.infer_request("m", "", parsed())
    assert needle in str(info.value), str(info.value)


@pytest.mark.parametrize("length", ["x", "-1", "99"])
def test_a_json_part_length_outside_the_body_is_refused(length):
    """Mutant: the header's length trusted (a slice past the body is an empty JSON part: a confusing error)."""
    with pytest.raises(InvalidInput, match="header Inference-Header-Content-Length: .* is not a length within"):
        tensors.parse_infer_body(b'{"inputs": []}', length)


def test_outputs_come_back_binary_as_asked_after_the_json_part():
    """Mutants: binary_data_output ignored; the JSON part's length not the header's value; outputs reordered."""
    probabilities = np.array([[0.25, 0.75]], np.float32)
    labels = np.array([1], np.int64)
    result = InferResult("m", "3", {"probabilities": probabilities, "labels": labels}, {"policy": "soft"})
    header = {"outputs": [{"name": "labels", "parameters": {"binary_data": False}}, {"name": "probabilities"}],
              "parameters": {"binary_data_output": True}}  # fmt: skip
    wanted, binary_default = tensors.requested_outputs(body(header))
    assert wanted == {"labels": False, "probabilities": True} and binary_default
    data, length = tensors.encode_result(result, wanted, binary_default, "r1")
    assert length is not None
    doc = json.loads(data[:length])
    assert [o["name"] for o in doc["outputs"]] == ["labels", "probabilities"] and doc["id"] == "r1"
    assert doc["outputs"][0]["data"] == [1] and doc["outputs"][1]["parameters"] == {"binary_data_size": 8}
    assert data[length:] == probabilities.astype("<f4").tobytes()
    all_json, none = tensors.encode_result(result, {}, False, "")
    assert none is None and "id" not in json.loads(all_json)


def test_json_outputs_are_strict_json_and_tritonclient_reads_null_as_nan():
    """Mutant: an unknown out-of-scope score (NaN) written as the bare word NaN, which JSON does not have
    (JavaScript's, Go's and Java's parsers refuse the whole answer)."""
    import tritonclient.http as th

    scores = np.array([np.nan, 0.5, np.inf], np.float32)
    result = InferResult("m", "3", {"out_of_scope": scores, "labels": np.array([1, 2, 3])}, {})
    data, length = tensors.encode_result(result, {"out_of_scope": False, "labels": False}, False, "")

    def refuse(word: str) -> None:
        raise AssertionError(f"{word} in a JSON answer")

    assert length is None
    assert json.loads(data, parse_constant=refuse)["outputs"][0]["data"] == [None, 0.5, None]
    parsed = th.InferResult.from_response_body(data).as_numpy("out_of_scope")
    assert parsed.dtype == np.float32 and np.isnan(parsed[0]) and parsed[1] == 0.5


def test_output_parameters_other_than_binary_data_are_refused():
    """Mutant: Triton's 'classification' output parameter silently ignored (the client would get probabilities)."""
    with pytest.raises(InvalidInput, match=r"outputs\[0\].parameters\['classification'\]: not supported"):
        tensors.requested_outputs(body({"outputs": [{"name": "labels", "parameters": {"classification": 2}}]}))
