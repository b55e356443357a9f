"""The data plane, free of any transport: requests on the live deck snapshot, micro-batching, drain.

A request resolves its model (:meth:`Dataplane.resolve`) on the current snapshot
(:class:`~carddeck.serving.snapshot.Snapshots`) once and finishes on that snapshot, whatever swaps
meanwhile.

The caller's thread validates a request's images; the rest is paid once per micro-batch: the
batcher concatenates the requests' images, computes their features in one call, routes every
request on its own rows (one policy call per policy in the batch: policies decide row by row, so
one client's images never change another's routing), runs each card once on the rows routed to it,
gives each request back its own rows and routing, and tells the routing metrics and the
``on_predict`` listeners (the shift signal) about all of them at once. A request that is alone in
the server (nobody to merge with) skips the batcher and runs the same steps in its own thread: no
hand-off cost at low load.

Each model batches under its own :class:`~carddeck.serving.batching.BatchPolicy`: the deck
manifest's ``batching`` settings (Triton's names; the deck model at the top level, a card under
``cards``) over the server's flags. :meth:`Dataplane.submit` starts a request without waiting for
it (the streaming RPCs): many requests of one stream fill a batch from one thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from carddeck.card import CardMeta
from carddeck.deck import Deck, Prediction
from carddeck.deck.store import DEBRIS_GRACE_S
from carddeck.errors import Cancelled, InvalidInput, NotReady
from carddeck.gating import POLICIES, Routing
from carddeck.gating.shift import Trust
from carddeck.gating.signature import sample_features
from carddeck.serving.adaptation import Trigger
from carddeck.serving.batching import BatchPolicy, MicroBatcher
from carddeck.serving.budget import ImageBudget
from carddeck.serving.models import DECK_MODEL_NAME, Model, resolve
from carddeck.serving.snapshot import DeckMetrics, Snapshots, StoreState
from carddeck.serving.stats import ModelStats, Statistics

log = logging.getLogger(__name__)


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
    poll_interval_s: float = 2.0
    providers: Sequence[str] | None = None
    intra_op_threads: int | None = None
    ort_spinning: bool = False  # ONNX Runtime threads spin between runs (carddeck.deck.runtime.CardSession)
    calibration_data: str = ""
    deck_model_name: str = DECK_MODEL_NAME  # the gated deck's model name: no card may take it
    debris_grace_s: float = DEBRIS_GRACE_S
    max_inflight_images: int = 16384  # more images being served at once: Overloaded (RESOURCE_EXHAUSTED / 429)
    store_timeout_s: float = 10.0  # a store poll not answered in this time counts as the store down


@dataclass(frozen=True)
class _Work:
    deck: Deck
    x: np.ndarray  # prepared float32 [n, C, H, W]
    weights: np.ndarray | None  # [n, K] in deck.card_names order; None: routed with the batch
    policy: str = ""
    per_sample: bool = False
    model: str = ""  # the model name it was asked under (on_predict listeners, execution counts)


@dataclass(frozen=True)
class _Done:
    probabilities: np.ndarray
    queued_s: float
    compute_s: float
    routing: Routing | None = None
    verdict: Trust | None = None
    adapted: bool = False


class Predicted(NamedTuple):
    """One routed request of a micro-batch, as ``on_predict`` listeners see it."""

    model: str
    x: np.ndarray  # prepared images
    routing: Routing
    probabilities: np.ndarray


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
            spin=config.ort_spinning,
            calibration_data=config.calibration_data,
            reserved_names=(config.deck_model_name,),
            debris_grace_s=config.debris_grace_s,
            metrics=metrics,
            max_run_rows=config.max_batch_size,  # large requests run through the cards in micro-batch slices
            poll_timeout_s=config.store_timeout_s,
        )
        self.budget = ImageBudget(config.max_inflight_images)
        self.statistics = Statistics()
        self._inflight = 0
        self._inferring = 0  # inference calls inside predict/run_card right now
        self._inferring_lock = threading.Lock()
        self._inflight_cond = threading.Condition()
        self._draining = False
        self._shutting_down = False
        self.on_swap = self.snapshots.listeners  # told each new snapshot, e.g. health status follows the deck
        self.on_store = self.snapshots.store_listeners  # told when the store is lost or back
        # every routed request of a micro-batch at once (Predicted), e.g. the shift monitor; must not raise
        self.on_predict: list[Callable[[Sequence[Predicted]], None]] = []
        # test-time adaptation of shifted requests (set by the process assembly); None: never
        self.adaptation: Trigger | None = None
        self._warming: set[int] = set()  # decks whose adaptive variants are being built
        # the verdict of every routed request of a micro-batch (ShiftMonitor.judge); None: unknown to all
        self.judge: Callable[[Sequence[Predicted]], Sequence[Trust]] | None = None
        self._policies: dict[tuple[int, str], BatchPolicy] = {}  # (deck version, model) -> its policy
        self._batcher: MicroBatcher[_Work, _Done] | None = None
        if config.batching and config.max_batch_size > 1:
            self._batcher = MicroBatcher(
                self._run_merged,
                max_batch_size=config.max_batch_size,
                max_wait_s=config.max_wait_s,
                preferred_batch_sizes=config.preferred_batch_sizes,
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
        with self.budget.hold(len(images)), self._inferring_call():
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
        start = time.monotonic()
        batch_policy = self.batch_policy(model)
        announced = self._announce(len(images), batch_policy)
        try:
            work = self._deck_work(model, images, policy, per_sample)
        except BaseException:
            if announced:
                self._batcher.withdraw()  # type: ignore[union-attr]
            self._record(model.name, len(images), start, ok=False)
            raise
        done = self._combine(work, announced, timeout_s, is_cancelled, model.name, start, batch_policy)
        assert done.routing is not None
        return Prediction(done.probabilities, done.routing, done.verdict, done.adapted)

    @staticmethod
    def _deck_work(model: Model, images: np.ndarray, policy: str | None, per_sample: bool) -> _Work:
        deck = model.deck  # the snapshot this request finishes on
        x = deck.prepare(images)
        policy = policy or deck.default_policy
        POLICIES.get(policy)  # a bad name fails its own request here, not a merged batch
        return _Work(deck, x, None, policy, per_sample, model.name)

    @staticmethod
    def _card_work(model: Model, images: np.ndarray) -> _Work:
        deck = model.deck
        if model.card is None:
            raise InvalidInput(f"model {model.name!r} is the gated deck, not a card")
        k = deck.card_index(model.card.name)
        x = deck.prepare(images)
        weights = np.zeros((len(x), len(deck.cards)), np.float32)
        weights[:, k] = 1.0
        return _Work(deck, x, weights, model=model.name)

    def run_card(
        self,
        model: Model,
        images: np.ndarray,
        *,
        timeout_s: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """One card's probabilities, no gate (a card served as a model of its own), on ``model``'s snapshot."""
        with self.budget.hold(len(images)), self._inferring_call():
            return self._run_card(model, images, timeout_s, is_cancelled)

    def _run_card(
        self, model: Model, images: np.ndarray, timeout_s: float | None, is_cancelled: Callable[[], bool] | None
    ) -> np.ndarray:
        start = time.monotonic()
        batch_policy = self.batch_policy(model)
        announced = self._announce(len(images), batch_policy)
        try:
            work = self._card_work(model, images)
        except BaseException:
            if announced:
                self._batcher.withdraw()  # type: ignore[union-attr]
            self._record(model.name, len(images), start, ok=False)
            raise
        return self._combine(work, announced, timeout_s, is_cancelled, model.name, start, batch_policy).probabilities

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
        the gated deck, of the probabilities for a card. Invalid input raises here, before anything is queued.

        Requests go to the batcher; one too large for a batch, or any when batching is off, runs in this
        thread. ``announced``: the caller told :meth:`announce` this request was coming (a stream reading
        its next request); it counts as arrived whichever way it goes."""
        start = time.monotonic()
        held = contextlib.ExitStack()  # the in-flight image budget, given back when the request is answered
        try:
            held.enter_context(self.budget.hold(len(images)))
            if model.card is None:
                work = self._deck_work(model, images, policy, per_sample)
            else:
                if policy is not None or per_sample:
                    raise InvalidInput("'policy' and 'per_sample' apply to the gated deck, not to a card")
                work = self._card_work(model, images)
        except BaseException:
            held.close()
            if announced:
                self.withdraw()
            self._record(model.name, len(images), start, ok=False)
            raise
        deck = model.deck

        def answer(done: _Done) -> Any:
            if model.card is not None:
                return done.probabilities
            assert done.routing is not None
            return Prediction(done.probabilities, done.routing, done.verdict), deck

        out: Future[Any] = Future()
        batch_policy = self.batch_policy(model)
        if self._batcher is None or len(work.x) >= batch_policy.max_batch_size:
            if announced:
                self.withdraw()
            try:
                with held, self._inferring_call():
                    out.set_result(answer(self._combine(work, False, None, is_cancelled, model.name, start)))
            except BaseException as exc:
                out.set_exception(exc)
            return out
        with self._inferring_lock:
            self._inferring += 1  # a unary request meanwhile is not alone: it joins the batch

        def finish(inner: Future[_Done]) -> None:
            held.close()
            with self._inferring_lock:
                self._inferring -= 1
            try:
                done = inner.result()
            except BaseException as exc:
                self._record(model.name, len(work.x), start, ok=False)
                out.set_exception(exc)
                return
            queued = max(0.0, time.monotonic() - start - done.compute_s)
            self._record(model.name, len(work.x), start, ok=True, queued_s=queued, compute_s=done.compute_s)
            out.set_result(answer(done))

        queued = self._batcher.submit(
            work, len(work.x), announced=announced, is_cancelled=is_cancelled, policy=batch_policy
        )
        queued.add_done_callback(finish)
        return out

    def announce(self) -> None:
        """A request is on its way (a stream is reading its next one): batches may wait for it, up to
        their queue delay; :meth:`submit` with ``announced=True`` or :meth:`withdraw` settles it."""
        if self._batcher is not None:
            self._batcher.announce()

    def withdraw(self) -> None:
        """An announced request will not come (the stream ended, or the request failed before submit)."""
        if self._batcher is not None:
            self._batcher.withdraw()

    def batch_policy(self, model: Model) -> BatchPolicy:
        """``model``'s batching on its snapshot: the manifest's settings for it (the deck model at the top
        level, a card under ``cards``) over the server's flags, like Triton's per-model config."""
        deck = model.deck
        key = (deck.version, model.name)
        found = self._policies.get(key)
        if found is not None:
            return found
        settings = dict(deck.manifest.batching)
        cards = settings.pop("cards", {})
        if model.card is not None:
            settings = dict(cards.get(model.card.name, {}))
        c = self.config
        most = settings.get("max_batch_size", c.max_batch_size)
        preferred = tuple(settings.get("preferred_batch_size", c.preferred_batch_sizes))
        if any(p > most for p in preferred):
            log.warning(
                "model %s: preferred batch sizes %s above max_batch_size %d: ignored", model.name, preferred, most
            )
            preferred = tuple(p for p in preferred if p <= most)
        delay = settings.get("max_queue_delay_microseconds", c.max_wait_s * 1e6) / 1e6
        found = BatchPolicy(most, delay, preferred)
        if len(self._policies) > 1024:  # old snapshots' entries
            self._policies.clear()
        self._policies[key] = found
        return found

    def _announce(self, n: int, policy: BatchPolicy) -> bool:
        """True: this request goes through the batcher (and told it to expect one more)."""
        if self._batcher is None or n >= policy.max_batch_size:
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
        policy: BatchPolicy | None = None,
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
                done = replace(done, queued_s=t0 - start, compute_s=time.monotonic() - t0)
            else:
                assert self._batcher is not None
                future = self._batcher.submit(work, len(x), announced=True, is_cancelled=is_cancelled, policy=policy)
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
            probs = deck.combine(x, weights[0] if len(idx) == 1 else np.concatenate(weights), on_card=self._on_card)
            offset = 0
            for i in idx:
                n = len(works[i].x)
                out[i] = probs[offset : offset + n]
                offset += n
        predicted = {i: Predicted(w.model, w.x, routings[i], out[i]) for i, w in enumerate(works) if i in routings}
        verdicts = dict(zip(predicted, self._judge(list(predicted.values()))))
        # the verdict and the listeners (the shift signal) see the unadapted answer, the one its reference
        # conditions were measured on; a request the trigger fires on is then answered adapted
        adapted = {
            i: a for i, p in predicted.items() if (a := self._adapted(p, works[i].deck, verdicts.get(i))) is not None
        }
        compute = time.monotonic() - t0
        self._count_execution(works, compute)
        self._observe(list(predicted.values()))
        return [
            _Done(adapted.get(i, out[i]), 0.0, compute, routings.get(i), verdicts.get(i), i in adapted)
            for i in range(len(works))
        ]

    def _adapted(self, request: Predicted, deck: Deck, verdict: Trust | None) -> np.ndarray | None:
        """The request's answer from the routed cards' adaptive variants, run on its own images only,
        when the trigger fires on its verdict and unadapted answer (:mod:`carddeck.serving.adaptation`);
        None: serve the unadapted answer. Never fails the request: adaptation is an improvement, not a
        dependency."""
        trigger, x, routing = self.adaptation, request.x, request.routing
        if trigger is None or verdict is None or not trigger.fires_on(verdict, request.probabilities):
            return None
        try:
            if not deck.adaptive_ready:
                self._warm(deck)  # served unadapted until the variants are built, off the request path
                return None
            return deck.combine(x, routing.weights, on_card=self._on_card, adapt=True)
        except Exception:
            log.exception("adapting a request of %d images failed; serving it unadapted", len(x))
            return None

    def _warm(self, deck: Deck) -> None:
        with self._inferring_lock:
            if id(deck) in self._warming:
                return
            self._warming.add(id(deck))

        def build() -> None:
            try:
                deck.warm_adaptive()
            except Exception:
                log.exception("building the adaptive card variants of deck version %d failed", deck.version)

        threading.Thread(target=build, name="carddeck-adapt-build", daemon=True).start()

    def _judge(self, predicted: list[Predicted]) -> Sequence[Trust]:
        """Each routed request's verdict, once per micro-batch; unknown (never an error) when it cannot be had."""
        if not predicted:
            return []
        if self.judge is not None:
            try:
                return self.judge(predicted)
            except Exception:
                log.exception("judging a micro-batch of %d requests failed", len(predicted))
        return [Trust.unknown(len(p.x), p.probabilities) for p in predicted]

    def _observe(self, predicted: list[Predicted]) -> None:
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

    def _count_execution(self, works: list[_Work], compute_s: float) -> None:
        """One execution for each model in the batch, with its images (Triton's exec and inference counts)."""
        images: dict[str, int] = {}
        for w in works:
            images[w.model] = images.get(w.model, 0) + len(w.x)
        for model, n in images.items():
            self.statistics.record_execution(model, n, compute_s)
            if self.metrics is not None:
                self.metrics.observe_execution(model, n)

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


__all__ = ["Dataplane", "DataplaneConfig", "MetricsHook", "Predicted"]
