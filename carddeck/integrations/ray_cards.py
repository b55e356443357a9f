"""The card deployments (one application per card: one ORT session, ``@serve.batch``, autoscaled) and the
reconciler that keeps one running per card of the store and refits the deck's shift detector after a change."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from ray import serve

from carddeck.deck import Deck, DeckStore
from carddeck.deck.runtime import CardSession, choose_providers, softmax
from carddeck.errors import CardNotFound
from carddeck.integrations.ray_config import (
    BATCH_WAIT_S,
    CARD_APP,
    MAX_BATCH_SIZE,
    RayDeckConfig,
    card_app_name,
    replica_logging,
)
from carddeck.integrations.ray_metrics import RayMetricsExport, families
from carddeck.integrations.ray_plane import RayDeck
from carddeck.observability.metrics import Metrics
from carddeck.observability.shift import ShiftLoader, ShiftMonitor

log = logging.getLogger(__name__)


@serve.deployment
class CardReplica:
    """One card: one ORT session; concurrent requests merged into one run by ``@serve.batch``.

    Its batching series are ``carddeck serve``'s, through Ray's metrics export: the images of each run
    (``carddeck_batch_size``), each request's wait for it and the requests waiting (``carddeck_queue_*``),
    and the run's time (``carddeck_card_duration_seconds``). Here a batch is one card's run: the ingress
    routes each request alone and every card merges what is routed to it."""

    def __init__(self, location: str, key: str, threads: int) -> None:
        replica_logging()
        store = DeckStore(location)
        entry = next((e for e in store.manifest().cards if e.key == key), None)
        if entry is None:
            raise CardNotFound(f"card {key} is no longer in the deck at {location}")
        self.key, self.name = key, entry.name
        self.session = CardSession(
            store.read_model(entry),
            key=key,
            digest=entry.sha256.get("model.onnx", ""),
            providers=choose_providers(),
            intra_op_threads=threads,
        )
        self._queued: dict[object, float] = {}  # each request waiting for its batch -> when it arrived
        m = self.metrics = Metrics(CollectorRegistry())
        m.track_queue_depth(lambda: len(self._queued))
        self._export = RayMetricsExport(m.registry, only=families([m.batch_size, m.queue_wait, m.queue_depth,
                                                                   m.card_duration]))  # fmt: skip

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        """The card's probabilities for ``x``, run with whatever other requests wait with it."""
        ticket = object()
        self._queued[ticket] = time.monotonic()
        try:
            return await self._batch((x, ticket))
        finally:
            self._queued.pop(ticket, None)  # cancelled before its batch ran

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batch(self, requests: list[tuple[np.ndarray, object]]) -> list[np.ndarray]:
        """Probabilities for each request's rows: one ORT run over all of them (ORT releases the GIL)."""
        now = time.monotonic()
        waits = [now - self._queued.pop(ticket, now) for _, ticket in requests]
        batches = [x for x, _ in requests]
        x = batches[0] if len(batches) == 1 else np.concatenate(batches)
        self.metrics.observe_batch(len(x), waits)
        start = time.monotonic()
        probs = await asyncio.to_thread(lambda: softmax(self.session.logits(x)))
        self.metrics.observe_card(self.name, time.monotonic() - start)
        return np.split(probs, np.cumsum([len(b) for b in batches])[:-1])

    def __del__(self) -> None:
        export = getattr(self, "_export", None)  # None: __init__ failed before it
        if export is not None:
            export.close()


def card_application(config: RayDeckConfig, name: str, key: str) -> Any:
    return CardReplica.options(  # type: ignore[attr-defined]
        name=f"card-{name}",
        autoscaling_config=config.autoscaling(),
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options={"num_cpus": config.card_num_cpus},
        graceful_shutdown_timeout_s=config.request_timeout_s,
    ).bind(config.deck, key, config.card_threads)


# -- the reconciler -----------------------------------------------------------------------------
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.01})
class DeckReconciler:
    """Keeps one running card application per served card of the store (see the module docstring).

    Once every card of a deck version runs, it loads that deck's shift detector as ``carddeck serve`` does
    (:class:`~carddeck.observability.shift.ShiftLoader`); when none is stored for those cards, it refits one in
    the background from the deck's calibration images, run through the card deployments, and stores it in the
    deck, where every ingress replica (serving `unknown` until then) loads it. One replica: one refit per change.
    """

    def __init__(self, config: RayDeckConfig) -> None:
        replica_logging()
        self.config = config
        self.store = DeckStore(config.deck)
        self.metrics = Metrics(CollectorRegistry())  # the refits' series (the ingress exports the rest)
        self._export = RayMetricsExport(
            self.metrics.registry, only=families([self.metrics.shift_refits, self.metrics.shift_refit_seconds])
        )
        # the monitor only holds the detector here: the ingress replicas judge the traffic
        self.shift = ShiftLoader(ShiftMonitor(), on_refit=self.metrics.observe_refit, store_refit=True)
        self._judged: int | None = None  # the deck version last given to self.shift
        self._running: dict[str, str] = {}  # card name -> key, application RUNNING
        self._gone_since: dict[str, float] = {}  # removed from the store at (monotonic)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # card applications left by an earlier run that the store no longer names are deleted too
        for app in serve.status().applications:
            if app.startswith(CARD_APP):
                self._running[app[len(CARD_APP) :]] = ""
        self._thread = threading.Thread(target=self._loop, name="carddeck-reconciler", daemon=True)
        self._thread.start()

    def running(self) -> dict[str, str]:
        """Card name -> key of each card application that is deployed and running."""
        with self._lock:
            return {n: k for n, k in self._running.items() if k}

    def reconcile(self) -> dict[str, str]:
        manifest = self.store.manifest()
        wanted = {e.name: e.key for e in manifest.active()}
        for name, key in wanted.items():
            self._gone_since.pop(name, None)
            if self._running.get(name) != key:
                log.info("deploying card %s", key)
                serve.run(card_application(self.config, name, key), name=card_app_name(name), route_prefix=None)
                with self._lock:
                    self._running[name] = key
        now = time.monotonic()
        for name in [n for n in self._running if n not in wanted]:
            if now - self._gone_since.setdefault(name, now) >= self.config.drain_s:
                log.info("deleting the application of removed card %s", name)
                serve.delete(card_app_name(name))
                with self._lock:
                    del self._running[name]
                del self._gone_since[name]
        if manifest.version != self._judged and all(self._running.get(n) == k for n, k in wanted.items()):
            deck = Deck.open(self.store, run_cards=False)
            if all(self._running.get(m.name) == m.key for m in deck.cards):  # the store did not move on
                self._judged = deck.version
                self.shift(RayDeck(deck, self.config.request_timeout_s))  # a refit runs in its own thread
        return self.running()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception as exc:  # a half-written store, a card that fails to load: try again
                log.warning("deck %s: reconcile failed, retrying: %s", self.config.deck, exc)
            self._stop.wait(self.config.poll_interval_s)

    def __del__(self) -> None:
        self._stop.set()
        self._export.close()


__all__ = ["CardReplica", "DeckReconciler", "card_application"]
