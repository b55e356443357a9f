"""CardMeta inside the ONNX file (``metadata_props``) and beside it (``card.json``), written atomically.

Besides the CardMeta JSON under :data:`carddeck.card.METADATA_KEY`, an exported card carries the
SHA-256 of its serialized graph under :data:`GRAPH_DIGEST_KEY`. The digest, atomic writes and reading
a card back live in the torch-free :mod:`carddeck.deck.cardfile`, shared with the deck store.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper

from carddeck.card import METADATA_KEY, CardMeta
from carddeck.deck.cardfile import GRAPH_DIGEST_KEY, atomic_write, graph_digest

PRODUCER = "carddeck"


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


def card_json_path(onnx_path: Path) -> Path:
    """``card.json`` next to the ONNX file (``model.onnx`` -> ``card.json`` in the same directory)."""
    return Path(onnx_path).with_name("card.json")


def write_card_json(meta: CardMeta, path: Path) -> None:
    atomic_write(path, meta.to_json().encode())


__all__ = ["card_json_path", "embed_meta", "write_card_json"]
