"""The server's data plane, free of gRPC: the live deck snapshot, micro-batching, hot swaps, drain.

The current :class:`~carddeck.deck.Deck` is one reference. A request reads it once and finishes on
that snapshot, whatever happens to the reference meanwhile; a change (AddCard, RemoveCard, or a
new manifest written by another replica into a shared store) builds the next snapshot beside the
current one (``Deck.open(previous=...)`` reuses the unchanged cards' sessions) and swaps the
reference. Writers serialize on one lock; readers never take it.

The caller's thread validates a request's images; the rest is paid once per micro-batch: the
batcher concatenates the requests' images, computes their features in one call, routes every
request on its own rows (one policy call per policy in the batch: policies decide row by row, so
one client's images never change another's routing), runs each card once on the rows routed to it,
and gives each request back its own rows and routing. A request that is alone in the server
(nobody to merge with) skips the batcher and runs the same steps in its own thread: no hand-off
cost at low load.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from carddeck.card import CardMeta
from carddeck.deck import Deck, DeckStore, Prediction
from carddeck.deck.store import DEBRIS_GRACE_S
from carddeck.errors import Cancelled, CarddeckError, CardRejected, NotReady, shown
from carddeck.gating import POLICIES, Routing
from carddeck.gating.signature import sample_features
from carddeck.server.batching import MicroBatcher

log = logging.getLogger(__name__)


OnCard = Callable[[str, float], None]  # (card name, seconds) after each card run


class MetricsHook(Protocol):
    """What the data plane reports; :class:`carddeck.server.metrics.Metrics` provides it."""

    def observe_batch(self, size: int, wait_seconds: Any = ()) -> None: ...
    def track_queue_depth(self, depth: Callable[[], int]) -> None: ...
    def observe_routing(self, routing: Any) -> None: ...
    def set_deck(self, version: int, cards: Any) -> None: ...
    def set_default_policy(self, policy: str, configured: str) -> None: ...
    def card_change(self, op: str, outcome: str) -> None: ...
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
    reserved_names: tuple[str, ...] = ()  # card names taken by the server (its deck model name)
    debris_grace_s: float = DEBRIS_GRACE_S


@dataclass
class ModelStats:
    """Counters for the Open Inference Protocol's ModelStatistics (ns, like Triton)."""

    inference_count: int = 0  # images
    execution_count: int = 0  # model runs (a merged batch counts once per request here)
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    last_inference_ms: int = 0
    batch_sizes: dict[int, list[int]] = field(default_factory=dict)  # size -> [count, compute ns]


@dataclass(frozen=True)
class _Work:
    deck: Deck
    x: np.ndarray  # prepared float32 [n, C, H, W]
    weights: np.ndarray | None  # [n, K] in deck.card_names order; None: routed with the batch
    policy: str = ""
    per_sample: bool = False


@dataclass(frozen=True)
class _Done:
    probabilities: np.ndarray
    queued_s: float
    compute_s: float
    routing: Routing | None = None


