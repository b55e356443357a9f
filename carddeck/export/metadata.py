"""CardMeta inside the ONNX file (``metadata_props``) and beside it (``card.json``), written atomically.

Besides the CardMeta JSON under :data:`carddeck.card.METADATA_KEY`, an exported card carries the
SHA-256 of its serialized graph under :data:`GRAPH_DIGEST_KEY`. Flipped bytes inside raw weight
data still parse as valid protobuf, so without the digest such a corruption would load silently.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import onnx
from onnx import helper

from carddeck.card import METADATA_KEY, CardMeta

GRAPH_DIGEST_KEY = "carddeck.graph_sha256"
PRODUCER = "carddeck"


def graph_digest(model: onnx.ModelProto) -> str:
    """SHA-256 of the serialized graph (weights, nodes, sparse initializers), hex."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def embed_meta(model: onnx.ModelProto, meta: CardMeta) -> onnx.ModelProto:
    """Store ``meta`` and the graph digest in ``model.metadata_props`` (replacing old values); returns model."""
    from carddeck import __version__

    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = meta.to_json()
    props[GRAPH_DIGEST_KEY] = graph_digest(model)
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    model.producer_name = PRODUCER
    model.producer_version = __version__
    model.doc_string = f"CARD {meta.key}: {meta.architecture}, {meta.compression.method}, domain {meta.domain}"
    return model


def meta_from_model(model: onnx.ModelProto) -> CardMeta | None:
    """The CardMeta embedded in ``model``, or None when it has none (raises InvalidInput when malformed)."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return CardMeta.from_json(prop.value, source=f"metadata_props[{METADATA_KEY!r}]")
    return None


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not every filesystem allows opening a directory
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def card_json_path(onnx_path: Path) -> Path:
    """``card.json`` next to the ONNX file (``model.onnx`` -> ``card.json`` in the same directory)."""
    return Path(onnx_path).with_name("card.json")


def write_card_json(meta: CardMeta, path: Path) -> None:
    write_atomic(path, meta.to_json().encode())


__all__ = [
    "GRAPH_DIGEST_KEY",
    "card_json_path",
    "embed_meta",
    "graph_digest",
    "meta_from_model",
    "write_atomic",
    "write_card_json",
]
