"""CARD-Deck on Ray Serve: a gated ingress and one autoscaled deployment per card, reconciled with a store.

Three kinds of deployment, all built from one :class:`RayDeckConfig`:

* ``CardDeckIngress`` (application ``carddeck``, the HTTP route prefix ``/``): the Open Inference
  Protocol REST routes of :mod:`carddeck.http` over a gate-only :class:`~carddeck.deck.Deck`
  snapshot (no ORT session). Each request is checked, signed and routed exactly as ``carddeck
  serve`` does it (the same Deck and Gate); each selected card gets only its rows; the results
  are combined with :func:`carddeck.deck.mix`, the code ``Deck.combine`` uses.
* ``CardReplica`` (one application per card, ``carddeck-card-<name>``, no HTTP route): one ORT
  session, ``@serve.batch`` merging concurrent requests, autoscaling on ongoing requests.
* ``DeckReconciler`` (one replica): polls the store; a new card (or version) gets its application,
  a removed card's application is deleted ``drain_s`` after the ingress stopped routing to it.

The ingress swaps in a new snapshot only once every card of it is deployed and running, and old
snapshots keep their handles until their requests finish, so no request fails during a change.
A card replica that dies under a request is retried once on another replica; a second failure is
:class:`CardUnavailable` (HTTP 503, gRPC UNAVAILABLE). Both are counted (:meth:`RayDataplane.counts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from carddeck.card import CardMeta
from carddeck.deck import Deck, DeckStore, Manifest, Prediction
from carddeck.deck.deck import mix, routed_rows
from carddeck.deck.runtime import CardSession, choose_providers, softmax
from carddeck.errors import Cancelled, CardNotFound, InvalidInput, NotReady
from carddeck.serving.batching import BatchPolicy
from carddeck.serving.models import Model, resolve
from carddeck.serving.snapshot import StoreState, StoreWatch
from carddeck.serving.stats import ModelStats, Statistics

log = logging.getLogger(__name__)

APP = "carddeck"
CARD_APP = "carddeck-card-"  # + card name: one application per card
MAX_BATCH_SIZE = 64  # requests merged by @serve.batch (the server's max_batch_size)
BATCH_WAIT_S = 0.002  # the server's max_wait_ms
# Ray errors that mean "the replica went away under this request": retried once elsewhere.
REPLICA_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class CardUnavailable(NotReady):
    """A card's replicas failed the request twice (HTTP 503, gRPC UNAVAILABLE): retry it."""


@dataclass(frozen=True)
class RayDeckConfig:
    """Everything the deployments need; one picklable value shared by the ingress, cards and reconciler."""

    deck: str  # store location: a directory or s3://bucket/prefix
    deck_model_name: str = "carddeck"
    poll_interval_s: float = 1.0  # how often the reconciler and the ingress look at the store
    drain_s: float = 10.0  # a removed card's deployment outlives the ingress's last use of it by this much
    request_timeout_s: float = 60.0  # longest wait for one card's answer
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.1
    card_num_cpus: float = 0.1  # small fractions: several replicas share a core on a small machine
    card_threads: int = 1  # ORT intra-op threads per card replica (Ray, not ORT, spreads the load)
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 4.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 10.0
    max_ongoing_requests: int = 64
    allow_unauthenticated_admin: bool = False  # HTTP repository load/unload without a token
    admin_token: str = field(default="", repr=False)

    def autoscaling(self) -> dict[str, Any]:
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": 0.5,  # deprecated for env vars in 2.60, still read; must stay < look_back
            "look_back_period_s": 2.0,
        }

    def settings(self) -> Any:
        from carddeck.serving.settings import Settings

        return Settings(
            deck=self.deck,
            deck_model_name=self.deck_model_name,
            admin_token=self.admin_token,
            allow_unauthenticated_admin=self.allow_unauthenticated_admin,
            http_port=-1,
            metrics_port=-1,
        )


def card_app_name(card: str) -> str:
    return CARD_APP + card


