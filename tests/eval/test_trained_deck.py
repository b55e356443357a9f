"""A small deck of really trained, exported CARDs (slow: trains four tiny ResNet-20s)."""

import json
from pathlib import Path

import numpy as np
import pytest

from carddeck.commands.cli import main
from carddeck.data.corruptions import corrupt
from carddeck.data.datasets import load_dataset
from carddeck.deck import Deck, DeckStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def trained_deck(tmp_path_factory) -> Path:
    from carddeck.compress.pipeline import CompressConfig, compress
    from carddeck.export import export_card

    root = tmp_path_factory.mktemp("trained")
    store = DeckStore.create(root / "deck")
    for domain in ("gaussian", "augmix"):
        for seed in (0, 1):
            name = f"tiny-{domain}-{seed}"
            config = CompressConfig(
                arch="resnet20",
                out=root / name,
                domain=domain,
                method="dense",
                epochs=4,
                seed=seed,
                arch_kwargs={"stage_widths": [8, 16, 16]},
                corruptions=(),
                name=name,
                progress=False,
            )
            compress(config)
            report = export_card(root / name, root / name / "model.onnx")
            assert report.meta.signature is not None  # the exporter signs the card with the gate's code
            store.add_card(report.path)
    return store.root


def test_nearest_domain_routes_noise_to_gaussian_and_fog_contrast_to_augmix(trained_deck):
    deck = Deck.open(trained_deck)
    images = load_dataset("digits32", "test").images[:64]
    gaussian = tuple(c.name for c in deck.cards if c.domain == "gaussian")
    augmix = tuple(c.name for c in deck.cards if c.domain == "augmix")
    for severity in (2, 3, 4, 5):
        assert deck.predict(corrupt(images, "gaussian_noise", severity)).routing.selected == gaussian
        assert deck.predict(corrupt(images, "fog", severity)).routing.selected == augmix
        assert deck.predict(corrupt(images, "contrast", severity)).routing.selected == augmix


def test_eval_on_the_trained_deck(trained_deck, tmp_path):
    out = tmp_path / "report"
    args = ["eval", "--deck", str(trained_deck), "--corruptions", "gaussian_noise,fog,contrast", "--severities", "3,5"]
    assert main([*args, "--out", str(out)]) == 0
    data = json.loads((out / "eval.json").read_text())
    methods = data["methods"]
    for method, row in methods.items():
        if method.startswith("card:"):  # the oracle picks the best card per condition
            assert row["mean_corrupted"] <= methods["oracle"]["mean_corrupted"] + 1e-9
    assert methods["nearest-domain"]["cards_per_image"] == 2.0 and methods["uniform"]["cards_per_image"] == 4.0
    assert np.isfinite(methods["calibrated"]["mean_corrupted"])