class Dataplane:
    def __init__(self, config: DataplaneConfig, *, metrics: MetricsHook | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self._on_card = metrics.observe_card if metrics is not None else None
        self._deck: Deck | None = None
        self._swap_lock = threading.Lock()
        self._stats: dict[str, ModelStats] = {}
        self._stats_lock = threading.Lock()
        self._inflight = 0
        self._inferring = 0  # inference calls inside predict/run_card right now
        self._inferring_lock = threading.Lock()
        self._inflight_cond = threading.Condition()
        self._draining = False
        self._shutting_down = False
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._last_clean = 0.0
        self._calibration: np.ndarray | None = None
        self._deck_store: DeckStore | None = None  # one store object: its manifest cache and connection live on
        self.swaps = 0  # snapshots installed after the first
        self.on_swap: list[Callable[[Deck], None]] = []  # e.g. health status follows the deck
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
        deck = self._open(previous=None)
        self._clean()
        self._install(deck)
        if self.config.poll_interval_s > 0:
            self._poller = threading.Thread(target=self._poll, name="carddeck-deck-poll", daemon=True)
            self._poller.start()
        return deck

    def close(self, *, wait: bool = True) -> None:
        """Stop the batcher and the poller; ``wait=False`` leaves card runs still going to finish unwatched."""
        self._stop.set()
        if self._batcher is not None:
            self._batcher.close(wait=wait)
        if self._poller is not None:
            self._poller.join(timeout=5 if wait else 0.1)

    @property
    def deck(self) -> Deck:
        deck = self._deck
        if deck is None:
            raise NotReady("the deck is not loaded yet")
        return deck

    @property
    def ready(self) -> bool:
        deck = self._deck
        return deck is not None and bool(deck.cards) and not self._shutting_down

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
    def predict(
        self,
        images: np.ndarray,
        *,
        policy: str | None = None,
        per_sample: bool = False,
        timeout_s: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        model: str = "",
    ) -> tuple[Prediction, Deck]:
        with self._inferring_call():
            return self._predict(images, policy, per_sample, timeout_s, is_cancelled, model)

    def _predict(
        self,
        images: np.ndarray,
        policy: str | None,
        per_sample: bool,
        timeout_s: float | None,
        is_cancelled: Callable[[], bool] | None,
        model: str,
    ) -> tuple[Prediction, Deck]:
        deck = self.deck  # the snapshot this request finishes on
        start = time.monotonic()
        announced = self._announce(len(images))
        try:
            x = deck.prepare(images)
            policy = policy or deck.default_policy
            POLICIES.get(policy)  # a bad name fails its own request here, not a merged batch
        except BaseException:
            if announced:
                self._batcher.withdraw()  # type: ignore[union-attr]
            self._record(model, len(images), start, ok=False)
            raise
        done = self._combine(_Work(deck, x, None, policy, per_sample), announced, timeout_s, is_cancelled, model, start)
        probs, routing = done.probabilities, done.routing
        assert routing is not None
        if self.metrics is not None:
            self.metrics.observe_routing(routing)
        for listener in self.on_predict:
            listener(model, x, routing, probs)
        return Prediction(probs, probs.argmax(axis=1).astype(np.int64), routing), deck

    def route(self, images: np.ndarray, *, policy: str | None = None, per_sample: bool = False) -> tuple[Routing, Deck]:
        deck = self.deck
        return deck.route(images, policy=policy, per_sample=per_sample), deck

    def run_card(
        self,
        name: str,
        images: np.ndarray,
        *,
        timeout_s: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> tuple[np.ndarray, Deck]:
        """One card's probabilities, no gate (a card served as a model of its own)."""
        with self._inferring_call():
            return self._run_card(name, images, timeout_s, is_cancelled)

    def _run_card(
        self, name: str, images: np.ndarray, timeout_s: float | None, is_cancelled: Callable[[], bool] | None
    ) -> tuple[np.ndarray, Deck]:
        deck = self.deck
        start = time.monotonic()
        announced = self._announce(len(images))
        try:
            k = _card_index(deck, name)
            x = deck.prepare(images)
        except BaseException:
            if announced:
                self._batcher.withdraw()  # type: ignore[union-attr]
            self._record(name, len(images), start, ok=False)
            raise
        weights = np.zeros((len(x), len(deck.cards)), np.float32)
        weights[:, k] = 1.0
        done = self._combine(_Work(deck, x, weights), announced, timeout_s, is_cancelled, name, start)
        return done.probabilities, deck

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
        work: _Work,
        batched: bool,
        timeout_s: float | None,
        is_cancelled: Callable[[], bool] | None,
        model: str,
        start: float,
    ) -> _Done:
        ok = False
        x = work.x
        try:
            if not batched:  # large request, alone, or batching off: run in this thread
                if is_cancelled is not None and is_cancelled():
                    raise Cancelled("request cancelled (or its deadline passed) before it ran")
                self._observe_batch(len(x), [])  # a batch of its own, no queue wait
                t0 = time.monotonic()
                (done,) = self._run_merged([work])
                done = _Done(done.probabilities, t0 - start, time.monotonic() - t0, done.routing)
            else:
                assert self._batcher is not None
                future = self._batcher.submit(work, len(x), announced=True, is_cancelled=is_cancelled)
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
            return done
        finally:
            if not ok:
                self._record(model, len(x), start, ok=False)

    def _run_merged(self, works: list[_Work]) -> list[_Done]:
        """Run a micro-batch: group by snapshot, route every request on its own rows (one features
        call, one policy call per policy), run each card once over the merged rows, split back."""
        t0 = time.monotonic()
        out: dict[int, np.ndarray] = {}
        routings: dict[int, Routing] = {}
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(works):
            groups.setdefault(id(w.deck), []).append(i)
        for idx in groups.values():
            deck = works[idx[0]].deck
            x = works[idx[0]].x if len(idx) == 1 else np.concatenate([works[i].x for i in idx])
            routings.update(_route(deck, {i: works[i] for i in idx if works[i].weights is None}))
            weights = [_weights_of(works[i], routings.get(i)) for i in idx]
            probs = _combine(deck, x, weights[0] if len(idx) == 1 else np.concatenate(weights), self._on_card)
            offset = 0
            for i in idx:
                n = len(works[i].x)
                out[i] = probs[offset : offset + n]
                offset += n
        compute = time.monotonic() - t0
        return [_Done(out[i], 0.0, compute, routings.get(i)) for i in range(len(works))]

    def _observe_batch(self, size: int, waits: list[float]) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch(size, waits)

    # -- statistics for OIP ModelStatistics -----------------------------------------------------
    def _record(
        self, model: str, n: int, start: float, *, ok: bool, queued_s: float = 0.0, compute_s: float = 0.0
    ) -> None:
        elapsed = int((time.monotonic() - start) * 1e9)
        with self._stats_lock:
            s = self._stats.setdefault(model, ModelStats())
            if ok:
                s.inference_count += n
                s.execution_count += 1
                s.success_count += 1
                s.success_ns += elapsed
                s.queue_ns += int(queued_s * 1e9)
                s.compute_ns += int(compute_s * 1e9)
                s.last_inference_ms = int(time.time() * 1000)
                entry = s.batch_sizes.setdefault(n, [0, 0])
                entry[0] += 1
                entry[1] += int(compute_s * 1e9)
            else:
                s.fail_count += 1
                s.fail_ns += elapsed

    def stats(self, model: str) -> ModelStats:
        with self._stats_lock:
            s = self._stats.get(model, ModelStats())
            return ModelStats(**{**s.__dict__, "batch_sizes": {k: list(v) for k, v in s.batch_sizes.items()}})

    # -- deck changes -------------------------------------------------------------------------
    def _open(self, previous: Deck | None) -> Deck:
        return Deck.open(
            self._store(),
            previous=previous,
            providers=self.config.providers,
            intra_op_threads=self.config.intra_op_threads,
        )

    def _install(self, deck: Deck) -> str:
        """Swap in ``deck``; returns a note when that changed the default policy ("" otherwise)."""
        old = self._deck
        self._deck = deck  # one reference swap: in-flight requests keep the snapshot they read
        note = ""
        if old is not None:
            self.swaps += 1
            log.info("deck snapshot %d -> %d (%d cards)", old.version, deck.version, len(deck.cards))
            if old.default_policy != deck.default_policy:
                note = f"the default policy changed from {old.default_policy!r} to {deck.default_policy!r}"
                note += f": {deck.policy_note}" if deck.policy_note else ""
                log.warning("deck %s version %d: %s", deck.root, deck.version, note)
        if self.metrics is not None:
            self.metrics.set_deck(deck.version, deck.cards)
            self.metrics.set_default_policy(deck.default_policy, deck.configured_policy)
        for listener in self.on_swap:
            listener(deck)
        return note

    def _clean(self) -> None:
        """Sweep the store's debris (at start, then now and then while polling); never fails the server."""
        self._last_clean = time.monotonic()
        try:
            self._store().clean()
        except (OSError, CarddeckError) as exc:  # e.g. a read-only deck: nothing of ours to clean there
            log.warning("deck %s: could not remove debris: %s", self.config.deck_path, exc)

    def add_card(self, model: bytes | Path) -> tuple[CardMeta, bool]:
        """Validate and add a card through the store, then swap in the new snapshot.

        Returns its CardMeta and whether it is new (False: the same bytes were already there, e.g. a
        retried add whose answer was lost; nothing changes).
        """
        with self._swap_lock:
            store = self._store()
            try:
                meta = store.add_card(
                    model, calibration=self._calibration_images(), reserved=self.config.reserved_names
                )
            except Exception:
                self._card_change("add", "rejected")
                raise
            if not store.last_add_was_new:
                self._card_change("add", "already_present")
                return meta, False
            try:
                self._install(self._open(previous=self._deck))
            except Exception as exc:  # the store took it but it cannot be served: undo
                store.remove_card(meta.name, meta.version)
                self._card_change("add", "rejected")
                raise CardRejected(f"card {meta.key} was stored but cannot be served ({exc}); removed again") from exc
            self._card_change("add", "ok")
            return meta, True

    def remove_card(self, name: str, version: int | None = None) -> tuple[list[str], str]:
        """Remove a card (one version, or all) and swap in the new snapshot.

        Returns the removed keys and a note when the removal changed the deck's default policy.
        """
        with self._swap_lock:
            try:
                removed = self._store().remove_card(name, version)
            except Exception:
                self._card_change("remove", "rejected")
                raise
            note = self._install(self._open(previous=self._deck))
            self._card_change("remove", "ok")
            return removed, note

    def reload_if_changed(self) -> bool:
        """Swap in a new snapshot when the store's manifest version moved (another replica wrote it)."""
        current = self._deck
        version = self._store().manifest().version
        if current is not None and version == current.version:
            return False
        with self._swap_lock:
            current = self._deck
            if current is not None and self._store().manifest().version == current.version:
                return False
            self._install(self._open(previous=current))
            return True

    def _store(self) -> DeckStore:
        if self._deck_store is None:
            self._deck_store = DeckStore(self.config.deck_path, debris_grace_s=self.config.debris_grace_s)
        return self._deck_store

    def _poll(self) -> None:
        while not self._stop.wait(self.config.poll_interval_s):
            try:
                self.reload_if_changed()
                if time.monotonic() - self._last_clean > self.config.debris_grace_s:
                    self._clean()  # debris from a crash, younger than the grace period at start
            except Exception as exc:  # a half-written store from another replica: keep serving
                log.warning(
                    "deck reload failed, still serving version %s: %s", getattr(self._deck, "version", "?"), exc
                )

    def _calibration_images(self) -> np.ndarray | None:
        if not self.config.calibration_data:
            return None  # the store falls back to the deck's own calibration.npz
        if self._calibration is None:
            from carddeck.data.datasets import load_dataset

            self._calibration = load_dataset(self.config.calibration_data, "train").images
        return self._calibration

    def _card_change(self, op: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.card_change(op, outcome)


def _card_index(deck: Deck, name: str) -> int:
    from carddeck.errors import CardNotFound

    try:
        return deck.card_names.index(name)
    except ValueError:
        raise CardNotFound(
            f"no card {shown(name)} in the deck (cards: {', '.join(deck.card_names) or 'none'})"
        ) from None


def _weights_of(work: _Work, routing: Routing | None) -> np.ndarray:
    if work.weights is not None:
        return work.weights
    assert routing is not None
    return routing.weights


def _route(deck: Deck, works: dict[int, _Work]) -> dict[int, Routing]:
    """Each request's routing on its own rows: one ``sample_features`` call over all of them, one
    policy call per (policy, per-sample) pair (:meth:`~carddeck.gating.Gate.route_many`)."""
    if not works:
        return {}
    items = list(works.items())
    xs = [w.x for _, w in items]
    features = sample_features(xs[0] if len(xs) == 1 else np.concatenate(xs))
    bounds = np.cumsum([0, *(len(x) for x in xs)]).tolist()
    by_policy: dict[tuple[str, bool], list[int]] = {}
    for j, (_, w) in enumerate(items):
        by_policy.setdefault((w.policy, w.per_sample), []).append(j)
    out: dict[int, Routing] = {}
    for (policy, per_sample), js in by_policy.items():
        rows = features if len(js) == len(items) else np.concatenate([features[bounds[j] : bounds[j + 1]] for j in js])
        sizes = [bounds[j + 1] - bounds[j] for j in js]
        for j, routing in zip(js, deck.route_features(rows, sizes, policy=policy, per_sample=per_sample)):
            out[items[j][0]] = routing
    return out


def _combine(deck: Deck, x: np.ndarray, weights: np.ndarray, on_card: OnCard | None = None) -> np.ndarray:
    routing = Routing(
        policy="merged",
        per_sample=True,
        card_names=deck.card_names,
        weights=weights,
        domains=(),
        distances=np.zeros((len(x), 0), np.float32),
    )
    return deck.combine(x, routing, on_card=on_card)


__all__ = ["Dataplane", "DataplaneConfig", "MetricsHook", "ModelStats"]
