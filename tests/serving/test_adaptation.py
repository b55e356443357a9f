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
from carddeck.gating.shift import Trust
from carddeck.observability.shift import ShiftLoader, ShiftMonitor
from carddeck.serving.adaptation import Trigger, balanced_classes, class_spread
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
        verdict = judge(deck.prepare(batch), p.probabilities, p.routing.features, p.agreement)
        return trigger.fires_on(verdict, p.probabilities)

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
        judge = served_verdicts(monitor.detector)
        assert judge is not None
        judged = judge(x, plain.probabilities, plain.routing.features, plain.agreement)
        assert (judged.state, judged.scope) == (fogged.verdict.state, fogged.verdict.scope)
        assert judged.expected_accuracy == pytest.approx(fogged.verdict.expected_accuracy, abs=1e-9)
        clean, _ = dp.predict(images[:64])
        assert not clean.adapted and clean.verdict is not None and clean.verdict.state == "in_distribution"
        small, _ = dp.predict(corrupt(images[: Trigger().min_batch - 1], "fog", 5, seed=0))
        assert not small.adapted
    finally:
        dp.close()


def test_class_spread_counts_the_classes_an_answer_names():
    """Against what n balanced draws can show, whatever C; top-1 counts, so a soft answer of one class is
    still one class. Kills measuring against all C classes (the old rule) and mean probabilities
    instead of counts."""
    for c in (10, 100):
        reference = balanced_classes(64, c)
        every = np.eye(c)[np.arange(64) % c]
        one = np.eye(c)[[3] * 64]
        two = np.eye(c)[[3, 7] * 32]
        assert class_spread(every) == pytest.approx(min(64, c) / reference, rel=5e-3)  # 10 classes: 6 or 7 each
        assert class_spread(one) == pytest.approx(1 / reference)
        assert class_spread(0.6 * one + 0.4 / c) == pytest.approx(1 / reference)
        assert class_spread(two) == pytest.approx(2 / reference)


def test_balanced_classes_is_the_effective_class_count_of_balanced_draws():
    """Exact against sampled: the exp of the mean entropy of the class shares of n draws from C balanced
    classes. Kills a reference of C, n or min(n, C) and a wrong binomial (e.g. drawing with p = 1/n)."""
    rng = np.random.default_rng(0)
    for n, c in ((32, 10), (64, 10), (64, 100), (256, 100)):
        shares = rng.multinomial(n, np.full(c, 1.0 / c), size=20000) / n
        entropy = -np.sum(np.where(shares > 0, shares * np.log(np.maximum(shares, 1e-300)), 0.0), axis=1)
        assert balanced_classes(n, c) == pytest.approx(np.exp(entropy.mean()), rel=2e-3)
    assert balanced_classes(1, 10) == pytest.approx(1.0)
    assert balanced_classes(100000, 10) == pytest.approx(10.0, rel=1e-3)


def _verdict(n: int) -> Trust:
    return Trust("uncovered", "batch", 0.5, "estimate", np.zeros(n, np.float32), np.zeros(n, np.float32))


@pytest.mark.parametrize("num_classes", [10, 100])
def test_the_spread_guard_adapts_mixed_requests_of_many_classes_and_blocks_few_class_ones(num_classes):
    """A 64-image request of a 100-class deck names about 43 classes at most, so the old rule (mean
    probabilities spread over 0.85 of all C) never adapted one; the guard must adapt a shifted request
    mixing the classes and still block one of two classes, as on a 10-class deck. Answers as a shifted
    deck gives them: the right class at 0.5, the rest spread over others. Kills the old rule (the mixed
    100-class request unadapted), mean probabilities against the balanced reference (their spread-out
    tails let the two-class 100-class request through) and no guard."""
    rng = np.random.default_rng(1)
    trigger = Trigger(min_batch=32)

    def answer(labels: np.ndarray) -> np.ndarray:
        p = rng.dirichlet(np.full(num_classes, 0.3), size=len(labels)) * 0.5
        p[np.arange(len(labels)), labels] += 0.5
        return p

    for n in (32, 64):
        verdict = Trust("uncovered", "batch", 0.5, "estimate", np.zeros(n, np.float32), np.zeros(n, np.float32))
        mixed = answer(rng.integers(0, num_classes, n))
        few = answer(rng.choice([4, 9], n))
        assert trigger.fires_on(verdict, mixed), (num_classes, n, class_spread(mixed))
        assert not trigger.fires_on(verdict, few), (num_classes, n, class_spread(few))
        if num_classes == 100:
            mean = mixed.mean(axis=0)
            assert np.exp(-np.sum(mean * np.log(mean))) / num_classes < 0.85  # the old rule: never adapted


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
        verdict = judge(x, p.probabilities, p.routing.features, p.agreement)
        assert verdict.state == "uncovered" and verdict.scope == "batch"
        assert Trigger(min_spread=0.0).fires_on(verdict, p.probabilities)
        assert trigger.fires_on(verdict, p.probabilities) is not one_class
        if one_class:  # why: adapted, the one-class request loses most of its answers
            adapted = deck.run_routed(x, p.routing.weights, adapt=True)
            assert (adapted.argmax(1) == 3).mean() < (p.probabilities.argmax(1) == 3).mean() - 0.3
