"""`carddeck export` end to end on a card.pt in the checkpoint format `carddeck compress` writes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from carddeck.card import CardMeta, Compression, InputSpec
from carddeck.cli import main
from carddeck.compress.checkpoint import save_card
from carddeck.deck import read_card_meta
from carddeck.nets import build_net, prunable_modules
from tests.cards import tiny_meta


@pytest.fixture(scope="module")
def lrr_checkpoint(tmp_path_factory):
    """A small resnet20 with 90% of each conv/linear weight exactly zero, saved as card.pt."""
    torch.manual_seed(0)
    kwargs = {"width": 0.5, "mean": [0.1, 0.1, 0.1], "std": [0.3, 0.3, 0.3]}
    net = build_net("resnet20", 10, **kwargs).eval()
    with torch.no_grad():
        for m in prunable_modules(net).values():
            threshold = m.weight.abs().flatten().kthvalue(int(0.9 * m.weight.numel())).values
            m.weight.mul_((m.weight.abs() > threshold).float())
    meta = tiny_meta("resnet20-lrr", domain="augmix").replace(
        architecture="resnet20",
        input=InputSpec(height=32, width=32, mean=(0.1, 0.1, 0.1), std=(0.3, 0.3, 0.3)),
        compression=Compression(method="lrr", sparsity=0.9),
    )
    out = tmp_path_factory.mktemp("ckpt")
    save_card(out, "resnet20", kwargs, net, meta)
    return out


def test_export_command(lrr_checkpoint, tmp_path, capsys):
    out = tmp_path / "deck" / "model.onnx"
    umask = os.umask(0o022)
    try:
        code = main(["export", str(lrr_checkpoint / "card.pt"), "--out", str(out), "--parity-images", "64", "--json"])
    finally:
        os.umask(umask)
    assert code == 0
    for written in (out, out.parent / "card.json"):  # created files follow the umask (not mkstemp's 0600)
        assert oct(written.stat().st_mode & 0o777) == oct(0o644), written
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "sparse" and report["parity"]["passed"]
    assert report["parity"]["images"] == 64 and report["parity"]["agreement"] == 1.0
    assert report["compression_ratio"] >= 4.0
    meta = read_card_meta(out)
    assert meta.name == "resnet20-lrr" and meta.compression.method == "lrr"
    assert meta.signature is not None and len(meta.signature) > 1  # domain signature filled at export
    assert CardMeta.from_json((out.parent / "card.json").read_text()) == meta


def test_export_command_errors(lrr_checkpoint, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"format": "something-else"}, bad)
    assert main(["export", str(bad), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "expected 'carddeck-card/1'" in capsys.readouterr().err
    code = main(["export", str(lrr_checkpoint), "--out", str(tmp_path / "x.onnx"), "--max-accuracy-drop", "-3"])
    assert code == 2 and "max_accuracy_drop" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