# -- card deployments ---------------------------------------------------------------------------
@serve.deployment
class CardReplica:
    """One card: one ORT session; concurrent requests merged into one run by ``@serve.batch``."""

    def __init__(self, location: str, key: str, threads: int) -> None:
        store = DeckStore(location)
        entry = next((e for e in store.manifest().cards if e.key == key), None)
        if entry is None:
            raise CardNotFound(f"card {key} is no longer in the deck at {location}")
        self.key = key
        self.session = CardSession(
            store.read_model(entry),
            key=key,
            digest=entry.sha256.get("model.onnx", ""),
            providers=choose_providers(),
            intra_op_threads=threads,
        )

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def __call__(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Probabilities for each request's rows: one ORT run over all of them (ORT releases the GIL)."""
        x = batches[0] if len(batches) == 1 else np.concatenate(batches)
        probs = await asyncio.to_thread(lambda: softmax(self.session.logits(x)))
        return np.split(probs, np.cumsum([len(b) for b in batches])[:-1])


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
    """Keeps one running card application per served card of the store (see the module docstring)."""

    def __init__(self, config: RayDeckConfig) -> None:
        self.config = config
        self.store = DeckStore(config.deck)
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
        wanted = {e.name: e.key for e in self.store.manifest().active()}
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


# -- the ingress --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Snapshot:
    deck: Deck
    handles: dict[str, DeploymentHandle]  # card name -> its application's handle


class RayDataplane:
    """The transports' data plane (:class:`carddeck.serving.plane.Plane`) over Ray handles.

    Synchronous, like the routes (which run in a thread pool): card calls wait on ``.result()``. Its store
    state and statistics are this ingress replica's own, as each ``carddeck serve`` replica reports its own.
    """

    def __init__(self, config: RayDeckConfig, reconciler: DeploymentHandle) -> None:
        self.config = config
        self.reconciler = reconciler
        self.store = DeckStore(config.deck)
        self._snapshot: _Snapshot | None = None
        self.store_watch = StoreWatch(config.deck)
        self.statistics = Statistics()
        self._lock = threading.Lock()
        self._counts = {"card_calls": 0, "retried": 0, "unavailable": 0, "in_flight": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="carddeck-ray-snapshot", daemon=True)
        self._thread.start()

    # -- the snapshot -------------------------------------------------------------------------
    def poll(self) -> None:
        """One look at the store, as ``carddeck serve``'s poll: swap in its deck once it is deployed; on any
        failure keep the snapshot and note it in :attr:`store_state`. While the reconciler deploys a new
        version, the store is neither in sync nor failing: the state stays as it was."""
        snap = self._snapshot
        serving = snap.deck.version if snap is not None else "none"
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
        if snap is not None and snap.deck.version == manifest.version:
            self.store_watch.synced(manifest.version)

    def refresh(self, manifest: Manifest) -> bool:
        """Swap in the deck of ``manifest`` (the store's) once every card of it runs; True when it swapped."""
        current = self._snapshot
        if current is not None and manifest.version == current.deck.version:
            return False
        running = self.reconciler.running.remote().result(timeout_s=self.config.request_timeout_s)
        if any(running.get(e.name) != e.key for e in manifest.active()):
            return False  # the reconciler is still deploying: keep serving the snapshot we have
        deck = Deck.open(self.store, run_cards=False)
        if any(running.get(m.name) != m.key for m in deck.cards):
            return False  # the store moved on between the two reads
        handles = {m.name: serve.get_app_handle(card_app_name(m.name)) for m in deck.cards}
        self._snapshot = _Snapshot(deck, handles)
        log.info("serving deck version %d: %s", deck.version, ", ".join(deck.card_names) or "no cards")
        return True

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.config.poll_interval_s)

    def close(self) -> None:
        self._stop.set()

    # -- what the routes use ------------------------------------------------------------------
    @property
    def deck(self) -> Deck:
        return self._current().deck

    def _current(self) -> _Snapshot:
        snap = self._snapshot
        if snap is None:
            raise NotReady(f"the deck at {self.config.deck} is not deployed yet")
        return snap

    @property
    def ready(self) -> bool:
        snap = self._snapshot
        return snap is not None and bool(snap.deck.cards)

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

    def _snapshot_of(self, model: Model) -> _Snapshot:
        snap = self._current()
        if snap.deck is model.deck:
            return snap
        # swapped since the model was resolved: the same cards' applications, by name, serve the request
        return _Snapshot(model.deck, {m.name: serve.get_app_handle(card_app_name(m.name)) for m in model.deck.cards})

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
        model = model or self.resolve()
        snap = self._snapshot_of(model)  # the snapshot this request finishes on
        deck = snap.deck
        start = time.monotonic()
        try:
            x = deck.prepare(images)
            routing = deck.route_prepared(x, policy=policy, per_sample=per_sample)
            _check_cancelled(is_cancelled)
            t0 = time.monotonic()
            probabilities = self._combine(snap, x, routing.weights)
        except BaseException:
            self._record(model, len(images), start, ok=False)
            raise
        self._record(model, len(x), start, ok=True, compute_s=time.monotonic() - t0)
        return Prediction(probabilities, routing), deck

    def run_card(
        self,
        model: Model,
        images: np.ndarray,
        *,
        timeout_s: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        snap = self._snapshot_of(model)
        start = time.monotonic()
        try:
            name = snap.deck.card(model.name).name  # CardNotFound names the cards there are
            x = snap.deck.prepare(images)
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
        """Into the store; the reconciler deploys it and the ingress serves it once it runs."""
        meta = self.store.add_card(model, reserved=(self.config.deck_model_name,))
        return meta, self.store.last_add_was_new

    def remove_card(self, name: str, version: int | None = None) -> tuple[list[str], str]:
        return self.store.remove_card(name, version), ""

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    # -- fan-out ------------------------------------------------------------------------------
    def _combine(self, snap: _Snapshot, x: np.ndarray, weights: np.ndarray) -> np.ndarray:
        jobs = routed_rows(weights, snap.deck.card_names)
        subs = [x if len(rows) == len(x) else np.ascontiguousarray(x[rows]) for _, _, rows in jobs]
        calls = [snap.handles[name].remote(sub) for (_, name, _), sub in zip(jobs, subs)]  # all at once
        outputs = [self._result(snap, name, sub, call) for (_, name, _), sub, call in zip(jobs, subs, calls)]
        combine = snap.deck.gate.params.combine if snap.deck.gate is not None else "mean"
        return mix(weights, [(k, rows) for k, _, rows in jobs], outputs, len(snap.deck.class_names), combine=combine)

    def _call(self, snap: _Snapshot, name: str, x: np.ndarray) -> np.ndarray:
        return self._result(snap, name, x, snap.handles[name].remote(x))

    def _result(self, snap: _Snapshot, name: str, x: np.ndarray, call: Any) -> np.ndarray:
        self._count("card_calls")
        self._count("in_flight")
        try:
            return self._retried(snap, name, x, call)
        finally:
            self._count("in_flight", -1)

    def _retried(self, snap: _Snapshot, name: str, x: np.ndarray, call: Any) -> np.ndarray:
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


class _Aborted(Exception):
    pass


class _GrpcContext:
    """The ``grpc.ServicerContext`` surface our servicers use, over Ray Serve's gRPC context."""

    def __init__(self, ray_context: Any) -> None:
        self.ray_context = ray_context

    def time_remaining(self) -> float | None:
        return None  # Ray's proxy does not pass the client's deadline on

    def is_active(self) -> bool:
        return True

    def set_trailing_metadata(self, metadata: Any) -> None:
        # the error's class name rides here, so the Python client raises the same typed error through Ray
        self.ray_context.set_trailing_metadata(list(metadata))

    def abort(self, code: Any, details: str) -> None:
        self.ray_context.set_code(code)
        self.ray_context.set_details(details)
        raise _Aborted


# carddeck.v1 RPCs served through Ray Serve's gRPC proxy: the unary ones (the proxy has no client streaming,
# so AddCard is not among them), each with the response type an aborted call answers with.
GRPC_RPCS = ("Predict", "Route", "ListCards", "GetCard", "RemoveCard")
GRPC_SERVICER = "carddeck.integrations.ray_grpc.add_CardDeckServicer_to_server"


@serve.deployment
@serve.ingress()
class CardDeckIngress:
    """HTTP: the OIP REST routes of carddeck.http. gRPC (Ray's proxy, ``GRPC_SERVICER``): ``GRPC_RPCS``
    of carddeck.v1 through the server's own servicer. Handle methods: ``predict``, ``ready``, ``counts``."""

    def __init__(self, config: RayDeckConfig, reconciler: DeploymentHandle) -> None:
        import carddeck.integrations.ray_grpc  # noqa: F401 (the messages' pickled module name)
        from carddeck.app.transports import carddeck_servicer

        self.config = config
        self.plane = RayDataplane(config, reconciler)
        # the gRPC server's servicer and its rule per method (admin RPCs need the admin token)
        self.servicer, self.auth = carddeck_servicer(self.plane, config.settings())

    async def _grpc(self, rpc: str, request: Any, grpc_context: Any) -> Any:
        """One carddeck.v1 call through the server's servicer; a refused or failed call answers an empty
        response with its status code and message set on Ray's context (what the proxy sends back)."""
        from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb

        empty = {"Predict": pb.PredictResponse, "Route": pb.RouteResponse, "ListCards": pb.ListCardsResponse,
                 "GetCard": pb.Card, "RemoveCard": pb.RemoveCardResponse}[rpc]  # fmt: skip
        context = _GrpcContext(grpc_context)
        try:
            refusal = self.auth.check(f"/carddeck.v1.CardDeck/{rpc}", grpc_context.invocation_metadata())
            if refusal is not None:
                context.abort(*refusal)
            return await asyncio.to_thread(getattr(self.servicer, rpc), request, context)
        except _Aborted:
            return empty()

    async def Predict(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("Predict", request, grpc_context)

    async def Route(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("Route", request, grpc_context)

    async def ListCards(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("ListCards", request, grpc_context)

    async def GetCard(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("GetCard", request, grpc_context)

    async def RemoveCard(self, request: Any, grpc_context: Any) -> Any:
        return await self._grpc("RemoveCard", request, grpc_context)

    def __serve_build_asgi_app__(self) -> Any:
        from carddeck.app.transports import http_app

        return http_app(self.plane, self.config.settings())

    async def predict(self, images: np.ndarray, policy: str | None = None, per_sample: bool = False) -> dict[str, Any]:
        """The gated deck's answer (probabilities, labels, routing weights and card names, deck version)."""
        prediction, deck = await asyncio.to_thread(self.plane.predict, images, policy=policy, per_sample=per_sample)
        return {
            "probabilities": prediction.probabilities,
            "labels": prediction.labels,
            "weights": prediction.routing.weights,
            "card_names": prediction.routing.card_names,
            "policy": prediction.routing.policy,
            "version": deck.version,
        }

    async def ready(self) -> dict[str, Any]:
        """Whether a snapshot with cards is served, its version and cards."""
        snap = self.plane._snapshot
        if snap is None:
            return {"ready": False, "version": None, "cards": []}
        return {"ready": self.plane.ready, "version": snap.deck.version, "cards": list(snap.deck.card_names)}

    async def counts(self) -> dict[str, int]:
        return self.plane.counts()

    def __del__(self) -> None:
        self.plane.close()


def application(config: RayDeckConfig) -> Any:
    """The ``carddeck`` application: the ingress and the reconciler (the cards are applications of their own)."""
    reconciler = DeckReconciler.options(name="reconciler").bind(config)  # type: ignore[attr-defined]
    return CardDeckIngress.options(  # type: ignore[attr-defined]
        name="ingress",
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=max(64, config.max_ongoing_requests),
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
    ).bind(config, reconciler)


def app_builder(args: dict[str, Any]) -> Any:
    """For Serve config files (``import_path: carddeck.integrations.ray_serve:app_builder``): ``args`` are
    :class:`RayDeckConfig` fields; without ``deck``, the packaged default deck (as ``carddeck serve``)."""
    from carddeck.deck import default_deck_path

    known = set(RayDeckConfig.__dataclass_fields__)
    unknown = sorted(set(args) - known)
    if unknown:
        raise InvalidInput(f"args: unknown {', '.join(unknown)}; accepted: {', '.join(sorted(known))}")
    return application(RayDeckConfig(**{"deck": str(default_deck_path()), **args}))


def deploy(config: RayDeckConfig, *, wait_s: float = 300.0) -> DeploymentHandle:
    """Run the application on the connected Ray cluster; returns the ingress handle once it serves the deck."""
    handle = serve.run(application(config), name=APP, route_prefix="/")
    deadline = time.monotonic() + wait_s
    while True:
        state = handle.ready.remote().result()
        if state["ready"]:
            log.info("Ray Serve: deck version %s, cards %s", state["version"], ", ".join(state["cards"]))
            return handle
        if time.monotonic() > deadline:
            raise NotReady(f"the deck at {config.deck} was not serving {wait_s:g} s after deploy: {state}")
        time.sleep(0.5)


def undeploy() -> None:
    """Delete the carddeck application and every card application."""
    for app in list(serve.status().applications):
        if app == APP or app.startswith(CARD_APP):
            serve.delete(app)


__all__ = [
    "APP",
    "CARD_APP",
    "GRPC_RPCS",
    "GRPC_SERVICER",
    "CardUnavailable",
    "RayDataplane",
    "RayDeckConfig",
    "app_builder",
    "application",
    "card_app_name",
    "deploy",
    "undeploy",
]
