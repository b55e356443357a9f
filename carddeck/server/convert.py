"""Protobuf to and from the codec's types (:mod:`carddeck.serving.codec`) and numpy, for both APIs.

Only conversion: decoding and the input-contract check are the codec's, so a rejection reads as over
every transport, naming the field as this protocol calls it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from carddeck.card import CardMeta
from carddeck.deck import Deck, Prediction
from carddeck.errors import InvalidInput
from carddeck.gating import Routing
from carddeck.gating.shift import Trust
from carddeck.serving.codec import (
    InferRequest,
    InferResult,
    Tensor,
    check_input_parameters,
    check_output_parameters,
    raw_output,
)
from carddeck.wire.arrays import from_matrix, matrix, tensor_from_images
from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb
from carddeck.wire.proto_gen.inference import grpc_service_pb2 as oip

# carddeck.v1's dtypes by their OIP names (the codec's): a Tensor is decoded and checked like an OIP input
_DATATYPES = {pb.DTYPE_UINT8: "UINT8", pb.DTYPE_FLOAT32: "FP32"}


def tensor(message: pb.Tensor, field: str = "images") -> Tensor:
    """A carddeck.v1 Tensor as the codec's :class:`~carddeck.serving.codec.Tensor` (not decoded yet)."""
    datatype = _DATATYPES.get(message.dtype)
    if datatype is None:
        known = message.dtype in pb.DType.values()
        datatype = pb.DType.Name(message.dtype) if known else str(message.dtype)
    fields = (f"{field}.dtype", f"{field}.shape", f"{field}.data")
    return Tensor(field, datatype, list(message.shape), message.data, fields)


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
# the typed contents field of each datatype
_CONTENTS = {"FP32": "fp32_contents", "UINT8": "uint_contents", "INT64": "int64_contents"}


def oip_parameter(param: oip.InferParameter) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def oip_plain_parameters(parameters: Mapping[str, oip.InferParameter]) -> dict[str, Any]:
    return {key: oip_parameter(value) for key, value in parameters.items()}


def infer_request(request: oip.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as the codec's request: each input's data from raw_input_contents (one entry per
    input) or from its typed contents."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents: expected one entry per input ({len(request.inputs)}), got {len(raw)}")
    inputs = []
    for i, t in enumerate(request.inputs):
        check_input_parameters(i, list(t.parameters))
        if raw and t.contents.ByteSize():
            raise InvalidInput(f"inputs[{i}].contents: send the data in contents or in raw_input_contents, not both")
        contents = _CONTENTS.get(t.datatype, "uint_contents")
        data, where = (
            (raw[i], f"raw_input_contents[{i}]")
            if raw
            else (getattr(t.contents, contents), f"inputs[{i}].contents.{contents}")
        )
        inputs.append(
            Tensor(t.name, t.datatype, list(t.shape), data, (f"inputs[{i}].datatype", f"inputs[{i}].shape", where))
        )
    return InferRequest(
        request.model_name,
        request.model_version,
        request.id,
        tuple(inputs),
        oip_plain_parameters(request.parameters),
        requested_outputs(request.outputs),
    )


def requested_outputs(outputs: Sequence[oip.ModelInferRequest.InferRequestedOutputTensor]) -> tuple[str, ...]:
    for i, o in enumerate(outputs):
        check_output_parameters(i, list(o.parameters))
    return tuple([o.name for o in outputs])


def oip_outputs(
    request: oip.ModelInferRequest, result: InferResult
) -> tuple[list[oip.ModelInferResponse.InferOutputTensor], list[bytes]]:
    """Output tensors (requested ones, else all) with their bytes for raw_output_contents."""
    tensors, raw = [], []
    for name, arr in result.selected([o.name for o in request.outputs]).items():
        datatype, data = raw_output(arr)
        tensors.append(oip.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=arr.shape))
        raw.append(data)
    return tensors, raw


def oip_infer_response(request: oip.ModelInferRequest, result: InferResult) -> oip.ModelInferResponse:
    """The answer to ``request``: its outputs only in raw_output_contents (what tritonclient reads)."""
    tensors, raw = oip_outputs(request, result)
    response = oip.ModelInferResponse(
        model_name=request.model_name,
        model_version=result.model_version,
        id=request.id,
        outputs=tensors,
        raw_output_contents=raw,
    )
    for key, value in result.parameters.items():
        response.parameters[key].string_param = value
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
        covered_by=trust.covered_by,
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
    "card_to_proto",
    "from_matrix",
    "infer_request",
    "matrix",
    "oip_infer_response",
    "oip_outputs",
    "oip_parameter",
    "oip_plain_parameters",
    "predict_response",
    "routing_to_proto",
    "tensor",
    "tensor_from_images",
    "verdict_to_proto",
]
