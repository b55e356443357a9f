"""Exported cards of every format are accepted by the deck store and served by the Deck runtime."""

from __future__ import annotations

import numpy as np

from carddeck.deck import Deck, DeckStore
from carddeck.export import export_model
from carddeck.export.parity import softmax, torch_logits
from tests.export.conftest import card_meta, to_tensor


def test_deck_accepts_and_runs_each_format(dense_net, sparse_net, binary_net, filter_net, digits, tmp_path):
    val, train, test = digits["val"], digits["train"], digits["test"]
    cards = {
        "dense": (dense_net, card_meta("dense", "dense")),
        "sparse": (sparse_net, card_meta("sparse", "lrr", sparsity=0.9)),
        "binary": (binary_net, card_meta("binary", "biprop", sparsity=0.5, bits=1)),
        "filter": (filter_net, card_meta("filter", "filter", sparsity=0.5, structured=True)),
    }
    store = DeckStore.create(tmp_path / "deck")
    for name, (net, meta) in cards.items():
        out = tmp_path / name / "model.onnx"
        export_model(
            net,
            meta,
            out,
            images=np.concatenate([val.images, test.images]),  # finer steps for the int8 accuracy drop
            labels=np.concatenate([val.labels, test.labels]),
            calibration=train.images[:1024],  # 256 images: minmax clipped the binary card (0.56 points)
            signature_images=train.images[:128],
        )
        added = store.add_card(out)  # the signature was filled at export: no calibration images needed
        assert added == meta.replace(signature=added.signature) and added.signature is not None
    deck = Deck.open(tmp_path / "deck")
    assert sorted(c.name for c in deck.cards) == sorted(cards)
    x = to_tensor(test.images).numpy()
    for name, (net, _) in cards.items():
        probs = deck.run_card(name, test.images)
        expected = softmax(torch_logits(net, x))
        agreement = float(np.mean(probs.argmax(1) == expected.argmax(1)))
        if name == "binary":
            assert agreement >= 0.97  # int8 activations: judged by the accuracy drop at export
        else:
            assert agreement == 1.0 and np.abs(probs - expected).max() <= 1e-3
