"""When a request is served by the cards' adaptive variants (test-time adaptation, :mod:`carddeck.deck.adapt`).

Adaptation pays on large enough batches under shifts the cards were not trained for, and costs a
little on clean data and on shifts the cards already handle (Schneider et al. 2020; models/REPORT.md),
so it runs only when the shift signal calls the request's own images shifted beyond what the deck
covers (``TRIGGER_STATES``), the request holds at least ``min_batch`` of them, and its unadapted
answer spreads over most classes (``MIN_SPREAD``: a request of one class is not a shift to undo).
The statistics then come from that request's images alone: nothing is carried from one request to
the next, and requests that share a micro-batch never share statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from carddeck.deck.adapt import MIN_BATCH

if TYPE_CHECKING:
    from carddeck.gating.shift import Trust

SHIFTED_STATES = ("covered", "uncovered")  # anything but in-distribution
# Adapt only shifts the deck does not cover. Measured on digits32 val (benchmarks/bench_adapt.py
# --triggers; N=16, min batch 32, each corruption held out of the detector), against unadapted:
# any shift -0.10 points mean corrupted (98% of corrupted batches adapted), uncovered only -0.05 (92%),
# both +0.0 clean; the covered blurs lose less (defocus -0.5 -> -0.1, motion -0.6 -> -0.2).
TRIGGER_STATES = ("uncovered",)
# Nor a request of few classes: batch statistics then carry its class as much as its shift, and
# renormalising them away lost leaves32 (whose splits are stored class by class, so a 64-image batch holds
# one or two classes) 69 points on clean batches and 67 corrupted. Measured on val of both development
# decks, each batch class-sorted and shuffled (N=16, uncovered, detector without the condition's
# corruption), against unadapted: with no spread guard, class-sorted batches lost 16.1 points corrupted
# (leaves32; contrast -38.7) and 12.9 (digits32); at 0.6 -0.7 and -0.6, at 0.8 -0.03 (contrast -0.4) and
# 0, at 0.85 nothing; shuffled batches (spread 0.9-1.0) were adapted as before at every guard.
MIN_SPREAD = 0.85


def class_spread(probabilities: np.ndarray) -> float:
    """How many classes the request's answer spreads over, as a share of all classes: the effective
    number (exp of the entropy) of its mean probabilities, over the number of classes. About 1 for a
    request that mixes every class, about 1/C for one of a single class."""
    mean = np.asarray(probabilities, np.float64).mean(axis=0)
    return float(np.exp(-np.sum(mean * np.log(np.maximum(mean, 1e-12)))) / len(mean))


@dataclass(frozen=True)
class Trigger:
    min_batch: int = MIN_BATCH
    states: tuple[str, ...] | None = TRIGGER_STATES  # None: every request of min_batch images (evaluation only)
    min_spread: float = MIN_SPREAD  # 0: adapt requests of any class mix

    def fires_on(self, verdict: Trust | None, probabilities: np.ndarray) -> bool:
        """On a request's verdict and its unadapted answer [n, C]: only a verdict on the request's own batch
        counts (a window of other requests' images says nothing about this one's statistics)."""
        if self.min_batch <= 0 or len(probabilities) < self.min_batch:
            return False
        if self.states is not None and not (
            verdict is not None and verdict.scope == "batch" and verdict.state in self.states
        ):
            return False
        return class_spread(probabilities) >= self.min_spread


__all__ = ["MIN_SPREAD", "SHIFTED_STATES", "TRIGGER_STATES", "Trigger", "class_spread"]
