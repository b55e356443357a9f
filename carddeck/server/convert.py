"""Protobuf <-> numpy for both APIs. Every rejection names the field and what is accepted."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from carddeck.card import CardMeta
from carddeck.errors import InvalidInput, TooLarge, shown
from carddeck.gating import Routing
from carddeck.server.proto_gen.carddeck.v1 import carddeck_pb2 as pb
from carddeck.server.proto_gen.inference import grpc_service_pb2 as oip

_DTYPES: dict[int, np.dtype[Any]] = {pb.DTYPE_UINT8: np.dtype(np.uint8), pb.DTYPE_FLOAT32: np.dtype("<f4")}
_ACCEPTED = "DTYPE_UINT8 with shape [N, H, W, 3] or DTYPE_FLOAT32 with shape [N, 3, H, W] in [0, 1]"
# OIP datatype names -> numpy (little-endian, as the protocol's raw contents are)
OIP_DTYPES: dict[str, np.dtype[Any]] = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}


def _check_shape(shape: list[int], field: str, max_images: int, accepted: str) -> None:
    if len(shape) != 4:
        raise InvalidInput(f"{field}: expected 4 dimensions ({accepted}), got {shown(shape)}")
    if any(d <= 0 for d in shape):
        raise InvalidInput(f"{field}: every dimension must be positive ({accepted}), got {shown(shape)}")
    if shape[0] > max_images:
        raise TooLarge(f"{field}: {shape[0]} images in one request; the server accepts at most {max_images}")


def _from_bytes(data: bytes, dtype: np.dtype[Any], shape: list[int], field: str) -> np.ndarray:
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"{field}: {len(data)} bytes do not match shape {shown(shape)} of {dtype.name} ({expected} bytes expected)"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def images_from_tensor(tensor: pb.Tensor, *, max_images: int, field: str = "images") -> np.ndarray:
    """A carddeck.v1 Tensor as uint8 NHWC or float32 NCHW (read-only view of the message's bytes)."""
    if tensor.dtype not in _DTYPES:
        name = pb.DType.Name(tensor.dtype) if tensor.dtype in pb.DType.values() else str(tensor.dtype)
        raise InvalidInput(f"{field}.dtype: {name} is not accepted; send {_ACCEPTED}")
    shape = list(tensor.shape)
    _check_shape(shape, f"{field}.shape", max_images, _ACCEPTED)
    return _from_bytes(tensor.data, _DTYPES[tensor.dtype], shape, f"{field}.data")


def tensor_from_images(images: np.ndarray) -> pb.Tensor:
    if images.dtype == np.uint8:
        return pb.Tensor(dtype=pb.DTYPE_UINT8, shape=images.shape, data=np.ascontiguousarray(images).tobytes())
    arr = np.ascontiguousarray(images, dtype="<f4")
    return pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=arr.shape, data=arr.tobytes())


def matrix(values: np.ndarray) -> pb.Matrix:
    arr = np.ascontiguousarray(values, dtype="<f4")
    if arr.ndim != 2:
        arr = arr.reshape(len(arr), -1)
    return pb.Matrix(rows=arr.shape[0], cols=arr.shape[1], data=arr.tobytes())


def from_matrix(m: pb.Matrix) -> np.ndarray:
    return np.frombuffer(m.data, dtype="<f4").reshape(m.rows, m.cols).astype(np.float32)


def routing_to_proto(routing: Routing) -> pb.Routing:
    return pb.Routing(
        policy=routing.policy,
        per_sample=routing.per_sample,
        card_names=routing.card_names,
        weights=matrix(routing.weights),
        domains=routing.domains,
        distances=matrix(routing.distances),
        selected=routing.selected,
        cards_per_image=routing.cards_per_image,
    )


def card_to_proto(meta: CardMeta) -> pb.Card:
    return pb.Card(
        name=meta.name,
        version=meta.version,
        domain=meta.domain,
        architecture=meta.architecture,
        compression_method=meta.compression.method,
        sparsity=meta.compression.sparsity,
        weight_bits=meta.compression.weight_bits,
        signature=meta.signature or (),
        meta_json=meta.to_json(),
    )


