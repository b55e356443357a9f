"""Infer request and response bodies: JSON tensors and the binary tensor data extension.

A body is a JSON object, optionally followed by raw tensor bytes; the header
``Inference-Header-Content-Length`` then gives the JSON part's length. An input whose
``parameters.binary_data_size`` is set takes that many bytes of the binary part (little-endian,
row-major); else its values are in ``data`` (flat row-major or nested like the shape). An output
comes back binary when the request asks (``outputs[i].parameters.binary_data`` or the request
parameter ``binary_data_output``), else as JSON ``data``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from carddeck.errors import InvalidInput, shown
from carddeck.serving.codec import (
    InferRequest,
    InferResult,
    Tensor,
    check_input_parameters,
    check_output_parameters,
    raw_output,
)

HEADER_LENGTH = "inference-header-content-length"
TENSOR_FIELDS = "{name, datatype, shape, data | parameters.binary_data_size}"


@dataclass(frozen=True)
class InferBody:
    header: dict[str, Any]  # the JSON part
    binary: memoryview  # the bytes after it (empty without the binary extension)


def json_object(body: bytes | bytearray, what: str) -> dict[str, Any]:
    """A JSON object body; an empty body is an empty object."""
    if not body:
        return {}
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what}: not valid JSON ({exc})") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise InvalidInput(f"{what}: JSON nested too deeply (an infer body needs 6 levels)") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def parse_infer_body(body: bytes | bytearray, header_length: str | None) -> InferBody:
    view = memoryview(body)
    if header_length is None:
        return InferBody(json_object(body, "request body"), view[len(view) :])
    try:
        n = int(header_length)
    except ValueError:
        n = -1
    if not 0 <= n <= len(view):
        raise InvalidInput(
            f"header Inference-Header-Content-Length: {shown(header_length)} is not a length within the "
            f"{len(view)}-byte body (the JSON part's length in bytes)"
        )
    return InferBody(json_object(bytes(view[:n]), "request body (JSON part)"), view[n:])


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{field}: expected a JSON object, got {type(value).__name__}")
    return value


def request_parameters(body: InferBody) -> Mapping[str, Any]:
    return _mapping(body.header.get("parameters"), "parameters")


def request_id(body: InferBody) -> str:
    rid = body.header.get("id", "")
    if not isinstance(rid, str):
        raise InvalidInput(f"id: expected a string, got {type(rid).__name__}")
    return rid


def requested_outputs(body: InferBody) -> tuple[dict[str, bool], bool]:
    """Output name -> binary?, in the order asked (none: every output), and binary_data_output."""
    outputs = body.header.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InvalidInput("outputs: expected a list of objects {name, parameters: {binary_data}}")
    default = request_parameters(body).get("binary_data_output", False)
    if not isinstance(default, bool):
        raise InvalidInput(f"parameters['binary_data_output']: must be a bool, got {shown(default)}")
    wanted = {}
    for i, output in enumerate(outputs):
        params = _mapping(output.get("parameters"), f"outputs[{i}].parameters")
        check_output_parameters(i, list(params))
        binary = params.get("binary_data", default)
        if not isinstance(binary, bool):
            raise InvalidInput(f"outputs[{i}].parameters['binary_data']: must be a bool, got {shown(binary)}")
        wanted[str(output.get("name", ""))] = binary
    return wanted, default


def infer_request(model: str, version: str, body: InferBody) -> tuple[InferRequest, dict[str, bool], bool]:
    """An infer body as the codec's request (its ``images`` input not decoded yet: binary data as a view),
    the outputs asked for (name -> binary?) and binary_data_output."""
    rid = request_id(body)
    wanted, binary_default = requested_outputs(body)
    inputs = body.header.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise InvalidInput(f"inputs: expected a list of tensor objects {TENSOR_FIELDS}")
    tensors = []
    for i, t in enumerate(inputs):
        check_input_parameters(i, list(_mapping(t.get("parameters"), f"inputs[{i}].parameters")))
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidInput(f"inputs[{i}].shape: expected a list of integers, got {shown(shape)}")
        tensors.append((str(t.get("name", "")), str(t.get("datatype", "")), shape))
    data, where = _input_data(body, inputs[0]) if len(inputs) == 1 else (None, "inputs[0].data")
    fields = ("inputs[0].datatype", "inputs[0].shape", where)
    request = InferRequest(
        model,
        version,
        rid,
        tuple(Tensor(name, datatype, shape, data, fields) for name, datatype, shape in tensors),
        request_parameters(body),
        tuple(wanted),
    )
    return request, wanted, binary_default


def _input_data(body: InferBody, tensor: Mapping[str, Any]) -> tuple[Any, str]:
    """The one input's data and how messages name it: the binary part (binary_data_size) or JSON ``data``."""
    size = _mapping(tensor.get("parameters"), "inputs[0].parameters").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"inputs[0].parameters.binary_data_size: expected a byte count, got {shown(size)}")
        if "data" in tensor:
            raise InvalidInput("inputs[0]: send either 'data' or parameters.binary_data_size, not both")
        if size != len(body.binary):
            raise InvalidInput(
                f"inputs[0].parameters.binary_data_size: {size} bytes declared, {len(body.binary)} bytes of binary "
                "data follow the JSON part (see the Inference-Header-Content-Length header)"
            )
        return body.binary, "inputs[0] binary data"
    if len(body.binary):
        raise InvalidInput(
            f"request body: {len(body.binary)} bytes follow the JSON part but no input declares "
            "parameters.binary_data_size"
        )
    if "data" not in tensor:
        raise InvalidInput(f"inputs[0]: no 'data' and no parameters.binary_data_size; send {TENSOR_FIELDS}")
    return tensor["data"], "inputs[0].data"


def json_values(arr: np.ndarray) -> list[Any]:
    """A tensor's values for JSON ``data``: NaN and infinities (an out-of-scope score the verdict does not
    know) as null, which JSON has and strict parsers accept; tritonclient.http reads null back as NaN."""
    values = arr.ravel().tolist()
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        return [v if math.isfinite(v) else None for v in values]
    return values


def encode_result(
    result: InferResult, wanted: Mapping[str, bool], binary_default: bool, rid: str
) -> tuple[bytes, int | None]:
    """The response body, and the JSON part's length when binary outputs follow it."""
    outputs, blobs = [], []
    for name, arr in result.selected(list(wanted)).items():
        datatype, raw = raw_output(arr)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if wanted.get(name, binary_default):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = json_values(arr)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": result.model_name, "model_version": result.model_version}
    if rid:
        doc["id"] = rid
    doc["parameters"] = result.parameters
    doc["outputs"] = outputs
    head = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def load_files(body: Mapping[str, Any]) -> dict[str, bytes]:
    """The ``file:`` parameters of a repository load request, base64-decoded (Triton's HTTP convention)."""
    params = _mapping(body.get("parameters"), "parameters")
    files = {}
    for key, value in params.items():
        if not key.startswith("file:"):
            continue
        if not isinstance(value, str):
            raise InvalidInput(f"parameters[{shown(key)}]: expected the file's bytes as a base64 string")
        try:
            files[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"parameters[{shown(key)}]: not valid base64") from None
    return files


__all__ = [
    "HEADER_LENGTH",
    "InferBody",
    "encode_result",
    "infer_request",
    "json_object",
    "load_files",
    "parse_infer_body",
    "request_id",
    "request_parameters",
    "requested_outputs",
]
