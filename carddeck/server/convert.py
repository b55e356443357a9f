"""Protobuf <-> numpy for both APIs. Every rejection names the field and what is accepted."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from carddeck.card import CardMeta, InputSpec
from carddeck.deck import Deck, Prediction
from carddeck.errors import InvalidInput
from carddeck.gating import Routing
from carddeck.gating.shift import Trust
from carddeck.serving import oip as oip_core
from carddeck.wire.arrays import from_matrix, matrix, tensor_from_images
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb
from carddeck.wire.proto_gen.inference import grpc_service_pb2 as oip

_DTYPES: dict[int, np.dtype[Any]] = {pb.DTYPE_UINT8: np.dtype(np.uint8), pb.DTYPE_FLOAT32: np.dtype("<f4")}
OIP_DTYPES = oip_core.DTYPES


def accepted_tensor(spec: InputSpec) -> str:
    """What a carddeck.v1 images Tensor may be, from the deck's input contract."""
    (lo, hi), c, h, w = spec.value_range, spec.channels, spec.height, spec.width
    uint8, float32 = f"[N, {h}, {w}, {c}]", f"[N, {c}, {h}, {w}] in [{lo:g}, {hi:g}]"
    return f"DTYPE_UINT8 with shape {uint8} or DTYPE_FLOAT32 with shape {float32}"


def images_from_tensor(tensor: pb.Tensor, *, spec: InputSpec, max_images: int, field: str = "images") -> np.ndarray:
    """A carddeck.v1 Tensor as uint8 NHWC or float32 NCHW (read-only view of the message's bytes); the deck
    (:meth:`carddeck.deck.Deck.prepare`) checks it against ``spec``, which the messages here name."""
    if tensor.dtype not in _DTYPES:
        name = pb.DType.Name(tensor.dtype) if tensor.dtype in pb.DType.values() else str(tensor.dtype)
        raise InvalidInput(f"{field}.dtype: {name} is not accepted; send {accepted_tensor(spec)}")
    shape = list(tensor.shape)
    oip_core.check_shape(shape, f"{field}.shape", max_images, accepted_tensor(spec))
    return oip_core.array_from_bytes(tensor.data, _DTYPES[tensor.dtype], shape, f"{field}.data")


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
    return oip_core.infer_options(oip_plain_parameters(parameters))


def oip_plain_parameters(parameters: Mapping[str, oip.InferParameter]) -> dict[str, Any]:
    return {key: oip_parameter(value) for key, value in parameters.items()}


def oip_images(request: oip.ModelInferRequest, *, max_images: int, spec: InputSpec) -> np.ndarray:
    """The one ``images`` input of a ModelInferRequest, from raw_input_contents or typed contents."""
    header = [(t.name, t.datatype, list(t.shape)) for t in request.inputs]
    dtype, shape = oip_core.images_header(header, spec=spec, max_images=max_images)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(
                f"raw_input_contents: expected one entry (one per input), got {len(request.raw_input_contents)}"
            )
        return oip_core.array_from_bytes(request.raw_input_contents[0], dtype, shape, "raw_input_contents[0]")
    fp32 = request.inputs[0].datatype == "FP32"
    contents = request.inputs[0].contents
    field = "inputs[0].contents." + ("fp32_contents" if fp32 else "uint_contents")
    return oip_core.array_from_values(contents.fp32_contents if fp32 else contents.uint_contents, dtype, shape, field)


def oip_outputs(
    request: oip.ModelInferRequest, available: Mapping[str, np.ndarray]
) -> tuple[list[oip.ModelInferResponse.InferOutputTensor], list[bytes]]:
    """Output tensors (requested ones, else all) with their bytes for raw_output_contents."""
    tensors, raw = [], []
    for name, arr in oip_core.select_outputs([o.name for o in request.outputs], available).items():
        datatype = oip_core.datatype_of(arr)
        tensors.append(oip.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=arr.shape))
        raw.append(np.ascontiguousarray(arr, dtype=OIP_DTYPES[datatype]).tobytes())
    return tensors, raw


def oip_infer_response(request: oip.ModelInferRequest, result: oip_core.InferResult) -> oip.ModelInferResponse:
    """The answer to ``request``: its outputs only in raw_output_contents (what tritonclient reads)."""
    response = oip.ModelInferResponse(model_name=request.model_name, model_version=result.model_version, id=request.id)
    for key, value in result.parameters.items():
        response.parameters[key].string_param = value
    tensors, raw = oip_outputs(request, result.outputs)
    response.outputs.extend(tensors)
    response.raw_output_contents.extend(raw)
    return response


def verdict_to_proto(trust: Trust | None, n: int, abstain_above_risk: float | None = None) -> pb.Verdict:
    trust = trust or Trust.unknown(n)
    return pb.Verdict(
        shift_state=trust.state,
        scope=trust.scope,
        expected_accuracy=trust.expected_accuracy,
        expected_accuracy_kind=trust.expected_kind,
        out_of_scope=trust.out_of_scope.tolist(),
        in_scope=trust.in_scope.tolist(),
        risk=trust.risk.tolist(),
        abstained=trust.abstained(abstain_above_risk).tolist(),
    )


def predict_response(prediction: Prediction, deck: Deck, abstain_above_risk: float | None = None) -> pb.PredictResponse:
    names = deck.class_names
    return pb.PredictResponse(
        probabilities=matrix(prediction.probabilities),
        labels=prediction.labels.tolist(),
        label_names=[names[i] for i in prediction.labels],
        routing=routing_to_proto(prediction.routing),
        deck_version=deck.version,
        class_names=names,
        verdict=verdict_to_proto(prediction.verdict, len(prediction.labels), abstain_above_risk),
        adapted=prediction.adapted,
    )


__all__ = [
    "OIP_DTYPES",
    "card_to_proto",
    "from_matrix",
    "images_from_tensor",
    "matrix",
    "oip_images",
    "oip_infer_response",
    "oip_options",
    "oip_outputs",
    "oip_parameter",
    "oip_plain_parameters",
    "predict_response",
    "routing_to_proto",
    "tensor_from_images",
    "verdict_to_proto",
]
