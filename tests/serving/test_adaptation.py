"""Test-time adaptation in the data plane: only on the request's own images, never across requests.

Real cards (two of the default deck's ResNet-20s, one of them int8), real ONNX Runtime sessions, the
real micro-batcher; the shift detector is the default deck's.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from carddeck.data.corruptions import corrupt
from carddeck.data.datasets import load_dataset
from carddeck.deck import Deck, DeckStore
from carddeck.deck.default import default_deck_path
from carddeck.eval.adaptation import deck_detector, served_verdicts
from carddeck.observability.shift import ShiftLoader, ShiftMonitor
from carddeck.serving.adaptation import Trigger, class_spread
from carddeck.serving.dataplane import Dataplane, DataplaneConfig
from tests.serving.test_dataplane import BatchSizes

CARDS = ("resnet20-augmix-filter", "resnet20-gaussian-biprop")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return load_dataset("digits32", "test").images


@pytest.fixture(scope="module")
def conv_deck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two convolutional cards of the default deck and its calibration images, in a deck of their own."""
    source = DeckStore(default_deck_path())
    root = tmp_path_factory.mktemp("adapt") / "deck"
    store = DeckStore.create(root)
    for name in CARDS:
        store.add_card(source.read_model(source.manifest().find(name)))
    calibration = source.calibration_images()
    assert calibration is not None
    store.set_calibration(calibration)
    return root


def _dataplane(root: Path, sizes: BatchSizes | None = None, min_batch: int = 16) -> Dataplane:
    config = DataplaneConfig(deck_path=root, poll_interval_s=0, max_batch_size=256, max_wait_s=0.05)
    dp = Dataplane(config, metrics=sizes)
    dp.start()
    dp.deck.warm_adaptive()
    # every large enough request adapts: this module tests where the statistics come from, not the trigger
    dp.adaptation = Trigger(min_batch=min_batch, states=None, min_spread=0.0)
    return dp


def test_a_request_is_adapted_on_its_own_images_whatever_shares_its_micro_batch(conv_deck, images):
    fogged = corrupt(images[:16], "fog", 5, seed=0)
    others = [corrupt(images[16 * i : 16 * (i + 1)], c, 5, seed=i) for i, c in enumerate(("snow", "contrast"), 2)]
    sizes = BatchSizes()
    dp = _dataplane(conv_deck, sizes)
    try:
        alone, _ = dp.predict(fogged)
        plain = Deck.open(conv_deck).predict(fogged)
        assert alone.adapted
        assert np.abs(alone.probabilities - plain.probabilities).max() > 0.05  # adaptation changed the answer
        requests = [fogged if i % 3 == 0 else others[i % 2] for i in range(24)]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda x: dp.predict(x)[0], requests))
        assert max(sizes.sizes) > 16  # some requests did share a micro-batch
        for x, got in zip(requests, answers):
            assert got.adapted
            if x is fogged:
                np.testing.assert_allclose(got.probabilities, alone.probabilities, atol=1e-5)
    finally:
        dp.close()


def test_small_requests_and_single_cards_are_served_unadapted(conv_deck, images):
    dp = _dataplane(conv_deck, min_batch=16)
    deck = Deck.open(conv_deck)
    try:
        small = corrupt(images[:15], "fog", 5, seed=0)
        got, _ = dp.predict(small)
        assert not got.adapted
        np.testing.assert_allclose(got.probabilities, deck.predict(small).probabilities, atol=1e-6)
        model = dp.resolve(CARDS[0])
        probs = dp.run_card(model, corrupt(images[:32], "fog", 5, seed=0))
        np.testing.assert_allclose(probs, deck.run_card(CARDS[0], corrupt(images[:32], "fog", 5, seed=0)), atol=1e-6)
    finally:
        dp.close()


