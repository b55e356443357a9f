"""One card file: atomic writes, the graph digest, and reading a card back with every check. No torch.

``read_card(path_or_bytes)`` returns the ONNX model and its CardMeta, or raises CardRejected naming
the source and the reason: unreadable, empty, not ONNX / truncated, fails onnx.checker, missing or
malformed CardMeta, graph digest mismatch, or an input/output contract that differs from the card
contract (input ``images`` float32 [N,C,H,W] with a dynamic N, output ``logits`` [N,num_classes]).

Besides the CardMeta JSON under :data:`carddeck.card.METADATA_KEY`, an exported card carries the
SHA-256 of its serialized graph under :data:`GRAPH_DIGEST_KEY`. Flipped bytes inside raw weight
data still parse as valid protobuf, so without the digest such a corruption would load silently.
Export (``carddeck.export``) and the deck store both use this module, so they accept the same files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

import numpy as np
import onnx

from carddeck.card import METADATA_KEY, CardMeta
from carddeck.errors import CardRejected, InvalidInput

GRAPH_DIGEST_KEY = "carddeck.graph_sha256"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


# -- atomic writes -----------------------------------------------------------------------------------
def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    A temporary file in the same directory is written, flushed, fsynced and renamed into place;
    then the directory is fsynced so the rename itself is durable (where the filesystem allows it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open with 0o666 lets the umask decide the mode, like any other created file (mkstemp forces 0600)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    try:  # not every filesystem allows opening (or fsyncing) a directory
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- metadata ------------------------------------------------------------------------------------
def graph_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the serialized graph (weights, nodes, sparse initializers), hex."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def meta_from_model(model: onnx.ModelProto) -> CardMeta | None:
    """The CardMeta embedded in ``model``, or None when it has none (raises InvalidInput when malformed)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return CardMeta.from_json(prop.value, source=f"metadata_props[{METADATA_KEY!r}]")
    return None


def set_card_meta(model: onnx.ModelProto, meta: CardMeta) -> None:
    """Replace the CardMeta in ``model`` (in place). The graph is unchanged, so its digest stays valid."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = meta.to_json()
            return
    model.metadata_props.add(key=METADATA_KEY, value=meta.to_json())


# -- checks --------------------------------------------------------------------------------------
def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    """Static sizes as ints, symbolic ones by name ("?" when a dimension has neither)."""
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value_info.type.tensor_type.shape.dim
    ]


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
        elem = inp.type.tensor_type.elem_type
        got = onnx.TensorProto.DataType.Name(elem) if elem in onnx.TensorProto.DataType.values() else str(elem)
        raise CardRejected(
            f"{source}: input 'images' must be float32 [N, {spec.channels}, {spec.height}, {spec.width}], "
            f"got element type {got}"
        )
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
            " with a dynamic batch dimension N"
        )


def check_runs(data: bytes, meta: CardMeta) -> None:
    """Load the card in ONNX Runtime (CPU) and run a 2-image batch: the output must be [2, C] and finite."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        spec = meta.input
        probe = np.full((2, spec.channels, spec.height, spec.width), 0.5, np.float32)
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: probe})
    except Exception as exc:  # ORT raises its own exception types
        raise CardRejected(f"card {meta.key}: ONNX Runtime cannot run it ({type(exc).__name__}: {exc})") from None
    if logits.shape != (2, meta.num_classes) or not np.isfinite(logits).all():
        raise CardRejected(
            f"card {meta.key}: a 2-image batch gave logits of shape {list(logits.shape)} "
            f"(finite: {bool(np.isfinite(logits).all())}), expected [2, {meta.num_classes}]"
        )


# -- reading -------------------------------------------------------------------------------------
def _read_bytes(card: bytes | Path | str) -> tuple[str, bytes]:
    if isinstance(card, bytes):
        return "card bytes", card
    source = str(card)
    try:
        return source, Path(card).read_bytes()
    except OSError as exc:
        raise CardRejected(f"{source}: cannot read the card file ({exc.strerror or exc})") from None


def read_card_bytes(card: bytes | Path | str, *, load_session: bool = False) -> tuple[onnx.ModelProto, CardMeta, bytes]:
    """:func:`read_card` that also returns the file's bytes (what the deck stores and ORT loads)."""
    source, data = _read_bytes(card)
    try:
        model, meta = _parse(source, data, load_session=load_session)
    except CardRejected:
        raise
    except Exception as exc:  # hostile bytes reach corners of onnx/protobuf that raise anything (UnicodeDecodeError)
        raise CardRejected(f"{source}: not a readable card, corrupted or truncated ({type(exc).__name__})") from None
    return model, meta, data


def _parse(source: str, data: bytes, *, load_session: bool) -> tuple[onnx.ModelProto, CardMeta]:
    if not data:
        raise CardRejected(f"{source}: empty file, not an ONNX model")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf's DecodeError, or ValueError/RuntimeError from onnx
        raise CardRejected(
            f"{source}: not an ONNX model (not a readable ONNX model: corrupted or truncated; "
            f"{type(exc).__name__}: {exc})"
        ) from None
    if not model.graph.node or not model.graph.output:
        raise CardRejected(
            f"{source}: not an ONNX model (not a usable ONNX model: the graph has no nodes or outputs; "
            "corrupted or truncated)"
        )
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # ValidationError, or e.g. UnicodeDecodeError on a corrupted string field
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CardRejected(f"{source}: fails onnx.checker, corrupted or truncated ({first})") from None
    try:
        meta = meta_from_model(model)
    except InvalidInput as exc:
        raise CardRejected(f"{source}: bad CardMeta, malformed CardMeta in metadata_props: {exc}") from None
    if meta is None:
        raise CardRejected(
            f"{source}: the ONNX file has no CardMeta: metadata_props lacks the key {METADATA_KEY!r} "
            "(export it with carddeck)"
        )
    expected = next((p.value for p in model.metadata_props if p.key == GRAPH_DIGEST_KEY), None)
    if expected is not None and expected != graph_digest(model):
        raise CardRejected(
            f"{source}: graph digest mismatch ({GRAPH_DIGEST_KEY}): weights or nodes were corrupted after export"
        )
    check_contract(model, meta, f"{source} (card {meta.key})")
    if load_session:
        import onnxruntime as ort

        try:
            ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises several unrelated exception types for bad models
            raise CardRejected(f"{source}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
    return model, meta


def read_card(card: bytes | Path | str, *, load_session: bool = False) -> tuple[onnx.ModelProto, CardMeta]:
    """Parse and validate a card file (path or bytes); CardRejected names the source and the reason.

    ``load_session=True`` also builds an ONNX Runtime session (the final word on loadability).
    """
    model, meta, _ = read_card_bytes(card, load_session=load_session)
    return model, meta


def read_card_meta(card: bytes | Path | str) -> CardMeta:
    """The CardMeta of a card file (path or bytes), after every check of :func:`read_card`."""
    return read_card(card)[1]


__all__ = [
    "GRAPH_DIGEST_KEY",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "atomic_write",
    "check_contract",
    "check_runs",
    "graph_digest",
    "meta_from_model",
    "read_card",
    "read_card_bytes",
    "read_card_meta",
    "set_card_meta",
]
