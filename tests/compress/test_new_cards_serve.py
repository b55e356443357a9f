"""A lobs, a dsa and a dipgo card leave through the export path with parity and serve in a deck."""

import numpy as np
import pytest
import torch

from carddeck.card import CardMeta
from carddeck.compress import CompressConfig, compress, load_card
from carddeck.data.datasets import load_dataset
from carddeck.deck import Deck, DeckStore, read_card_meta
from carddeck.export import export_card
from carddeck.nets import count_flops, prunable_modules


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """480/160 digits32 images: enough for a card well above chance, which export insists on."""
    d = load_dataset("digits32", "train")
    path = tmp_path_factory.mktemp("data") / "small.npz"
    np.savez(path, train_images=d.images[:480], train_labels=d.labels[:480], val_images=d.images[480:640],
             val_labels=d.labels[480:640], test_images=d.images[640:660], test_labels=d.labels[640:660])  # fmt: skip
    return f"npz:{path}"


@pytest.mark.integration
def test_each_new_method_exports_with_parity_and_predicts_in_a_deck(tmp_path, small_data):
    tiny_data = small_data
    base = dict(arch="resnet20", width=0.25, data=tiny_data, batch_size=32, corruptions=(), progress=False)
    dense = compress(CompressConfig(out=tmp_path / "dense", method="dense", epochs=4, **base))
    runs = {
        "lobs": dict(sparsity=0.8, allocation="uniform"),
        "dsa": dict(sparsity=0.8, population=3, generations=2),
        "dipgo": dict(sparsity=0.5, gate_steps=10, epochs=0),  # as pruned: 1 epoch at lr 0.1 can undo it
    }
    store = DeckStore.create(tmp_path / "deck")
    val = load_dataset(tiny_data, "val")
    for method, kw in runs.items():
        kw = {"epochs": 1, **kw}
        result = compress(CompressConfig(out=tmp_path / method, method=method, init=dense.card,
                                         calib_images=64, name=f"tiny-{method}", **base, **kw))  # fmt: skip
        meta = result.meta
        assert meta.compression.method == method and meta.schema_version == 2
        model, _, _ = load_card(result.card)
        if method == "dipgo":
            assert meta.compression.structured
            assert count_flops(model) == pytest.approx(0.5 * dense.flops, rel=0.02)
        else:
            layers = prunable_modules(model)
            assert len(meta.compression.layer_sparsity) == len(layers)
            for (name, m), s in zip(layers.items(), meta.compression.layer_sparsity):
                assert float((m.weight == 0).float().mean()) == pytest.approx(s, abs=1e-6), name
            if method == "lobs":
                assert meta.compression.allocation == "uniform"
            else:  # DSA's discovered function
                assert "@ range" in meta.compression.allocation
        out = tmp_path / "onnx" / method / "model.onnx"
        report = export_card(result.card, out, data=tiny_data, calibration_images=64, signature_images=64)
        assert report.format == ("dense" if method == "dipgo" else "sparse")
        onnx_meta = read_card_meta(out)
        assert onnx_meta.compression == meta.compression  # the allocation travels in the ONNX metadata
        assert CardMeta.from_json(onnx_meta.to_json()) == onnx_meta
        store.add_card(out)
        x = torch.from_numpy(val.images).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            expected = torch.softmax(model(x), 1).numpy()
        deck = Deck.open(tmp_path / "deck")
        probs = deck.run_card(f"tiny-{method}", val.images)
        assert np.abs(probs - expected).max() <= 1e-3
    deck = Deck.open(tmp_path / "deck")
    assert sorted(c.name for c in deck.cards) == ["tiny-dipgo", "tiny-dsa", "tiny-lobs"]
    pred = deck.predict(val.images, policy="uniform")
    assert pred.labels.shape == (len(val),) and np.allclose(pred.probabilities.sum(1), 1.0, atol=1e-4)
