"""CardMeta schema 2: the allocation fields of lobs/dsa cards, with schema-1 cards still read as they were."""

import json
from pathlib import Path

import pytest

from carddeck.card import SCHEMA_VERSION, CardMeta
from carddeck.errors import InvalidInput

ROOT = Path(__file__).resolve().parents[2]


def _v1_json() -> str:
    cards = sorted((ROOT / "models" / "cards").glob("*/*/card.json"))
    assert cards, "the default deck's cards are schema-1 examples"
    return cards[0].read_text()


def test_a_schema_1_card_reads_and_writes_back_unchanged():
    text = _v1_json()
    meta = CardMeta.from_json(text)
    assert meta.schema_version == 1 and meta.compression.allocation is None
    assert json.loads(meta.to_json()) == json.loads(text)  # no null schema-2 fields appear


def test_schema_2_records_the_allocation_and_checks_it():
    meta = CardMeta.from_json(_v1_json())
    comp = meta.compression.__class__(
        method="dsa", sparsity=0.9, allocation="sub(depth, mag_mean) @ range 0.4", layer_sparsity=(0.5, 0.95, 1.0)
    )
    v2 = meta.replace(compression=comp, schema_version=SCHEMA_VERSION)
    assert SCHEMA_VERSION == 2
    again = CardMeta.from_json(v2.to_json())
    assert again == v2 and again.compression.layer_sparsity == (0.5, 0.95, 1.0)
    with pytest.raises(InvalidInput, match="need schema_version 2"):
        meta.replace(compression=comp)  # a schema-1 card cannot carry them
    with pytest.raises(InvalidInput, match="layer_sparsity"):
        v2.replace(compression=comp.__class__(method="dsa", sparsity=0.9, layer_sparsity=(0.5, 1.5)))
    with pytest.raises(InvalidInput, match="reads"):
        v2.replace(schema_version=3)
