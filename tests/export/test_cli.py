"""`carddeck export` end to end on a card.pt in the checkpoint format `carddeck compress` writes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from carddeck.card import CardMeta, Compression, InputSpec, Provenance
from carddeck.commands.cli import main
from carddeck.compress.checkpoint import save_card
from carddeck.deck import read_card_meta
from carddeck.nets import build_net, prunable_modules
from tests.cards import tiny_meta
from tests.export.conftest import accuracy, train


@pytest.fixture(scope="module")
def lrr_checkpoint(tmp_path_factory, digits):
    """A small resnet20 trained on digits32, then 90% of each conv/linear weight set exactly to zero
    and fine-tuned with the mask held, saved as card.pt (its CardMeta records digits32)."""
    torch.manual_seed(0)
    kwargs = {"stage_widths": [8, 16, 16], "mean": [0.1, 0.1, 0.1], "std": [0.3, 0.3, 0.3]}  # small: trains in seconds
    net = build_net("resnet20", 10, **kwargs)
    train(net, digits["train"], 3)
    masks = {}
    with torch.no_grad():
        for name, m in prunable_modules(net).items():
            threshold = m.weight.abs().flatten().kthvalue(int(0.9 * m.weight.numel())).values
            masks[name] = (m.weight.abs() > threshold).float()
            m.weight.mul_(masks[name])

    def hold_mask(model):
        with torch.no_grad():
            for name, m in prunable_modules(model).items():
                m.weight.mul_(masks[name])

    train(net, digits["train"], 1, after_step=hold_mask, lr=0.02)
    assert accuracy(net.eval(), digits["val"]) > 0.25  # above export's near-chance limit (20%)
    meta = tiny_meta("resnet20-lrr", domain="augmix").replace(
        architecture="resnet20",
        input=InputSpec(height=32, width=32, mean=(0.1, 0.1, 0.1), std=(0.3, 0.3, 0.3)),
        compression=Compression(method="lrr", sparsity=0.9),
        provenance=Provenance(dataset="digits32", seed=0),
    )
    out = tmp_path_factory.mktemp("ckpt")
    save_card(out, "resnet20", kwargs, net, meta)
    return out


def test_binary_format_of_a_card_that_is_not_binary_is_refused_before_any_work(lrr_checkpoint, tmp_path, capsys):
    """Mutant: --format binary accepted for any card (as before: the lrr card was quantized to int8 and written)."""
    out = tmp_path / "card.onnx"
    assert main(["export", str(lrr_checkpoint / "card.pt"), "--out", str(out), "--format", "binary"]) == 2
    err = capsys.readouterr().err
    assert "--format binary does not apply to a 'lrr' card" in err
    assert "formats for it: auto (sparse), sparse, dense" in err
    assert not out.exists()


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
    assert report["compression_ratio"] >= 2.5  # 90% sparse; small tensors carry relatively more overhead
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


def test_export_checks_parity_on_the_cards_own_dataset(lrr_checkpoint, tmp_path, capsys):
    """No --data: the card's CardMeta names digits32, so parity runs there, quietly."""
    out = tmp_path / "model.onnx"
    assert main(["export", str(lrr_checkpoint), "--out", str(out), "--parity-images", "64", "--json"]) == 0
    captured = capsys.readouterr()
    assert "WARNING" not in captured.err
    assert json.loads(captured.out)["parity"]["torch_accuracy"] > 0.25


def test_export_on_other_data_warns_and_refuses_a_near_chance_card(lrr_checkpoint, tmp_path, capsys):
    """leaves32 also has 10 classes: before the fix, parity on it passed at chance accuracy."""
    out = tmp_path / "model.onnx"
    code = main(["export", str(lrr_checkpoint), "--out", str(out), "--data", "leaves32", "--parity-images", "64"])
    err = capsys.readouterr().err
    assert code == 2
    assert "WARNING: card resnet20-lrr/1 was trained on digits32, but --data leaves32 was given" in err
    assert "near chance" in err and "its CardMeta says digits32" in err
    assert not out.exists()


def test_export_of_a_card_without_a_recorded_dataset_asks_for_one(lrr_checkpoint, tmp_path, capsys):
    ckpt = torch.load(lrr_checkpoint / "card.pt", weights_only=True)
    ckpt["meta"]["provenance"]["dataset"] = ""
    torch.save(ckpt, tmp_path / "card.pt")
    assert main(["export", str(tmp_path / "card.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "records no training dataset; name one with --data" in capsys.readouterr().err


def test_a_card_near_chance_on_its_own_data_is_told_to_train_longer(lrr_checkpoint, tmp_path, capsys):
    """A card that never learned (weights scrambled) scores near chance on its own dataset: the refusal says
    to train it longer, not that the data is the wrong one (which it is not). Mutant: the wrong-data text for
    both, as before (a new user's one-epoch card was told digits32 was not its data, while its CardMeta said
    digits32)."""
    ckpt = torch.load(lrr_checkpoint / "card.pt", weights_only=True)
    ckpt["state_dict"] = {k: torch.zeros_like(v) if k.endswith("weight") else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "card.pt")
    out = tmp_path / "model.onnx"
    assert main(["export", str(tmp_path / "card.pt"), "--out", str(out), "--parity-images", "64"]) == 2
    err = capsys.readouterr().err
    assert "near chance" in err and "not learned its own data: train it longer" in err, err
    assert "not the data it was trained for" not in err and not out.exists()


def test_an_out_under_a_file_is_named_before_the_export(tmp_path, capsys):
    """Mutant: the plain Path type (before): Python's "[Errno 17] File exists: 'afile'" after the export's work."""
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tmp_path / "nothere"), "--out", str(tmp_path / "afile" / "model.onnx")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument --out: {tmp_path / 'afile'} is a file, not a directory" in err, err