def test_the_trigger_follows_the_shift_signal_on_the_default_deck(images):
    """Clean test batches stay unadapted; fogged ones are called shifted and adapted."""
    deck = Deck.open(default_deck_path())
    judge = served_verdicts(deck_detector(deck))
    assert judge is not None
    trigger = Trigger()

    def fires(batch: np.ndarray) -> bool:
        p = deck.predict(batch)
        return trigger.fires_on(judge(deck.prepare(batch), p.probabilities, p.routing.features), p.probabilities)

    assert not fires(images[:64]) and not fires(images[64:128])
    assert fires(corrupt(images[:64], "fog", 5, seed=0))
    assert not fires(corrupt(images[: trigger.min_batch - 1], "fog", 5, seed=0))  # too few images to adapt on


def test_the_server_adapts_on_the_verdict_every_answer_carries(images):
    """The serving path reads the per-request verdict: a fogged 64-image request (uncovered) comes back
    adapted with its verdict; clean requests and small fogged ones do not."""
    config = DataplaneConfig(deck_path=default_deck_path(), poll_interval_s=0, batching=False)
    dp = Dataplane(config)
    dp.start()
    monitor = ShiftMonitor()
    ShiftLoader(monitor)(dp.deck)
    dp.judge = monitor.judge
    dp.adaptation = Trigger()
    try:
        dp.deck.warm_adaptive()
        fogged, _ = dp.predict(corrupt(images[:64], "fog", 5, seed=0))
        assert fogged.adapted and fogged.verdict is not None and fogged.verdict.state == "uncovered"
        # carddeck eval judges a batch as this server does (kills testing all 64 images, not 16 spaced ones)
        x = dp.deck.prepare(corrupt(images[:64], "fog", 5, seed=0))
        plain = dp.deck.predict(x)
        judged = served_verdicts(monitor.detector)(x, plain.probabilities, plain.routing.features)  # type: ignore[misc]
        assert (judged.state, judged.scope) == (fogged.verdict.state, fogged.verdict.scope)
        assert judged.expected_accuracy == pytest.approx(fogged.verdict.expected_accuracy, abs=1e-9)
        clean, _ = dp.predict(images[:64])
        assert not clean.adapted and clean.verdict is not None and clean.verdict.state == "in_distribution"
        small, _ = dp.predict(corrupt(images[: Trigger().min_batch - 1], "fog", 5, seed=0))
        assert not small.adapted
    finally:
        dp.close()


def test_class_spread_counts_the_classes_an_answer_spreads_over():
    uniform = np.full((8, 10), 0.1)
    one = np.eye(10)[[3] * 8]
    two = np.eye(10)[[3, 7] * 4]
    assert class_spread(uniform) == pytest.approx(1.0)
    assert class_spread(one) == pytest.approx(0.1, abs=1e-6)
    assert class_spread(two) == pytest.approx(0.2, abs=1e-6)


def test_a_shifted_request_of_one_class_is_served_unadapted(images):
    """Batch statistics of a one-class request hold its class: renormalising them away turns a fogged
    request of threes from mostly right to mostly wrong. The shift signal still calls it uncovered; the
    spread guard keeps it unadapted, while a fogged request of every class is adapted. Kills the trigger
    without the guard (min_spread 0) and a guard that also blocks mixed requests."""
    deck = Deck.open(default_deck_path())
    judge = served_verdicts(deck_detector(deck))
    assert judge is not None
    train = load_dataset("digits32", "train")
    threes = deck.prepare(corrupt(train.images[train.labels == 3][:64], "fog", 5, seed=0))
    mixed = deck.prepare(corrupt(images[:64], "fog", 5, seed=0))
    trigger = Trigger()
    for x, one_class in ((threes, True), (mixed, False)):
        p = deck.predict(x)
        verdict = judge(x, p.probabilities, p.routing.features)
        assert verdict.state == "uncovered" and verdict.scope == "batch"
        assert Trigger(min_spread=0.0).fires_on(verdict, p.probabilities)
        assert trigger.fires_on(verdict, p.probabilities) is not one_class
        if one_class:  # why: adapted, the one-class request loses most of its answers
            adapted = deck.run_routed(x, p.routing.weights, adapt=True)
            assert (adapted.argmax(1) == 3).mean() < (p.probabilities.argmax(1) == 3).mean() - 0.3
