"""Which detector judges a request: only one fitted for the cards the request ran on.

A deck change swaps the snapshot first and loads its detector after (``ShiftLoader`` listens to the
swap), so for a moment the monitor still holds the previous deck's detector. Real cards of the default
deck in a deck of their own, real ONNX Runtime sessions, the real micro-batcher.
"""

from __future__ import annotations

import numpy as np
import pytest

from carddeck.data.datasets import load_dataset
from carddeck.deck import Deck
from carddeck.deck.default import default_deck_path
from carddeck.eval.adaptation import deck_detector
from carddeck.observability.shift import ShiftMonitor
from carddeck.serving.dataplane import Dataplane, DataplaneConfig
from tests.serving.test_adaptation import conv_deck  # noqa: F401 (the two-card deck)


@pytest.mark.parametrize("batching", [True, False])
def test_a_detector_fitted_for_other_cards_leaves_the_answer_unknown(conv_deck, batching):  # noqa: F811
    """The default deck's detector (eight cards) in the monitor of a two-card deck's server, as between a
    swap and the detector's load: the answer says unknown, never a verdict on the other deck's statistics
    (kills a micro-batch that judges without the cards it ran on)."""
    detector = deck_detector(Deck.open(default_deck_path()))
    assert detector is not None and len(detector.notes["cards"]) == 8
    images = load_dataset("digits32", "test").images[:16]
    config = DataplaneConfig(deck_path=conv_deck, poll_interval_s=0, batching=batching)
    dp = Dataplane(config)
    dp.start()
    monitor = ShiftMonitor()
    monitor.set_detector(detector)
    dp.judge = monitor.judge
    try:
        answer, _ = dp.predict(images)
        assert answer.verdict is not None
        assert answer.verdict.state == "unknown" and np.isnan(answer.verdict.out_of_scope).all()
        # the same detector judges a request that ran on its own cards (the check above is not vacuous)
        keys = tuple(detector.notes["cards"])
        (judged,) = monitor.judge([("m", dp.deck.prepare(images), None, answer.probabilities)], cards=keys)
        assert judged.state != "unknown"
    finally:
        dp.close()
