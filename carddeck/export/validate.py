"""Loader-side validation of an exported card, without torch.

``read_card(path_or_bytes)`` returns the ONNX model and its CardMeta, or raises CardRejected
saying what is wrong: not ONNX / truncated, fails onnx.checker, graph digest mismatch (flipped
bytes in weights), missing or malformed CardMeta, or an input/output contract that differs from
the card contract (input ``images`` float32 [N,3,H,W], output ``logits`` [N,num_classes]).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from carddeck.card import METADATA_KEY, CardMeta
from carddeck.errors import CardRejected, InvalidInput
from carddeck.export.metadata import GRAPH_DIGEST_KEY, graph_digest, meta_from_model

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def check_contract(model: onnx.ModelProto, meta: CardMeta, source: str = "card") -> None:
    """Raise CardRejected unless the graph's input/output match the card contract and ``meta``."""
    graph = model.graph
    init_names = {i.name for i in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise CardRejected(f"{source}: graph inputs are {[i.name for i in inputs]}, the card contract is ['images']")
    if [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise CardRejected(
            f"{source}: graph outputs are {[o.name for o in graph.output]}, the card contract is ['logits']"
        )
    (inp,) = inputs
    spec = meta.input
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise CardRejected(f"{source}: input 'images' must be float32")
    dims = _dims(inp)
    if len(dims) != 4 or dims[1:] != [spec.channels, spec.height, spec.width] or isinstance(dims[0], int):
        raise CardRejected(
            f"{source}: input 'images' has shape {dims}, expected [N, {spec.channels}, {spec.height}, {spec.width}]"
            " with a dynamic batch dimension N"
        )
    out_dims = _dims(graph.output[0])
    if len(out_dims) != 2 or out_dims[1] != meta.num_classes or isinstance(out_dims[0], int):
        raise CardRejected(
            f"{source}: output 'logits' has shape {out_dims}, expected [N, {meta.num_classes}] (num_classes)"
        )


def read_card(card: Path | str | bytes, *, load_session: bool = False) -> tuple[onnx.ModelProto, CardMeta]:
    """Parse and validate an exported card; CardRejected names the reason.

    ``load_session=True`` also builds an ONNX Runtime session (the final word on loadability).
    """
    if isinstance(card, bytes):
        source, data = "card bytes", card
    else:
        source = str(card)
        try:
            data = Path(card).read_bytes()
        except OSError as exc:
            raise CardRejected(f"{source}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise CardRejected(f"{source}: empty file, expected an ONNX model")
    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise CardRejected(f"{source}: not a readable ONNX model, corrupted or truncated ({exc})") from None
    if not model.graph.node or not model.graph.output:
        raise CardRejected(f"{source}: not a usable ONNX model (empty graph), corrupted or truncated")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CardRejected(f"{source}: fails onnx.checker, corrupted or truncated ({first})") from None
    try:
        meta = meta_from_model(model)
    except InvalidInput as exc:
        raise CardRejected(f"{source}: malformed CardMeta in metadata_props: {exc}") from None
    if meta is None:
        raise CardRejected(f"{source}: no CardMeta in metadata_props (key {METADATA_KEY!r}); export it with carddeck")
    expected = next((p.value for p in model.metadata_props if p.key == GRAPH_DIGEST_KEY), None)
    if expected is not None and expected != graph_digest(model):
        raise CardRejected(f"{source}: graph digest mismatch ({GRAPH_DIGEST_KEY}): weights or nodes were corrupted")
    check_contract(model, meta, source)
    if load_session:
        import onnxruntime as ort

        try:
            ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises several unrelated exception types for bad models
            raise CardRejected(f"{source}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
    return model, meta


__all__ = ["INPUT_NAME", "OUTPUT_NAME", "check_contract", "read_card"]
