"""A corrupted or truncated card file is refused with CardRejected naming the reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from carddeck.deck import DeckStore, read_card_meta
from carddeck.deck.cardfile import GRAPH_DIGEST_KEY, read_card
from carddeck.errors import CardRejected
from carddeck.export import export_model
from carddeck.export.metadata import embed_meta
from tests.export.conftest import card_meta


@pytest.fixture(scope="module")
def card_bytes(dense_net, digits, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("validate") / "card.onnx"
    export_model(dense_net, card_meta("valid", "dense"), out, images=digits["val"].images[:16], write_json=False)
    return out.read_bytes()


def test_valid_card_passes(card_bytes):
    _, meta = read_card(card_bytes, load_session=True)
    assert meta.name == "valid"


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file(card_bytes, tmp_path, fraction):
    path = tmp_path / "truncated.onnx"
    path.write_bytes(card_bytes[: int(len(card_bytes) * fraction)])
    with pytest.raises(CardRejected, match=r"truncated\.onnx: .*(truncated|empty|corrupted|digest|CardMeta)"):
        read_card(path)


def test_truncated_file_in_the_deck_reader(card_bytes):
    with pytest.raises(CardRejected, match="not an ONNX model"):
        read_card_meta(card_bytes[: len(card_bytes) // 2])


def test_garbage_bytes(card_bytes):
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(CardRejected, match="not a readable ONNX model|not a usable ONNX model"):
        read_card(garbage)
    with pytest.raises(CardRejected):
        read_card_meta(garbage)


def test_flipped_weight_bytes_are_caught_by_the_graph_digest(card_bytes):
    model = onnx.load_from_string(card_bytes)
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = bytearray(weight.raw_data)
    raw[len(raw) // 2] ^= 0x40  # still a valid float, still valid protobuf
    weight.raw_data = bytes(raw)
    corrupted = model.SerializeToString()
    assert len(corrupted) == len(card_bytes)
    with pytest.raises(CardRejected, match="graph digest mismatch"):
        read_card(corrupted)
    with pytest.raises(CardRejected, match="graph digest mismatch"):  # the deck's reader shares the check
        read_card_meta(corrupted)


def test_deck_store_refuses_flipped_weight_bytes(card_bytes, tmp_path):
    model = onnx.load_from_string(card_bytes)
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = bytearray(weight.raw_data)
    raw[len(raw) // 3] ^= 0x01
    weight.raw_data = bytes(raw)
    store = DeckStore.create(tmp_path / "deck")
    with pytest.raises(CardRejected, match="graph digest mismatch"):
        store.add_card(model.SerializeToString())
    assert store.manifest().version == 0
    # an intact card without a signature is signed by the store; the digest stays in the file and valid
    unsigned = embed_meta(onnx.load_from_string(card_bytes), read_card(card_bytes)[1].replace(signature=None))
    calibration = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    assert store.add_card(unsigned.SerializeToString(), calibration=calibration).signature is not None
    (entry,) = store.manifest().cards
    stored, meta = read_card(store.read_model(entry))
    assert meta.name == "valid" and meta.signature is not None
    assert GRAPH_DIGEST_KEY in {p.key for p in stored.metadata_props}


def test_missing_or_malformed_meta(card_bytes):
    model = onnx.load_from_string(card_bytes)
    for prop in model.metadata_props:
        if prop.key == "carddeck.card":
            prop.value = prop.value.replace('"num_classes": 10', '"num_classes": "ten"')
    with pytest.raises(CardRejected, match="malformed CardMeta.*num_classes"):
        read_card(model.SerializeToString())
    del model.metadata_props[:]
    with pytest.raises(CardRejected, match="no CardMeta"):
        read_card(model.SerializeToString())


def test_contract_violation(card_bytes):
    model = onnx.load_from_string(card_bytes)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 28
    embed_meta(model, read_card(card_bytes)[1])  # a consistent digest: only the contract is wrong
    with pytest.raises(CardRejected, match=r"input 'images' has shape \[.N., 3, 28, 32\], expected \[N, 3, 32, 32\]"):
        read_card(model.SerializeToString())


def test_unreadable_path(tmp_path):
    with pytest.raises(CardRejected, match="cannot read"):
        read_card(tmp_path / "missing.onnx")


def test_weight_tampering_is_not_the_digest_of_a_different_valid_card(card_bytes):
    # re-embedding after a change is what export does; a hand-edited weight without it is rejected
    model = onnx.load_from_string(card_bytes)
    init = model.graph.initializer[0]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, init.name))
    with pytest.raises(CardRejected, match="digest"):
        read_card(model.SerializeToString())
