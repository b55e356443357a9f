"""The ingress's data plane over Ray handles (:class:`RayDataplane`): the gate-only deck snapshot of the store,
swapped in once its cards run, and each request's rows fanned out to the card deployments."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import ray
from prometheus_client import CollectorRegistry
from ray import serve
from ray.serve.handle import DeploymentHandle

from carddeck.card import CardMeta
from carddeck.deck import Deck, DeckStore, Manifest, Prediction
from carddeck.deck.deck import mix, routed_rows
from carddeck.errors import Cancelled, NotReady
from carddeck.integrations.ray_config import BATCH_WAIT_S, MAX_BATCH_SIZE, CardUnavailable, RayDeckConfig, card_app_name
from carddeck.integrations.ray_metrics import families
from carddeck.observability.metrics import Metrics
from carddeck.observability.shift import ShiftLoader, ShiftMonitor
from carddeck.serving.batching import BatchPolicy
from carddeck.serving.budget import ImageBudget
from carddeck.serving.models import Model, resolve
from carddeck.serving.snapshot import StoreState, StoreWatch
from carddeck.serving.stats import ModelStats, Statistics

log = logging.getLogger(__name__)

# Ray errors that mean "the replica went away under this request": retried once elsewhere.
REPLICA_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class RayDeck(Deck):
    """A gate-only deck snapshot whose cards run on their Ray Serve applications (by name): a :class:`Deck` for
    everything that reads one (the ingress's routes, the shift detector's refit from the calibration images)."""

    def __init__(self, deck: Deck, timeout_s: float) -> None:
        super().__init__(deck.root, deck.manifest, deck.cards, {}, deck.gate, deck.default_policy,
                         deck.policy_note, deck.store)  # fmt: skip
        self.handles: dict[str, DeploymentHandle] = {
            m.name: serve.get_app_handle(card_app_name(m.name)) for m in deck.cards
        }
        self.timeout_s = timeout_s  # the longest wait for one card's answer

    def run_routed(
        self,
        x: np.ndarray,
        weights: np.ndarray,
        *,
        on_card: Callable[[str, float], None] | None = None,
        adapt: bool = False,
        result: Callable[[str, np.ndarray, Any], np.ndarray] | None = None,
        agreement: np.ndarray | None = None,
    ) -> np.ndarray:
        """Each routed card's rows to its deployment, all at once; their probabilities mixed as the local deck
        does. ``result(card, rows, call)`` waits for one card's answer (default: at most ``timeout_s``).
        ``agreement``: filled as the local deck fills it. ``on_card`` and ``adapt`` do not apply: the deployments
        time their own runs and run the cards as stored."""
        wait = result or (lambda name, sub, call: np.asarray(call.result(timeout_s=self.timeout_s)))
        jobs = routed_rows(weights, self.card_names)
        subs = [x if len(rows) == len(x) else np.ascontiguousarray(x[rows]) for _, _, rows in jobs]
        calls = [self.handles[name].remote(sub) for (_, name, _), sub in zip(jobs, subs)]  # all at once
        outputs = [wait(name, sub, call) for (_, name, _), sub, call in zip(jobs, subs, calls)]
        combine = self.gate.params.combine if self.gate is not None else "mean"
        mixed = [(k, rows) for k, _, rows in jobs]
        return mix(weights, mixed, outputs, len(self.class_names), combine=combine, agreement=agreement)


class RayDataplane:
    """The transports' data plane (:class:`carddeck.serving.plane.Plane`) over Ray handles.

    Synchronous, like the routes (which run in a thread pool): card calls wait on ``.result()``. Its store
    state and statistics are this ingress replica's own, as each ``carddeck serve`` replica reports its own.
    """

    def __init__(self, config: RayDeckConfig, reconciler: DeploymentHandle) -> None:
        self.config = config
        self.reconciler = reconciler
        self.store = DeckStore(config.deck)
        self._snapshot: RayDeck | None = None
        # the series carddeck serve exports for what this replica does: its requests, shift verdicts, deck and
        # store (exported through Ray's metrics by the ingress: carddeck.integrations.ray_metrics)
        self.metrics = Metrics(CollectorRegistry())
        self.store_watch = StoreWatch(config.deck, self.metrics)
        self.statistics = Statistics()
        settings = config.settings()
        # the images this replica works on, bounded and exported as carddeck serve's are (its own share: each
        # ingress replica is a server of its own, as each carddeck serve replica is)
        self.budget = ImageBudget(settings.max_inflight_images)
        self.metrics.track_images_in_flight(lambda: self.budget.used)
        # every answer carries its verdict, as on carddeck serve: the detector the deck stores, judged per
        # ingress replica. A deck without one for its cards answers `unknown` until the reconciler, the one
        # replica that refits (carddeck.integrations.ray_cards), has stored one.
        self.shift = ShiftMonitor(self.metrics, window=settings.shift_window, stride=settings.shift_stride)
        self._load_shift = ShiftLoader(self.shift, refit=False)
        self._lock = threading.Lock()
        self._counts = {"card_calls": 0, "retried": 0, "unavailable": 0, "in_flight": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="carddeck-ray-snapshot", daemon=True)
        self._thread.start()

    def metric_families(self) -> frozenset[str]:
        """The families of :attr:`metrics` this plane fills (the others stay empty here: not exported)."""
        m = self.metrics
        return families([
            m.requests, m.request_duration, m.in_flight_requests, m.images_in_flight, m.card_changes, m.default_policy,
            m.gate_decisions, m.gate_selections, m.gate_images, m.gate_weight, m.domain_distance, m.nearest_distance,
            m.shift_batches, m.shift_statistic, m.shift_distance, m.expected_accuracy, m.shift_false_alarm_rate,
            m.shift_detector_fitted, m.deck_version, m.deck_cards, m.store_up, m.store_last_sync,
            m.store_poll_errors, m.build,
        ])  # fmt: skip

    # -- the snapshot -------------------------------------------------------------------------
    def poll(self) -> None:
        """One look at the store, as ``carddeck serve``'s poll: swap in its deck once it is deployed; on any
        failure keep the snapshot and note it in :attr:`store_state`. While the reconciler deploys a new
        version, the store is neither in sync nor failing: the state stays as it was."""
        snap = self._snapshot
        serving = snap.version if snap is not None else "none"
        try:
            manifest = self.store.manifest()
        except Exception as exc:  # endpoint down, directory gone or unreadable, a torn manifest
            self.store_watch.failed(exc, reachable=False, version=serving)
            return
        try:
            self.refresh(manifest)
        except Exception as exc:  # a card that cannot be read, the reconciler out of reach
            self.store_watch.failed(exc, reachable=True, version=serving)
            return
        snap = self._snapshot
        if snap is not None and snap.version == manifest.version:
            self.store_watch.synced(manifest.version)

    def refresh(self, manifest: Manifest) -> bool:
        """Swap in the deck of ``manifest`` (the store's) once every card of it runs; True when it swapped."""
        current = self._snapshot
        if current is not None and manifest.version == current.version:
            return False
        running = self.reconciler.running.remote().result(timeout_s=self.config.request_timeout_s)
        if any(running.get(e.name) != e.key for e in manifest.active()):
            return False  # the reconciler is still deploying: keep serving the snapshot we have
        deck = Deck.open(self.store, run_cards=False)
        if any(running.get(m.name) != m.key for m in deck.cards):
            return False  # the store moved on between the two reads
        deck = RayDeck(deck, self.config.request_timeout_s)
        # its detector first (a read of the store: slow on S3), so that no request of this version is answered
        # `unknown` for want of it; those still running on the last one are judged only by a detector of their
        # own cards (predict), never the new cards' by the old detector or the reverse
        self._load_shift(deck)  # never raises: an unusable detector is logged and the state is `unknown`
        self._snapshot = deck
        log.info("serving deck version %d: %s", deck.version, ", ".join(deck.card_names) or "no cards")
        self.metrics.set_deck(deck.version, deck.cards)
        self.metrics.set_default_policy(deck.default_policy, deck.configured_policy)
        return True

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.config.poll_interval_s)

    def close(self) -> None:
        self._stop.set()

    # -- what the routes use ------------------------------------------------------------------
    @property
    def deck(self) -> RayDeck:
        return self._current()

    def _current(self) -> RayDeck:
        snap = self._snapshot
        if snap is None:
            raise NotReady(f"the deck at {self.config.deck} is not deployed yet")
        return snap

    @property
    def ready(self) -> bool:
        snap = self._snapshot
        return snap is not None and bool(snap.cards)

    @property
    def store_state(self) -> StoreState:
        return self.store_watch.state

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        yield  # Ray Serve drains a replica's in-flight requests itself (graceful_shutdown_timeout_s)

    def resolve(self, name: str | None = None, version: str = "") -> Model:
        """As :meth:`carddeck.serving.dataplane.Dataplane.resolve`: the model on the snapshot the request keeps."""
        deck_name = self.config.deck_model_name
        return resolve(self.deck, deck_name, deck_name if name is None else name, version)

    def _snapshot_of(self, model: Model) -> RayDeck:
        """The snapshot the model was resolved on (the request keeps it); its cards' applications, by name."""
        if isinstance(model.deck, RayDeck):
            return model.deck
        return RayDeck(model.deck, self.config.request_timeout_s)

    # Ray's proxies pass no client deadline on (timeout_s is None from both): each card call waits at most
    # request_timeout_s. A cancelled request is dropped before its card calls go out.
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
        with self.budget.hold(len(images)):  # past --max-inflight-images: Overloaded, as on carddeck serve
            return self._predict(model or self.resolve(), images, policy, per_sample, is_cancelled)

    def _predict(
        self,
        model: Model,
        images: np.ndarray,
        policy: str | None,
        per_sample: bool,
        is_cancelled: Callable[[], bool] | None,
    ) -> tuple[Prediction, Deck]:
        snap = deck = self._snapshot_of(model)  # the snapshot this request finishes on
        start = time.monotonic()
        try:
            x = deck.prepare(images)
            routing = deck.route_prepared(x, policy=policy, per_sample=per_sample)
            _check_cancelled(is_cancelled)
            t0 = time.monotonic()
            agreement = np.empty(len(x), np.float32)
            result = functools.partial(self._result, snap)
            probabilities = snap.run_routed(x, routing.weights, result=result, agreement=agreement)
        except BaseException:
            self._record(model, len(images), start, ok=False)
            raise
        self._record(model, len(x), start, ok=True, compute_s=time.monotonic() - t0)
        try:  # the gate's series, as carddeck serve counts each routed request; never fails the answer
            self.metrics.observe_routings([routing])
        except Exception:
            log.exception("observing the routing of a request of %d images failed", len(x))
        request = (model.name, x, routing, probabilities, agreement)
        (verdict,) = self.shift.judge([request], cards=snap.card_keys)  # never raises
        return Prediction(probabilities, routing, verdict, agreement=agreement), deck

    def run_card(
        self,
        model: Model,
        images: np.ndarray,
        *,
        timeout_s: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        with self.budget.hold(len(images)):  # as predict
            return self._run_card(model, images, is_cancelled)

    def _run_card(self, model: Model, images: np.ndarray, is_cancelled: Callable[[], bool] | None) -> np.ndarray:
        snap = self._snapshot_of(model)
        start = time.monotonic()
        try:
            name = snap.card(model.name).name  # CardNotFound names the cards there are
            x = snap.prepare(images)
            _check_cancelled(is_cancelled)
            t0 = time.monotonic()
            probabilities = self._call(snap, name, x)
        except BaseException:
            self._record(model, len(images), start, ok=False)
            raise
        self._record(model, len(x), start, ok=True, compute_s=time.monotonic() - t0)
        return probabilities

    def _record(self, model: Model, n: int, start: float, *, ok: bool, compute_s: float = 0.0) -> None:
        """Statistics as the local data plane keeps them; the ingress queues nothing itself, so the wait for the
        card replicas (Ray's queues and @serve.batch included) counts as compute. Each request is one
        execution here: the cards' @serve.batch merges them behind the ingress, out of its sight."""
        self.statistics.record(model.name, n, time.monotonic() - start, ok=ok, compute_s=compute_s)
        if ok:
            self.statistics.record_execution(model.name, n, compute_s)

    # -- streams: synchronous like the rest of this plane; each streamed request runs as it is started
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
        out: Future[Any] = Future()
        try:
            if model.card is None:
                out.set_result(
                    self.predict(images, model=model, policy=policy, per_sample=per_sample, is_cancelled=is_cancelled)
                )
            else:
                out.set_result(self.run_card(model, images, is_cancelled=is_cancelled))
        except BaseException as exc:
            out.set_exception(exc)
        return out

    def announce(self) -> None:
        """Nothing to wait for: the ingress does not batch (the card deployments' @serve.batch does)."""

    def withdraw(self) -> None:
        """As :meth:`announce`."""

    def batch_policy(self, model: Model) -> BatchPolicy:
        """The card deployments' @serve.batch settings (the ingress itself merges nothing)."""
        return BatchPolicy(MAX_BATCH_SIZE, BATCH_WAIT_S)

    def stats(self, model: str) -> ModelStats:
        return self.statistics.get(model)

    def add_card(self, model: bytes | Path) -> tuple[CardMeta, bool]:
        """Into the store; the reconciler deploys it and the ingress serves it once it runs. Counted in
        ``carddeck_card_changes`` with carddeck serve's outcomes (ok, already_present, rejected)."""
        try:
            meta = self.store.add_card(model, reserved=(self.config.deck_model_name,))
        except Exception:
            self.metrics.card_change("add", "rejected")
            raise
        new = self.store.last_add_was_new
        self.metrics.card_change("add", "ok" if new else "already_present")
        return meta, new

    def remove_card(self, name: str, version: int | None = None) -> tuple[list[str], str]:
        try:
            removed = self.store.remove_card(name, version)
        except Exception:
            self.metrics.card_change("remove", "rejected")
            raise
        self.metrics.card_change("remove", "ok")
        return removed, ""

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    # -- card calls ----------------------------------------------------------------------------
    def _call(self, snap: RayDeck, name: str, x: np.ndarray) -> np.ndarray:
        return self._result(snap, name, x, snap.handles[name].remote(x))

    def _result(self, snap: RayDeck, name: str, x: np.ndarray, call: Any) -> np.ndarray:
        self._count("card_calls")
        self._count("in_flight")
        try:
            return self._retried(snap, name, x, call)
        finally:
            self._count("in_flight", -1)

    def _retried(self, snap: RayDeck, name: str, x: np.ndarray, call: Any) -> np.ndarray:
        try:
            return np.asarray(call.result(timeout_s=self.config.request_timeout_s))
        except REPLICA_LOST as exc:
            log.warning("card %s: replica lost under a request (%s); retrying once", name, type(exc).__name__)
            self._count("retried")
        try:
            return np.asarray(snap.handles[name].remote(x).result(timeout_s=self.config.request_timeout_s))
        except REPLICA_LOST as exc:
            self._count("unavailable")
            raise CardUnavailable(
                f"card {name}: its replica was lost twice under this request ({type(exc).__name__}); retry it"
            ) from None
        except TimeoutError:
            self._count("unavailable")
            raise CardUnavailable(f"card {name}: no answer in {self.config.request_timeout_s:g} s; retry it") from None

    def _count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self._counts[what] += n


def _check_cancelled(is_cancelled: Callable[[], bool] | None) -> None:
    if is_cancelled is not None and is_cancelled():
        raise Cancelled("request cancelled (or its deadline passed) before it ran")


__all__ = ["RayDataplane", "RayDeck"]
