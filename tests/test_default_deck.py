"""Keeps the committed default deck in models/ honest, and checks the gate on real trained CARDs."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from carddeck.card import CardMeta
from carddeck.data import load_dataset
from carddeck.data.corruptions import BENCHMARK_CORRUPTIONS, corrupt
from carddeck.deck import Deck, DeckStore, read_card_meta
from carddeck.gating.signature import sample_features

ROOT = Path(__file__).resolve().parents[1]
DECK = Path(os.environ.get("CARDDECK_TEST_DECK", ROOT / "models"))
REPORT = DECK / "report" / "eval.json"


@pytest.fixture(scope="module")
def deck() -> Deck:
    return Deck.open(DECK)


@pytest.fixture(scope="module")
def test_split():
    return load_dataset("digits32", "test")


def test_manifest_hashes_match_the_files():
    store = DeckStore(DECK)
    entries = store.manifest().cards
    assert len(entries) >= 6
    for entry in entries:
        for name, digest in entry.sha256.items():
            data = (DECK / entry.path / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest, f"{entry.path}/{name} changed"


def test_every_card_meta_validates_and_matches_its_onnx_file():
    store = DeckStore(DECK)
    for entry in store.manifest().cards:
        card_dir = DECK / entry.path
        from_json = CardMeta.from_json((card_dir / "card.json").read_text(), source=str(card_dir / "card.json"))
        assert read_card_meta(card_dir / "model.onnx") == from_json
        assert from_json.signature is not None


def test_the_deck_mixes_domains_and_methods(deck: Deck):
    pairs = {(m.domain, m.compression.method) for m in deck.cards}
    assert {d for d, _ in pairs} >= {"augmix", "gaussian", "lowfreq"}
    assert {m for _, m in pairs} >= {"lrr", "biprop", "filter"}
    total = sum(p.stat().st_size for p in DECK.rglob("*") if p.is_file())
    assert total < 10 * 2**20, f"the default deck is {total / 2**20:.1f} MiB, over the 10 MiB budget"


@pytest.fixture(scope="module")
def clean_probs(deck: Deck, test_split) -> np.ndarray:
    """Each card's probabilities on the clean test split, [K, N, classes] in card order."""
    return np.stack([deck.run_card(name, test_split.images) for name in deck.card_names])


def test_each_card_accuracy_matches_the_recorded_figure(deck: Deck, test_split, clean_probs):
    recorded = json.loads(REPORT.read_text())["methods"]
    for name, probs in zip(deck.card_names, clean_probs):
        accuracy = float((probs.argmax(1) == test_split.labels).mean())
        assert abs(accuracy - recorded[f"card:{name}"]["clean"]) <= 0.005, name


def test_the_committed_report_shows_a_gate_beating_uniform_and_the_best_card_with_half_the_cards():
    methods = json.loads(REPORT.read_text())["methods"]
    cards = [m for m in methods if m.startswith("card:")]
    best_card = max(methods[m]["mean_corrupted"] for m in cards)
    uniform = methods["uniform"]["mean_corrupted"]
    winners = [
        m
        for m, r in methods.items()
        if m not in cards
        and m not in ("uniform", "oracle", "set-oracle")  # the oracles know the labels
        and r["mean_corrupted"] >= max(best_card, uniform)
        and r["cards_per_image"] <= len(cards) / 2
    ]
    assert winners, f"no gate policy reaches max(best card {best_card:.4f}, uniform {uniform:.4f}) with <= half"


@pytest.mark.parametrize(
    ("corruption", "severity", "domain"),
    [
        ("gaussian_noise", 5, "gaussian"),
        ("shot_noise", 5, "gaussian"),
        ("fog", 5, "augmix"),
        ("contrast", 5, "lowfreq"),
    ],
)
def test_nearest_domain_routes_by_spectrum(deck: Deck, test_split, corruption, severity, domain):
    images = corrupt(test_split.images[:64], corruption, severity, seed=3)
    routing = deck.route(images, policy="nearest-domain")
    domains = {m.name: m.domain for m in deck.cards}
    assert routing.selected and {domains[c] for c in routing.selected} == {domain}


def test_the_gated_deck_predicts_well_on_clean_and_noisy_images(deck: Deck, test_split):
    for images in (test_split.images, corrupt(test_split.images, "gaussian_noise", 4, seed=5)):
        pred = deck.predict(images)
        assert pred.probabilities.shape == (len(images), 10)
        assert np.allclose(pred.probabilities.sum(1), 1, atol=1e-4)
        assert (pred.labels == test_split.labels).mean() > 0.9


def test_the_committed_report_has_the_set_oracle_at_least_the_single_card_oracle():
    methods = json.loads(REPORT.read_text())["methods"]
    single, sets = methods["oracle"]["per_condition"], methods["set-oracle"]["per_condition"]
    assert set(single) == set(sets) and len(single) == 76
    assert all(sets[c] >= single[c] for c in single)
    assert methods["set-oracle"]["cards_per_image"] <= len([m for m in methods if m.startswith("card:")]) / 2