# -- Open Inference Protocol -------------------------------------------------------------------
def oip_parameter(param: oip.InferParameter) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def oip_options(parameters: Mapping[str, oip.InferParameter]) -> tuple[str | None, bool]:
    """The request parameters CARD-Deck reads: ``policy`` (string) and ``per_sample`` (bool)."""
    known = ("policy", "per_sample")
    for key in parameters:
        if key not in known and not key.startswith(("triton_", "sequence_", "priority", "timeout", "binary_data")):
            raise InvalidInput(f"parameters[{shown(key)}]: unknown parameter; CARD-Deck reads {', '.join(known)}")
    policy = oip_parameter(parameters["policy"]) if "policy" in parameters else None
    if policy is not None and not isinstance(policy, str):
        raise InvalidInput(f"parameters['policy']: must be a string_param, got {shown(policy)}")
    per_sample = oip_parameter(parameters["per_sample"]) if "per_sample" in parameters else False
    if not isinstance(per_sample, bool):
        raise InvalidInput(f"parameters['per_sample']: must be a bool_param, got {shown(per_sample)}")
    return policy or None, per_sample


def oip_images(request: oip.ModelInferRequest, *, max_images: int, height: int, width: int) -> np.ndarray:
    """The one ``images`` input of a ModelInferRequest, from raw_input_contents or typed contents."""
    accepted = f"FP32 [N, 3, {height}, {width}] in [0, 1] or UINT8 [N, {height}, {width}, 3]"
    if len(request.inputs) != 1:
        raise InvalidInput(f"inputs: expected exactly one input named 'images' ({accepted}), got {len(request.inputs)}")
    tensor = request.inputs[0]
    if tensor.name != "images":
        raise InvalidInput(
            f"inputs[0].name: {shown(tensor.name)} is not an input of this model; send 'images' ({accepted})"
        )
    if tensor.datatype not in ("FP32", "UINT8"):
        raise InvalidInput(f"inputs[0].datatype: {shown(tensor.datatype)} is not accepted; send {accepted}")
    shape = list(tensor.shape)
    _check_shape(shape, "inputs[0].shape", max_images, accepted)
    dtype = OIP_DTYPES[tensor.datatype]
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(
                f"raw_input_contents: expected one entry (one per input), got {len(request.raw_input_contents)}"
            )
        return _from_bytes(request.raw_input_contents[0], dtype, shape, "raw_input_contents[0]")
    values = tensor.contents.fp32_contents if tensor.datatype == "FP32" else tensor.contents.uint_contents
    field = "inputs[0].contents." + ("fp32_contents" if tensor.datatype == "FP32" else "uint_contents")
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(f"{field}: {len(values)} values do not match shape {shown(shape)} ({count} expected)")
    arr = np.asarray(values, dtype=np.float32 if tensor.datatype == "FP32" else np.uint32)
    if tensor.datatype == "UINT8":
        if arr.size and arr.max() > 255:
            raise InvalidInput(f"{field}: UINT8 values must be in 0..255, got {int(arr.max())}")
        arr = arr.astype(np.uint8)
    return arr.reshape(shape)


def oip_outputs(
    request: oip.ModelInferRequest, available: Mapping[str, np.ndarray]
) -> tuple[list[oip.ModelInferResponse.InferOutputTensor], list[bytes]]:
    """Output tensors (requested ones, else all) with their bytes for raw_output_contents."""
    names = [o.name for o in request.outputs] or list(available)
    tensors, raw = [], []
    for i, name in enumerate(names):
        if name not in available:
            raise InvalidInput(
                f"outputs[{i}].name: {shown(name)} is not an output of this model; outputs: {', '.join(available)}"
            )
        arr = available[name]
        datatype = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}[arr.dtype]
        tensors.append(oip.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=arr.shape))
        raw.append(np.ascontiguousarray(arr, dtype=OIP_DTYPES[datatype]).tobytes())
    return tensors, raw


__all__ = [
    "OIP_DTYPES",
    "card_to_proto",
    "from_matrix",
    "images_from_tensor",
    "matrix",
    "oip_images",
    "oip_options",
    "oip_outputs",
    "oip_parameter",
    "routing_to_proto",
    "tensor_from_images",
]
