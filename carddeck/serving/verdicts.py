"""What each routed request of a micro-batch gets beside its probabilities: its verdict, the listeners'
look at it (routing metrics, the shift signal), and test-time adaptation when the verdict calls for it.

All of it is paid once per micro-batch, and none of it ever fails a prediction: a verdict that cannot
be had is unknown, a listener or an adaptation that fails is logged and the unadapted answer served.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from carddeck.deck import Deck
from carddeck.gating import Routing
from carddeck.gating.shift import Trust
from carddeck.serving.adaptation import Trigger

log = logging.getLogger(__name__)


class RoutedRequest(NamedTuple):
    """One routed request of a micro-batch, as ``on_predict`` listeners see it."""

    model: str
    x: np.ndarray  # prepared images
    routing: Routing
    probabilities: np.ndarray
    agreement: np.ndarray | None = None  # per image, the routed cards' agreement (carddeck.deck.deck.agreement_of)


class Verdicts:
    def __init__(self, metrics: Any = None) -> None:
        self.metrics = metrics  # observe_routings (MetricsHook), or None
        self.on_card = metrics.observe_card if metrics is not None else None
        # every routed request of a micro-batch at once (RoutedRequest), e.g. the shift monitor; must not raise
        self.on_predict: list[Callable[[Sequence[RoutedRequest]], None]] = []
        # test-time adaptation of shifted requests (set by the process assembly); None: never
        self.adaptation: Trigger | None = None
        # the verdict of every routed request of a micro-batch run on one deck of these card keys
        # (ShiftMonitor.judge); None: unknown to all
        self.judge: Callable[..., Sequence[Trust]] | None = None
        self._warming: set[int] = set()  # decks whose adaptive variants are being built
        self._lock = threading.Lock()

    def of(self, predicted: list[RoutedRequest], cards: tuple[str, ...]) -> Sequence[Trust]:
        """Each routed request's verdict, once per micro-batch run on the deck of these ``cards`` (keys); unknown
        (never an error) when it cannot be had, or while the detector is not yet the one fitted for them."""
        if not predicted:
            return []
        if self.judge is not None:
            try:
                return self.judge(predicted, cards=cards)
            except Exception:
                log.exception("judging a micro-batch of %d requests failed", len(predicted))
        return [Trust.unknown(len(p.x), p.probabilities) for p in predicted]

    def adapted(self, deck: Deck, request: RoutedRequest, verdict: Trust | None) -> np.ndarray | None:
        """The request's answer from the routed cards' adaptive variants, run on its own images only, when
        the trigger fires on its verdict and unadapted answer (:mod:`carddeck.serving.adaptation`); None:
        serve the unadapted answer. Never fails the request: adaptation is an improvement, not a dependency."""
        trigger, x, routing = self.adaptation, request.x, request.routing
        if trigger is None or verdict is None or not trigger.fires_on(verdict, request.probabilities):
            return None
        try:
            if not deck.adaptive_ready:
                self._warm(deck)  # served unadapted until the variants are built, off the request path
                return None
            return deck.run_routed(x, routing.weights, on_card=self.on_card, adapt=True)
        except Exception:
            log.exception("adapting a request of %d images failed; serving it unadapted", len(x))
            return None

    def _warm(self, deck: Deck) -> None:
        with self._lock:
            if id(deck) in self._warming:
                return
            self._warming.add(id(deck))

        def build() -> None:
            try:
                deck.warm_adaptive()
            except Exception:
                log.exception("building the adaptive card variants of deck version %d failed", deck.version)

        threading.Thread(target=build, name="carddeck-adapt-build", daemon=True).start()

    def observe(self, predicted: list[RoutedRequest]) -> None:
        """Routing metrics and on_predict listeners, once per micro-batch; never fails the batch."""
        if not predicted:
            return
        try:
            if self.metrics is not None:
                self.metrics.observe_routings([p.routing for p in predicted])
            for listener in self.on_predict:
                listener(predicted)
        except Exception:
            log.exception("observing a micro-batch of %d requests failed", len(predicted))


__all__ = ["RoutedRequest", "Verdicts"]
