"""One inference request and its answer, whatever transport carried them (KServe's ``InferRequest`` and
``InferResponse``, with their ``from_grpc`` / ``from_rest`` on the transports' side).

Each transport only converts its wire format to an :class:`InferRequest` (:mod:`carddeck.server.convert`
for gRPC, :mod:`carddeck.http.tensors` for REST) and an :class:`InferResult` back. Decoding tensors, the
datatype table and the check against the deck's input contract (:mod:`carddeck.deck.contract`, one
message) happen here, so every transport rejects the same input with the same words, naming the field
as that transport calls it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from carddeck.card import InputSpec
from carddeck.deck.contract import accepted, check_layout
from carddeck.errors import InvalidInput, shown

# OIP datatype names -> numpy (little-endian, as the protocol's raw and binary contents are)
DTYPES: dict[str, np.dtype[Any]] = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}
DATATYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INFER_PARAMETERS = ("policy", "per_sample", "abstain_above_risk")
# Parameters clients send for the server's own use (Triton's and the binary extension's): accepted, not read.
PASSED_PARAMETERS = ("triton_", "sequence_", "priority", "timeout", "binary_data")
# Outputs of the deck model sent only when asked for by name (the default answer stays as it was).
OPTIONAL_OUTPUTS = ("out_of_scope",)
# What a requested output may carry: the binary extension's flag (Triton's classification is not served).
OUTPUT_PARAMETERS = ("binary_data",)


def check_input_parameters(i: int, keys: Sequence[str]) -> None:
    """Refuse Triton's shared-memory inputs by name (the data is not in the request: without this the caller
    would read that its tensor holds 0 values), the same over every transport (sorted: gRPC's map has no order)."""
    for key in sorted(keys):
        if key.startswith("shared_memory"):
            raise InvalidInput(
                f"inputs[{i}].parameters[{shown(key)}]: shared memory is not supported; send the tensor's data "
                "in the request"
            )


def check_output_parameters(i: int, keys: Sequence[str]) -> None:
    """Refuse an output parameter CARD-Deck would ignore (``classification``: the caller would get
    probabilities where it asked for class strings), the same over every transport."""
    for key in keys:
        if key not in OUTPUT_PARAMETERS:
            raise InvalidInput(
                f"outputs[{i}].parameters[{shown(key)}]: not supported; CARD-Deck reads {', '.join(OUTPUT_PARAMETERS)}"
            )


@dataclass(slots=True)  # not frozen: made per request, and frozen init costs 1.2 us to 0.33 (5 fields)
class Tensor:
    """One input tensor as a transport received it, not yet decoded."""

    name: str
    datatype: str  # the OIP name (UINT8, FP32, ...); a transport with names of its own maps them
    shape: Sequence[int]
    data: Any  # raw little-endian row-major bytes (bytes, memoryview), or numbers (flat or nested like the shape)
    fields: tuple[str, str, str] = ("inputs[0].datatype", "inputs[0].shape", "inputs[0].data")  # names in messages

    def images(self, spec: InputSpec, max_images: int) -> np.ndarray:
        """The tensor as images: checked against the deck's contract before its data is read, then decoded
        (uint8 NHWC or float32 NCHW; bytes as a read-only view, not a copy)."""
        dtype_field, shape_field, data_field = self.fields
        check_layout(self.datatype, self.shape, spec, fields=(dtype_field, shape_field), max_images=max_images)
        dtype, shape = DTYPES[self.datatype], list(self.shape)  # the wire's byte order: little-endian
        if isinstance(self.data, (bytes, bytearray, memoryview)):
            return array_from_bytes(self.data, dtype, shape, data_field)
        return array_from_values(self.data, dtype, shape, data_field)


@dataclass(slots=True)
class InferRequest:
    """An Open Inference Protocol request: the model, its inputs, the parameters (plain values) and the
    outputs asked for by name (none: the model's default outputs)."""

    model_name: str
    model_version: str = ""
    id: str = ""
    inputs: tuple[Tensor, ...] = ()
    parameters: Mapping[str, Any] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()

    def images(self, spec: InputSpec, max_images: int) -> np.ndarray:
        """The one ``images`` input, decoded and checked against the deck's input contract."""
        if len(self.inputs) != 1:
            raise InvalidInput(
                f"inputs: expected exactly one input named 'images' ({accepted(spec)}), got {len(self.inputs)}"
            )
        name = self.inputs[0].name
        if name != "images":
            raise InvalidInput(
                f"inputs[0].name: {shown(name)} is not an input of this model; send 'images' ({accepted(spec)})"
            )
        return self.inputs[0].images(spec, max_images)

    def options(self) -> tuple[str | None, bool, float | None]:
        """The parameters CARD-Deck reads: ``policy`` (string), ``per_sample`` (bool), ``abstain_above_risk``
        (number in [0, 1]); any other but the server-side ones (``PASSED_PARAMETERS``) is refused."""
        parameters = self.parameters
        for key in parameters:
            if key not in INFER_PARAMETERS and not key.startswith(PASSED_PARAMETERS):
                raise InvalidInput(
                    f"parameters[{shown(key)}]: unknown parameter; CARD-Deck reads {', '.join(INFER_PARAMETERS)}"
                )
        policy = parameters.get("policy")
        if policy is not None and not isinstance(policy, str):
            raise InvalidInput(f"parameters['policy']: must be a string, got {shown(policy)}")
        per_sample = parameters.get("per_sample", False)
        if not isinstance(per_sample, bool):
            raise InvalidInput(f"parameters['per_sample']: must be a bool, got {shown(per_sample)}")
        bound = risk_bound(parameters.get("abstain_above_risk"), "parameters['abstain_above_risk']")
        return policy or None, per_sample, bound


@dataclass(frozen=True)
class InferResult:
    """The answer: every output of the model (in metadata order) and the response parameters (strings)."""

    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    parameters: dict[str, str]

    def selected(self, requested: Sequence[str]) -> dict[str, np.ndarray]:
        """The requested outputs (none named: all but the optional ones), in the order asked."""
        out = {}
        for i, name in enumerate(requested or [k for k in self.outputs if k not in OPTIONAL_OUTPUTS]):
            if name not in self.outputs:
                raise InvalidInput(
                    f"outputs[{i}].name: {shown(name)} is not an output of this model; "
                    f"outputs: {', '.join(self.outputs)}"
                )
            out[name] = self.outputs[name]
        return out


def raw_output(arr: np.ndarray) -> tuple[str, bytes]:
    """An output's OIP datatype and its raw contents (little-endian, row-major)."""
    datatype = DATATYPE_NAMES[arr.dtype.newbyteorder("<")]
    return datatype, np.ascontiguousarray(arr, dtype=DTYPES[datatype]).tobytes()


def array_from_bytes(
    data: bytes | bytearray | memoryview, dtype: np.dtype[Any], shape: list[int], field: str
) -> np.ndarray:
    """A read-only view of little-endian row-major bytes (no copy on little-endian machines)."""
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"{field}: {len(data)} bytes do not match shape {shown(shape)} of {dtype.name} ({expected} bytes expected)"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


# what a JSON array that numpy cannot read as numbers holds, in the caller's words
_KINDS = {"U": "strings", "b": "booleans", "f": "fractional numbers", "O": "values of mixed types"}


def array_from_values(values: Any, dtype: np.dtype[Any], shape: list[int], field: str) -> np.ndarray:
    """Numbers (flat row-major, or nested like the shape) as an array of ``shape``."""
    try:
        arr = np.asarray(values)
    except ValueError:  # ragged nesting
        raise InvalidInput(f"{field}: not a rectangular array of numbers (shape {shown(shape)} expected)") from None
    if arr.ndim == 0:  # a string, null or single number where a list belongs
        raise InvalidInput(f"{field}: expected a list of numbers (flat, or nested like the shape), got {shown(values)}")
    count = math.prod(shape)
    if arr.size != count:
        raise InvalidInput(f"{field}: {arr.size} values do not match shape {shown(shape)} ({count} expected)")
    integral = dtype.kind in "iu"
    if arr.dtype.kind not in ("iu" if integral else "iuf"):
        kind = "integers" if integral else "numbers"
        name = DATATYPE_NAMES[dtype.newbyteorder("<")]
        got = _KINDS.get(arr.dtype.kind, f"{arr.dtype.name} values")
        raise InvalidInput(f"{field}: expected {kind} for {name}, got {got}")
    if dtype == np.uint8 and arr.size and (arr.min() < 0 or arr.max() > 255):
        raise InvalidInput(f"{field}: UINT8 values must be in 0..255, got {int(arr.min())}..{int(arr.max())}")
    return arr.astype(dtype.newbyteorder("=")).reshape(shape)


def risk_bound(value: Any, field: str) -> float | None:
    """A caller's abstention bound: None (no abstention) or a number in [0, 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise InvalidInput(f"{field}: must be a number in [0, 1] (an error probability), got {shown(value)}")
    return float(value)


__all__ = [
    "DTYPES",
    "InferRequest",
    "InferResult",
    "Tensor",
    "array_from_bytes",
    "array_from_values",
    "raw_output",
    "risk_bound",
]
