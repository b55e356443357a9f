"""When a request is served by the cards' adaptive variants (test-time adaptation, :mod:`carddeck.deck.adapt`).

Adaptation pays on large enough batches under shifts the cards were not trained for, and costs a
little on clean data and on shifts the cards already handle (Schneider et al. 2020; models/REPORT.md),
so it runs only when the shift signal calls the request's own images shifted beyond what the deck
covers (``TRIGGER_STATES``), the request holds at least ``min_batch`` of them, and its unadapted
answer names most of the classes that many images could show (``MIN_SPREAD``: a request of one
class is not a shift to undo).
The statistics then come from that request's images alone: nothing is carried from one request to
the next, and requests that share a micro-batch never share statistics.
"""

from __future__ import annotations

import functools
import math
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
# both +0.0 clean; the covered blurs lose less (defocus -0.5 -> -0.1, motion -0.6 -> -0.2). Since new shifts
# the cards stay confident on are covered (gating/shift.py), fewer batches adapt: on val, severities 1, 3, 5,
# shuffled, min batch 64: digits32 37% -> 27% of corrupted batches, mean -0.12 -> -0.05 (the shot noise, snow
# and frost losses gone); leaves32 unchanged (+0.13, 6%).
TRIGGER_STATES = ("uncovered",)
# Nor a request of few classes: batch statistics then carry its class as much as its shift, and
# renormalising them away lost leaves32 (whose splits are stored class by class, so a 64-image batch holds
# one or two classes) 69 points on clean batches and 67 corrupted. Measured on val of both development
# decks, each batch class-sorted and shuffled (N=16, uncovered, detector without the condition's
# corruption), against unadapted: with no spread guard, class-sorted batches lost 16.1 points corrupted
# (leaves32; contrast -38.7) and 12.9 (digits32); at 0.6 -0.7 and -0.6, at 0.8 -0.03 (contrast -0.4) and
# 0, at 0.85 nothing; shuffled batches (spread 0.9-1.0) were adapted as before at every guard.
# That rule measured the mean probabilities' spread against all C classes: 64 images of a 100-class deck
# show about 43 classes at most, so no such request could ever adapt, and on 10-class decks soft answers
# let confused one-class batches pass (2 class-sorted 32-image leaves32 val batches). The guard now counts
# the classes the request's answers name, against what as many images drawn from every class would name
# (``balanced_classes``). On val of both development decks (every corruption and severity, batches of 32
# and 64, stored and shuffled; benchmarks/bench_adapt.py --spread), batches of one or two classes reach at
# most 0.50 of that reference, mixed batches at least 0.61 (32 images) and 0.80 (64): 0.55 splits them.
MIN_SPREAD = 0.55


@functools.lru_cache(maxsize=256)
def balanced_classes(n: int, num_classes: int) -> float:
    """The effective number of classes (exp of the expected entropy of the class shares) of ``n`` images
    drawn from ``num_classes`` balanced classes: about min(n, C) when one is much larger than the other,
    9.3 for 64 images of 10 classes, 43 for 64 of 100. Exact: each class's count is Binomial(n, 1/C)."""
    if n < 1 or num_classes < 1:
        return 1.0
    k = np.arange(n + 1, dtype=np.float64)
    p = 1.0 / num_classes
    log_pmf = (
        math.lgamma(n + 1)
        - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in range(n + 1)])
        + k * math.log(p)
        + (n - k) * (math.log1p(-p) if p < 1 else 0.0)
    )
    share = k / n
    plogp = np.where(share > 0, share * np.log(np.maximum(share, 1e-300)), 0.0)
    return float(np.exp(-num_classes * np.sum(np.exp(log_pmf) * plogp)))


def class_spread(probabilities: np.ndarray) -> float:
    """How many classes the request's answer [n, C] names, against what n images of every class would:
    the effective number (exp of the entropy) of its top-1 class counts, over ``balanced_classes(n, C)``.
    About 1 for a request that mixes every class, 1/balanced_classes for one of a single class. Counts,
    not mean probabilities: a shifted deck's soft answers spread a little mass over every class, which
    over many classes looks like a mix."""
    probabilities = np.asarray(probabilities)
    counts = np.bincount(probabilities.argmax(axis=1), minlength=probabilities.shape[1])
    share = counts[counts > 0] / len(probabilities)
    effective = float(np.exp(-np.sum(share * np.log(share))))
    return effective / balanced_classes(len(probabilities), probabilities.shape[1])


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


__all__ = ["MIN_SPREAD", "SHIFTED_STATES", "TRIGGER_STATES", "Trigger", "balanced_classes", "class_spread"]
