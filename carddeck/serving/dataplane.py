"""The data plane, free of any transport: requests on the live deck snapshot, micro-batching, drain.

A request resolves its model (:meth:`Dataplane.resolve`) on the current snapshot
(:class:`~carddeck.serving.snapshot.Snapshots`) once and finishes on that snapshot, whatever swaps
meanwhile. The data plane assembles the parts and is what the transports call
(:class:`~carddeck.serving.plane.Plane`):

- :mod:`~carddeck.serving.admission`: in-flight accounting and drain;
- :mod:`~carddeck.serving.budget`: the images in flight, bounded;
- :mod:`~carddeck.serving.dispatch`: a request alone runs in its own thread, others join the micro-batcher;
- :mod:`~carddeck.serving.microbatch`: one micro-batch's run (merge, route, run the cards, split back);
- :mod:`~carddeck.serving.verdicts`: each answer's verdict, the ``on_predict`` listeners, adaptation;
- :mod:`~carddeck.serving.batch_policies`: each model's batching (the deck manifest's over the flags).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from carddeck.card import CardMeta
from carddeck.deck import Deck, Prediction
from carddeck.deck.store import DEBRIS_GRACE_S
from carddeck.errors import InvalidInput
from carddeck.gating.shift import Trust
from carddeck.serving.adaptation import Trigger
from carddeck.serving.admission import Admission
from carddeck.serving.batch_policies import BatchPolicies
from carddeck.serving.batching import BatchPolicy
from carddeck.serving.budget import ImageBudget
from carddeck.serving.dispatch import Dispatch
from carddeck.serving.microbatch import Done, MicroBatchRun, card_work, deck_work
from carddeck.serving.models import DECK_MODEL_NAME, Model, resolve
from carddeck.serving.snapshot import DeckMetrics, Snapshots, StoreState
from carddeck.serving.stats import ModelStats, Statistics
from carddeck.serving.verdicts import RoutedRequest, Verdicts


class MetricsHook(DeckMetrics, Protocol):
    """What the data plane reports; :class:`carddeck.observability.metrics.Metrics` provides it."""

    def observe_batch(self, size: int, wait_seconds: Any = ()) -> None: ...
    def track_queue_depth(self, depth: Callable[[], int]) -> None: ...
    def observe_routings(self, routings: Any) -> None: ...
    def observe_card(self, card: str, seconds: float) -> None: ...
    def observe_execution(self, model: str, images: int) -> None: ...


@dataclass(frozen=True)
class DataplaneConfig:
    deck_path: Path | str  # a directory or a store URL (s3://bucket/prefix)
    batching: bool = True
    max_batch_size: int = 64
    max_wait_s: float = 0.002
    preferred_batch_sizes: tuple[int, ...] = ()
    batch_workers: int = 1  # batches in flight
    # each in two stages: a batch's verdict runs while the next one is gated and run (carddeck.serving.batching)
    batch_pipeline: bool = True
    poll_interval_s: float = 2.0
    providers: Sequence[str] | None = None
    intra_op_threads: int | None = None
    ort_spinning: bool = False  # ONNX Runtime threads spin between runs (carddeck.deck.runtime.CardSession)
    calibration_data: str = ""
    deck_model_name: str = DECK_MODEL_NAME  # the gated deck's model name: no card may take it
    debris_grace_s: float = DEBRIS_GRACE_S
    max_inflight_images: int = 16384  # more images being served at once: Overloaded (RESOURCE_EXHAUSTED / 429)
    store_timeout_s: float = 10.0  # a store poll not answered in this time counts as the store down


class Dataplane:
    def __init__(self, config: DataplaneConfig, *, metrics: MetricsHook | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.snapshots = Snapshots(
            config.deck_path,
            poll_interval_s=config.poll_interval_s,
            providers=config.providers,
            intra_op_threads=config.intra_op_threads,
            spin=config.ort_spinning,
            calibration_data=config.calibration_data,
            reserved_names=(config.deck_model_name,),
            debris_grace_s=config.debris_grace_s,
            metrics=metrics,
            max_run_rows=config.max_batch_size,  # large requests run through the cards in micro-batch slices
            poll_timeout_s=config.store_timeout_s,
        )
        self.admission = Admission()
        self.budget = ImageBudget(config.max_inflight_images)
        self.statistics = Statistics()
        self.on_swap = self.snapshots.listeners  # told each new snapshot, e.g. health status follows the deck
        self.on_store = self.snapshots.store_listeners  # told when the store is lost or back
        self.verdicts = Verdicts(metrics)
        self.on_predict = self.verdicts.on_predict  # every routed request of a micro-batch at once (RoutedRequest)
        self.dispatch = Dispatch(
            MicroBatchRun(self.verdicts, self.statistics),
            self.statistics,
            BatchPolicies(config.max_batch_size, config.max_wait_s, config.preferred_batch_sizes),
            metrics=metrics,
            batching=config.batching,
            workers=config.batch_workers,
            pipelined=config.batch_pipeline,
        )

    # test-time adaptation of shifted requests (set by the process assembly); None: never
    @property
    def adaptation(self) -> Trigger | None:
        return self.verdicts.adaptation

    @adaptation.setter
    def adaptation(self, trigger: Trigger | None) -> None:
        self.verdicts.adaptation = trigger

    # the verdict of every routed request of a micro-batch (ShiftMonitor.judge); None: unknown to all
    @property
    def judge(self) -> Callable[[Sequence[RoutedRequest]], Sequence[Trust]] | None:
        return self.verdicts.judge

    @judge.setter
    def judge(self, judge: Callable[[Sequence[RoutedRequest]], Sequence[Trust]] | None) -> None:
        self.verdicts.judge = judge

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Deck:
        """Open the deck (raises on a missing or broken store) and start watching it for changes."""
        return self.snapshots.start()

    def close(self, *, wait: bool = True) -> None:
        """Stop the batcher and the poller; ``wait=False`` leaves card runs still going to finish unwatched."""
        self.snapshots.close(wait=wait)
        self.dispatch.close(wait=wait)

    @property
    def deck(self) -> Deck:
        return self.snapshots.deck

    @property
    def ready(self) -> bool:
        """Serving a deck with cards. A store that cannot be reached does not change it: the replica still
        serves its last snapshot (taking every replica out of a load balancer would turn a store outage into
        a full one); :attr:`store_state` says how fresh that snapshot is."""
        deck = self.snapshots.current
        return deck is not None and bool(deck.cards) and not self.admission.shutting_down

    @property
    def store_state(self) -> StoreState:
        return self.snapshots.store_state

    def add_card(self, model: bytes | Path) -> tuple[CardMeta, bool]:
        return self.snapshots.add_card(model)

    def remove_card(self, name: str, version: int | None = None) -> tuple[list[str], str]:
        return self.snapshots.remove_card(name, version)

    # -- in-flight accounting and drain (carddeck.serving.admission) ---------------------------
    def begin_shutdown(self) -> None:
        """Readiness goes false; requests are still served until :meth:`drain`."""
        self.admission.shutting_down = True

    @property
    def draining(self) -> bool:
        return self.admission.draining

    def request(self) -> AbstractContextManager[None]:
        """Wrap every RPC that does work: refused once draining, counted until it finishes."""
        return self.admission.request()

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    def drain(self, timeout_s: float) -> bool:
        """Refuse new work and wait for in-flight requests; True when they all finished in time."""
        return self.admission.drain(timeout_s)

    # -- inference ----------------------------------------------------------------------------
    def resolve(self, name: str | None = None, version: str = "") -> Model:
        """The model ``name`` (None: the gated deck) on the current snapshot, which the request then keeps."""
        deck_name = self.config.deck_model_name
        return resolve(self.deck, deck_name, deck_name if name is None else name, version)

    def predict(
        self,
        images: np.ndarray,
        *,
        model: Model | None = None,
        policy: str | None = None,
        per_sample: bool = False,
        timeout_s: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> tuple[Prediction, Deck]:
        """The gated deck's prediction, on ``model``'s snapshot (default: the deck model, resolved now)."""
        on = model or self.resolve()
        with self.budget.hold(len(images)):
            done = self.dispatch.run_request(
                on, len(images), lambda: deck_work(on, images, policy, per_sample), timeout_s, is_cancelled
            )
        assert done.routing is not None
        return Prediction(done.probabilities, done.routing, done.verdict, done.adapted), on.deck

    def run_card(
        self,
        model: Model,
        images: np.ndarray,
        *,
        timeout_s: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """One card's probabilities, no gate (a card served as a model of its own), on ``model``'s snapshot."""
        with self.budget.hold(len(images)):
            done = self.dispatch.run_request(
                model, len(images), lambda: card_work(model, images), timeout_s, is_cancelled
            )
        return done.probabilities

    def submit(
        self,
        model: Model,
        images: np.ndarray,
        *,
        policy: str | None = None,
        per_sample: bool = False,
        is_cancelled: Callable[[], bool] | None = None,
        announced: bool = False,
    ) -> Future[Any]:
        """Start a request and return at once (the streaming RPCs): a future of ``(Prediction, Deck)`` for
        the gated deck, of the probabilities for a card. Invalid input raises here, before anything is queued
        (:meth:`carddeck.serving.dispatch.Dispatch.start`)."""
        deck = model.deck

        def work() -> Any:
            if model.card is None:
                return deck_work(model, images, policy, per_sample)
            if policy is not None or per_sample:
                raise InvalidInput("'policy' and 'per_sample' apply to the gated deck, not to a card")
            return card_work(model, images)

        def answer(done: Done) -> Any:
            if model.card is not None:
                return done.probabilities
            assert done.routing is not None
            return Prediction(done.probabilities, done.routing, done.verdict), deck

        n = len(images)
        hold = self.budget.hold(n)
        return self.dispatch.start(model, n, work, answer, hold=hold, is_cancelled=is_cancelled, announced=announced)

    def announce(self) -> None:
        """A request is on its way (a stream is reading its next one): batches may wait for it, up to
        their queue delay; :meth:`submit` with ``announced=True`` or :meth:`withdraw` settles it."""
        self.dispatch.announce()

    def withdraw(self) -> None:
        """An announced request will not come (the stream ended, or the request failed before submit)."""
        self.dispatch.withdraw()

    def batch_policy(self, model: Model) -> BatchPolicy:
        """``model``'s batching on its snapshot: the manifest's settings for it (the deck model at the top
        level, a card under ``cards``) over the server's flags, like Triton's per-model config."""
        return self.dispatch.policies.of(model)

    # -- statistics for OIP ModelStatistics -----------------------------------------------------
    def stats(self, model: str) -> ModelStats:
        return self.statistics.get(model)


__all__ = ["Dataplane", "DataplaneConfig", "MetricsHook"]
