"""The data plane, free of any transport: requests on the live deck snapshot, micro-batching, drain.

A request resolves its model (:meth:`Dataplane.resolve`) on the current snapshot
(:class:`~carddeck.serving.snapshot.Snapshots`) once and finishes on that snapshot, whatever swaps
meanwhile.

Routing always runs per request on that request's own images (in the caller's thread). Only the
card runs are merged: the batcher concatenates the requests' images, runs each card once on the
rows routed to it, and gives each request back its own rows. One client's images therefore never
change another's routing. A request that is alone in the server (nobody to merge with) skips the
batcher and runs in its own thread: no hand-off cost at low load.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from carddeck.card import CardMeta
from carddeck.deck import Deck, Prediction
from carddeck.deck.store import DEBRIS_GRACE_S
from carddeck.errors import Cancelled, InvalidInput, NotReady
from carddeck.gating import Routing
from carddeck.serving.batching import MicroBatcher
from carddeck.serving.models import DECK_MODEL_NAME, Model, resolve
from carddeck.serving.snapshot import DeckMetrics, Snapshots, StoreState
from carddeck.serving.stats import ModelStats, Statistics

log = logging.getLogger(__name__)


class MetricsHook(DeckMetrics, Protocol):
    """What the data plane reports; :class:`carddeck.observability.metrics.Metrics` provides it."""

    def observe_batch(self, size: int, wait_seconds: Any = ()) -> None: ...
    def track_queue_depth(self, depth: Callable[[], int]) -> None: ...
    def observe_routing(self, routing: Any) -> None: ...
    def observe_card(self, card: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class DataplaneConfig:
    deck_path: Path | str  # a directory or a store URL (s3://bucket/prefix)
    batching: bool = True
    max_batch_size: int = 64
    max_wait_s: float = 0.002
    batch_workers: int = 1
    poll_interval_s: float = 2.0
    providers: Sequence[str] | None = None
    intra_op_threads: int | None = None
    calibration_data: str = ""
    deck_model_name: str = DECK_MODEL_NAME  # the gated deck's model name: no card may take it
    debris_grace_s: float = DEBRIS_GRACE_S


@dataclass(frozen=True)
class _Work:
    deck: Deck
    x: np.ndarray  # prepared float32 [n, C, H, W]
    weights: np.ndarray  # [n, K] in deck.card_names order


@dataclass(frozen=True)
class _Done:
    probabilities: np.ndarray
    queued_s: float
    compute_s: float


class Dataplane:
    def __init__(self, config: DataplaneConfig, *, metrics: MetricsHook | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self._on_card = metrics.observe_card if metrics is not None else None
        self.snapshots = Snapshots(
            config.deck_path,
            poll_interval_s=config.poll_interval_s,
            providers=config.providers,
            intra_op_threads=config.intra_op_threads,
            calibration_data=config.calibration_data,
            reserved_names=(config.deck_model_name,),
            debris_grace_s=config.debris_grace_s,
            metrics=metrics,
        )
        self.statistics = Statistics()
        self._inflight = 0
        self._inferring = 0  # inference calls inside predict/run_card right now
        self._inferring_lock = threading.Lock()
        self._inflight_cond = threading.Condition()
        self._draining = False
        self._shutting_down = False
        self.on_swap = self.snapshots.listeners  # told each new snapshot, e.g. health status follows the deck
        self.on_store = self.snapshots.store_listeners  # told when the store is lost or back
        # (model, prepared images, routing, probabilities) after each Predict, e.g. the shift monitor
        self.on_predict: list[Callable[[str, np.ndarray, Routing, np.ndarray], None]] = []
        self._batcher: MicroBatcher[_Work, _Done] | None = None
        if config.batching and config.max_batch_size > 1:
            self._batcher = MicroBatcher(
                self._run_merged,
                max_batch_size=config.max_batch_size,
                max_wait_s=config.max_wait_s,
                workers=config.batch_workers,
                on_batch=self._observe_batch,
                name="carddeck-batch",
            )
            if metrics is not None:  # read at scrape time, so the gauge also goes back down
                batcher = self._batcher
                metrics.track_queue_depth(lambda: batcher.queue_depth)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Deck:
        """Open the deck (raises on a missing or broken store) and start watching it for changes."""
        return self.snapshots.start()

    def close(self, *, wait: bool = True) -> None:
        """Stop the batcher and the poller; ``wait=False`` leaves card runs still going to finish unwatched."""
        self.snapshots.close(wait=wait)
        if self._batcher is not None:
            self._batcher.close(wait=wait)

    @property
    def deck(self) -> Deck:
        return self.snapshots.deck

    @property
    def ready(self) -> bool:
        """Serving a deck with cards. A store that cannot be reached does not change it: the replica still
        serves its last snapshot (taking every replica out of a load balancer would turn a store outage into
        a full one); :attr:`store_state` says how fresh that snapshot is."""
        deck = self.snapshots.current
        return deck is not None and bool(deck.cards) and not self._shutting_down

    @property
    def store_state(self) -> StoreState:
        return self.snapshots.store_state

    def add_card(self, model: bytes | Path) -> tuple[CardMeta, bool]:
        return self.snapshots.add_card(model)

    def remove_card(self, name: str, version: int | None = None) -> tuple[list[str], str]:
        return self.snapshots.remove_card(name, version)

    def begin_shutdown(self) -> None:
        """Readiness goes false; requests are still served until :meth:`drain`."""
        self._shutting_down = True

    @property
    def draining(self) -> bool:
        return self._draining

    # -- in-flight accounting and drain -------------------------------------------------------
    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Wrap every RPC that does work: refused once draining, counted until it finishes."""
        with self._inflight_cond:
            if self._draining:
                raise NotReady("the server is shutting down; retry on another replica")
            self._inflight += 1
        try:
            yield
        finally:
            with self._inflight_cond:
                self._inflight -= 1
                self._inflight_cond.notify_all()

    @property
    def inflight(self) -> int:
        return self._inflight

    def drain(self, timeout_s: float) -> bool:
        """Refuse new work and wait for in-flight requests; True when they all finished in time."""
        deadline = time.monotonic() + timeout_s
        self._shutting_down = True
        with self._inflight_cond:
            self._draining = True
            while self._inflight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._inflight_cond.wait(remaining)
        return True

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
        model = model or self.resolve()
        with self._inferring_call():
            return self._predict(model, images, policy, per_sample, timeout_s, is_cancelled), model.deck

    def _predict(
        self,
        model: Model,
        images: np.ndarray,
        policy: str | None,
        per_sample: bool,
        timeout_s: float | None,
        is_cancelled: Callable[[], bool] | None,
    ) -> Prediction:
        deck = model.deck  # the snapshot this request finishes on
        start = time.monotonic()
        announced = self._announce(len(images))
        try:
            x = deck.prepare(images)
            routing = deck.route_prepared(x, policy=policy, per_sample=per_sample)
        except BaseException:
            if announced:
                self._batcher.withdraw()  # type: ignore[union-attr]
            self._record(model.name, len(images), start, ok=False)
            raise
        if self.metrics is not None:
            self.metrics.observe_routing(routing)
        probs = self._combine(deck, x, routing.weights, announced, timeout_s, is_cancelled, model.name, start)
        for listener in self.on_predict:
            listener(model.name, x, routing, probs)
        return Prediction(probs, routing)

    def run_card(
        self,
        model: Model,
        images: np.ndarray,
        *,
        timeout_s: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """One card's probabilities, no gate (a card served as a model of its own), on ``model``'s snapshot."""
        with self._inferring_call():
            return self._run_card(model, images, timeout_s, is_cancelled)

    def _run_card(
        self, model: Model, images: np.ndarray, timeout_s: float | None, is_cancelled: Callable[[], bool] | None
    ) -> np.ndarray:
        deck = model.deck
        start = time.monotonic()
        announced = self._announce(len(images))
        try:
            if model.card is None:
                raise InvalidInput(f"model {model.name!r} is the gated deck, not a card")
            k = deck.card_index(model.card.name)
            x = deck.prepare(images)
        except BaseException:
            if announced:
                self._batcher.withdraw()  # type: ignore[union-attr]
            self._record(model.name, len(images), start, ok=False)
            raise
        weights = np.zeros((len(x), len(deck.cards)), np.float32)
        weights[:, k] = 1.0
        return self._combine(deck, x, weights, announced, timeout_s, is_cancelled, model.name, start)

    def _announce(self, n: int) -> bool:
        """True: this request goes through the batcher (and told it to expect one more)."""
        if self._batcher is None or n >= self.config.max_batch_size:
            return False
        with self._inferring_lock:
            alone = self._inferring <= 1 and self._batcher.queue_depth == 0
        if alone:
            return False
        self._batcher.announce()
        return True

    @contextlib.contextmanager
    def _inferring_call(self) -> Iterator[None]:
        with self._inferring_lock:
            self._inferring += 1
        try:
            yield
        finally:
            with self._inferring_lock:
                self._inferring -= 1

    def _combine(
        self,
        deck: Deck,
        x: np.ndarray,
        weights: np.ndarray,
        batched: bool,
        timeout_s: float | None,
        is_cancelled: Callable[[], bool] | None,
        model: str,
        start: float,
    ) -> np.ndarray:
        ok = False
        try:
            if not batched:  # large request, alone, or batching off: run in this thread
                if is_cancelled is not None and is_cancelled():
                    raise Cancelled("request cancelled (or its deadline passed) before it ran")
                self._observe_batch(len(x), [])  # a batch of its own, no queue wait
                t0 = time.monotonic()
                probs = deck.combine(x, weights, on_card=self._on_card)
                done = _Done(probs, t0 - start, time.monotonic() - t0)
            else:
                assert self._batcher is not None
                future = self._batcher.submit(
                    _Work(deck, x, weights), len(x), announced=True, is_cancelled=is_cancelled
                )
                if timeout_s is not None and timeout_s > 86400:
                    timeout_s = None  # "no deadline" arrives as a huge one from some clients
                try:
                    done = future.result(timeout=timeout_s)
                except FutureTimeout:
                    future.cancel()
                    raise Cancelled(f"deadline passed after {time.monotonic() - start:.3f} s in the queue") from None
            ok = True
            queued = done.queued_s if not batched else max(0.0, time.monotonic() - start - done.compute_s)
            self._record(model, len(x), start, ok=True, queued_s=queued, compute_s=done.compute_s)
            return done.probabilities
        finally:
            if not ok:
                self._record(model, len(x), start, ok=False)

    def _run_merged(self, works: list[_Work]) -> list[_Done]:
        """Run a micro-batch: group by snapshot, run each card once over the merged rows, split back."""
        t0 = time.monotonic()
        out: dict[int, np.ndarray] = {}
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(works):
            groups.setdefault(id(w.deck), []).append(i)
        for idx in groups.values():
            deck = works[idx[0]].deck
            if len(idx) == 1:
                out[idx[0]] = deck.combine(works[idx[0]].x, works[idx[0]].weights, on_card=self._on_card)
                continue
            x = np.concatenate([works[i].x for i in idx])
            weights = np.concatenate([works[i].weights for i in idx])
            probs = deck.combine(x, weights, on_card=self._on_card)
            offset = 0
            for i in idx:
                n = len(works[i].x)
                out[i] = probs[offset : offset + n]
                offset += n
        compute = time.monotonic() - t0
        return [_Done(out[i], 0.0, compute) for i in range(len(works))]

    def _observe_batch(self, size: int, waits: list[float]) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch(size, waits)

    # -- statistics for OIP ModelStatistics -----------------------------------------------------
    def _record(
        self, model: str, n: int, start: float, *, ok: bool, queued_s: float = 0.0, compute_s: float = 0.0
    ) -> None:
        self.statistics.record(model, n, time.monotonic() - start, ok=ok, queued_s=queued_s, compute_s=compute_s)

    def stats(self, model: str) -> ModelStats:
        return self.statistics.get(model)


__all__ = ["Dataplane", "DataplaneConfig", "MetricsHook"]
