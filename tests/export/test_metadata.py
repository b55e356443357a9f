"""CardMeta round-trips through the exported ONNX file and card.json, readable without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx

from carddeck.card import METADATA_KEY, CardMeta
from carddeck.deck import read_card_meta
from carddeck.deck.cardfile import GRAPH_DIGEST_KEY, meta_from_model, read_card
from carddeck.export import export_model
from tests.export.conftest import card_meta


def test_meta_round_trip_through_onnx_and_card_json(dense_net, digits, tmp_path):
    meta = card_meta("dense-card", "dense").replace(signature=(0.5, 0.25, 0.125))
    out = tmp_path / "dense-card" / "model.onnx"
    report = export_model(dense_net, meta, out, images=digits["val"].images[:64], labels=digits["val"].labels[:64])

    assert report.path == out and out.is_file()
    model = onnx.load(out)
    props = {p.key: p.value for p in model.metadata_props}
    assert set(props) >= {METADATA_KEY, GRAPH_DIGEST_KEY}
    assert CardMeta.from_json(props[METADATA_KEY]) == meta
    assert meta_from_model(model) == meta
    assert read_card_meta(out) == meta  # the deck's torch-free reader
    assert read_card(out.read_bytes())[1] == meta
    assert CardMeta.from_json((tmp_path / "dense-card" / "card.json").read_text()) == meta
    assert json.loads(report.card_json.read_text())["name"] == "dense-card"
    assert not list(out.parent.glob("*.tmp"))  # atomic writes leave no temporaries


def test_card_contract_of_the_graph(dense_net, digits, tmp_path):
    meta = card_meta("contract", "dense")
    out = tmp_path / "c.onnx"
    export_model(dense_net, meta, out, images=digits["val"].images[:32], labels=digits["val"].labels[:32])
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    (outp,) = model.graph.output
    assert inp.name == "images" and outp.name == "logits"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["N", 3, 32, 32]
    assert [d.dim_param or d.dim_value for d in outp.type.tensor_type.shape.dim] == ["N", 10]
    ops = [n.op_type for n in model.graph.node]
    assert ops[:2] == ["Sub", "Div"]  # normalization inside the graph
    assert "BatchNormalization" not in ops and "Identity" not in ops


def test_reading_a_card_does_not_import_torch(dense_net, digits, tmp_path):
    out = tmp_path / "m.onnx"
    export_model(dense_net, card_meta("notorch", "dense"), out, images=digits["val"].images[:16], write_json=False)
    assert not (tmp_path / "card.json").exists()
    code = (
        "import sys; from carddeck.deck.cardfile import read_card; from carddeck.deck import read_card_meta;"
        f"m = read_card({str(out)!r}, load_session=True)[1]; assert read_card_meta({str(out)!r}) == m;"
        "assert 'torch' not in sys.modules, 'torch was imported'; print(m.name)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "notorch"
