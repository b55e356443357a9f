"""When a request is served by the cards' adaptive variants (test-time adaptation, :mod:`carddeck.deck.adapt`).

Adaptation pays on large enough batches under shifts the cards were not trained for, and costs a
little on clean data and on shifts the cards already handle (Schneider et al. 2020; models/REPORT.md),
so it runs only when the shift signal calls the request's own images shifted beyond what the deck
covers (``TRIGGER_STATES``) and the request holds at least ``min_batch`` of them.
The statistics then come from that request's images alone: nothing is carried from one request to
the next, and requests that share a micro-batch never share statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from carddeck.deck.adapt import MIN_BATCH

if TYPE_CHECKING:
    from carddeck.gating.shift import ShiftDetector, Trust

SHIFTED_STATES = ("covered", "uncovered")  # anything but in-distribution
# Adapt only shifts the deck does not cover. Measured on digits32 val (benchmarks/bench_adapt.py
# --triggers; N=16, min batch 32, each corruption held out of the detector), against unadapted:
# any shift -0.10 points mean corrupted (98% of corrupted batches adapted), uncovered only -0.05 (92%),
# both +0.0 clean; the covered blurs lose less (defocus -0.5 -> -0.1, motion -0.6 -> -0.2).
TRIGGER_STATES = ("uncovered",)


def shift_state(
    detector: ShiftDetector, x: np.ndarray, probabilities: np.ndarray, gate_features: np.ndarray | None
) -> str:
    """The shift signal's state for one request's own images, from the detector (offline evaluation;
    the server reads the state from the verdict every answer carries, :meth:`Trigger.fires_on`)."""
    from carddeck.gating.shift import image_features

    return detector.test(image_features(x, probabilities, gate_features)).state


@dataclass(frozen=True)
class Trigger:
    min_batch: int = MIN_BATCH
    states: tuple[str, ...] | None = TRIGGER_STATES  # None: every request of min_batch images (evaluation only)

    def fires(
        self,
        detector: ShiftDetector | None,
        x: np.ndarray,
        probabilities: np.ndarray,
        gate_features: np.ndarray | None = None,
    ) -> bool:
        if self.min_batch <= 0 or len(x) < self.min_batch:
            return False
        if self.states is None:
            return True
        if detector is None:
            return False
        return shift_state(detector, x, probabilities, gate_features) in self.states

    def fires_on(self, verdict: Trust, n: int) -> bool:
        """On a request of ``n`` images and its verdict: only a verdict on the request's own batch counts
        (a window of other requests' images says nothing about this one's statistics)."""
        if self.min_batch <= 0 or n < self.min_batch:
            return False
        if self.states is None:
            return True
        return verdict.scope == "batch" and verdict.state in self.states


__all__ = ["SHIFTED_STATES", "TRIGGER_STATES", "Trigger", "shift_state"]