# -- the README's gate figures, recomputed on a sample (the committed report is checked above) -------------
SAMPLE = 32  # test images per corruption and severity: all 15 benchmark corruptions at severities 3 and 5
SEVERITIES = (3, 5)


@pytest.fixture(scope="module")
def recomputed(deck: Deck, test_split, clean_probs) -> dict[str, object]:
    """Every card once over the clean test split and a fixed corrupted sample (one ONNX run per card),
    each condition routed as one batch by the deck's own gate and default policy, combined like the deck
    combines (the weighted mean of the routed cards' probabilities; checked against ``deck.predict``)."""
    pick = np.sort(np.random.default_rng(0).choice(len(test_split.images), SAMPLE, replace=False))
    conditions = [("clean", 0, test_split.images, test_split.labels)]
    conditions += [(c, s, corrupt(test_split.images[pick], c, s, seed=0), test_split.labels[pick])
                   for c in BENCHMARK_CORRUPTIONS for s in SEVERITIES]  # fmt: skip
    images = np.concatenate([c[2] for c in conditions[1:]])
    corrupted = np.stack([deck.run_card(name, images) for name in deck.card_names])
    probs = np.concatenate([clean_probs, corrupted], axis=1)  # [K, N, classes]
    out: dict[str, list[float]] = {"default": [], "uniform": [], "cards_per_image": []}
    card_acc = []
    start = 0
    for _, _, x, y in conditions:
        p = probs[:, start : start + len(x)]
        start += len(x)
        routing = deck.route(x)  # the default policy, one batch per condition as the eval runs it
        w = routing.weights.T[..., None]  # [K, n, 1]
        combined = (w * p).sum(0) / w.sum(0)
        out["default"].append(float((combined.argmax(1) == y).mean()))
        out["uniform"].append(float((p.mean(0).argmax(1) == y).mean()))
        out["cards_per_image"].append(routing.cards_per_image)
        card_acc.append((p.argmax(2) == y).mean(1))
    x = conditions[-1][2]  # the shortcut above is the deck's own combination
    np.testing.assert_allclose(deck.predict(x).probabilities, combined, atol=1e-5)
    return {**out, "cards": np.array(card_acc)}  # cards: [conditions, K]


def test_the_default_policy_costs_no_clean_accuracy(deck: Deck, recomputed):
    """On the whole clean test split, the deck's default gate is at least as accurate as the best single
    card and as the uniform deck, within 0.3 points (the README's claim)."""
    default, uniform, best_card = recomputed["default"][0], recomputed["uniform"][0], recomputed["cards"][0].max()
    assert default >= max(best_card, uniform) - 0.003, (deck.default_policy, default, best_card, uniform)


def test_the_default_policy_beats_both_baselines_on_a_corrupted_sample(deck: Deck, recomputed):
    """On a fixed sample of the corrupted test split (every benchmark corruption, severities 3 and 5), the
    default gate is at least 1 point above the uniform deck and the best single card, running at most half
    the cards per image."""
    default = float(np.mean(recomputed["default"][1:]))
    uniform = float(np.mean(recomputed["uniform"][1:]))
    best_card = float(recomputed["cards"][1:].mean(0).max())
    assert default >= max(best_card, uniform) + 0.01, (deck.default_policy, default, best_card, uniform)
    assert np.mean(recomputed["cards_per_image"][1:]) <= len(deck.cards) / 2


def test_the_committed_report_has_the_default_policy_at_no_clean_cost(deck: Deck):
    methods = json.loads(REPORT.read_text())["methods"]
    best_card = max(r["clean"] for m, r in methods.items() if m.startswith("card:"))
    default = methods[deck.default_policy]["clean"]
    assert default >= max(best_card, methods["uniform"]["clean"]) - 0.003


def test_clean_guard_sends_clean_batches_to_the_clean_set(deck: Deck, test_split):
    """Every clean test batch (64 images, as served) runs the set best on clean validation data."""
    router = deck.gate.router
    assert router is not None and router.has_guard
    clean_set = {router.card_keys[k].split("/")[0] for k in np.flatnonzero(router.subsets[router.clean_set()])}
    for start in range(0, len(test_split.images) - 63, 64):
        routing = deck.route(test_split.images[start : start + 64], policy="guarded")
        assert set(routing.selected) == clean_set, start
    # and heavy fog is not mistaken for clean data
    fog = corrupt(test_split.images[:64], "fog", 5, seed=3)
    assert not router.near_clean(sample_features(fog).mean(axis=0, keepdims=True)).any()


def test_the_committed_report_has_the_default_policy_beating_both_baselines_on_held_out_corruptions(deck: Deck):
    """With each corruption held out of its calibration, the default gate is at least 1 point above
    the uniform deck and the best single card, running at most half the cards per image."""
    methods = json.loads(REPORT.read_text())["methods"]
    cards = [m for m in methods if m.startswith("card:")]
    best_card = max(methods[m]["mean_corrupted"] for m in cards)
    held_out = methods[f"{deck.default_policy}/held-out"]
    assert held_out["mean_corrupted"] >= max(best_card, methods["uniform"]["mean_corrupted"]) + 0.01
    assert held_out["cards_per_image"] <= len(cards) / 2
