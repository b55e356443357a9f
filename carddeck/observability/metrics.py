"""Prometheus metrics of the server, in a registry that is passed in (never the global one).

One :class:`Metrics` object holds every collector; the server calls its small ``observe_*`` /
``set_*`` methods and :func:`start_metrics_server` exposes ``/metrics`` on its own port (8002 by
default, Triton's convention). Labels are low-cardinality only: RPC names, status codes, card
names, domains, policies; never request ids or client addresses.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIServer

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

if TYPE_CHECKING:
    from carddeck.gating.shift import ShiftDetector, Verdict

# Latency: 1-2.5-5 steps from 1 ms to 10 s, so p50/p90/p99 interpolate within a factor of 2.5.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Queue waits are often sub-millisecond: three finer buckets below the latency ones.
WAIT_BUCKETS = (0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Signature distances (gate metric, l2 by default, between radial log-spectrum profiles): on digits32
# a 32-image batch sits ~0.3-1.5 from its own domain, shifted ones ~2-10, single images up to ~10.
DISTANCE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0)
# Shift statistics in units of their calibrated threshold: 1 is the line; foreign traffic reaches 100s.
SHIFT_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 300.0, 1000.0)
SHIFT_STATES = ("in_distribution", "covered", "uncovered")  # carddeck.gating.shift.STATES
UNKNOWN_DOMAIN = "unknown"


class RoutingLike(Protocol):
    """What :meth:`Metrics.observe_routing` reads from a :class:`carddeck.gating.Routing` (read-only, as its
    frozen fields are)."""

    @property
    def policy(self) -> str: ...
    @property
    def per_sample(self) -> bool: ...
    @property
    def card_names(self) -> tuple[str, ...]: ...
    @property
    def weights(self) -> np.ndarray: ...
    @property
    def domains(self) -> tuple[str, ...]: ...
    @property
    def distances(self) -> np.ndarray: ...


@dataclass(frozen=True)
class _CardChildren:
    selections: Any
    images: Any
    weight: Any


class Metrics:
    """Every collector of the server, registered in ``registry``.

    Thread-safe (prometheus_client collectors are). The shift signal (:mod:`carddeck.observability.shift`)
    reports through :meth:`observe_shift` and :meth:`set_shift_detector`.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.requests = Counter(
            "carddeck_requests", "RPCs finished, by service, RPC and gRPC status code.", ["service", "rpc", "code"],
            registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "carddeck_request_duration_seconds", "RPC latency from handler entry to final status.",
            ["service", "rpc"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight_requests = Gauge(
            "carddeck_requests_in_flight", "RPCs being handled now.", ["service", "rpc"], registry=r
        )
        self.card_duration = Histogram(
            "carddeck_card_duration_seconds", "Time to run one CARD on one batch.", ["card"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "carddeck_batch_size", "Images per batch run through the deck (after micro-batching).",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.model_inferences = Counter(
            "carddeck_model_inferences", "Images run, by model (Triton's nv_inference_count).", ["model"], registry=r
        )
        self.model_executions = Counter(
            "carddeck_model_executions",
            "Batches run, by model: requests merged into one batch count once (Triton's nv_inference_exec_count; "
            "inferences / executions = mean executed batch).",
            ["model"], registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge("carddeck_queue_depth", "Requests waiting in the micro-batching queue.", registry=r)
        self.images_in_flight = Gauge(
            "carddeck_images_in_flight", "Images being served now (against --max-inflight-images).", registry=r
        )
        self.queue_wait = Histogram(
            "carddeck_queue_wait_seconds", "Time a request waited in the micro-batching queue.",
            buckets=WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.gate_decisions = Counter(
            "carddeck_gate_decisions", "Gate decisions: one per batch (mode=batch) or per image (mode=sample).",
            ["policy", "mode"], registry=r,
        )  # fmt: skip
        self.gate_selections = Counter(
            "carddeck_gate_selections", "Gate decisions that ran the card.", ["card", "domain"], registry=r
        )
        self.gate_images = Counter("carddeck_gate_images", "Images the card ran on.", ["card", "domain"], registry=r)
        self.gate_weight = Counter(
            "carddeck_gate_weight",
            "Sum over images of the card's combination weight: its share of the deck's predictions.",
            ["card", "domain"], registry=r,
        )  # fmt: skip
        self.domain_distance = Histogram(
            "carddeck_domain_distance", "Distance from the batch (or image) signature to each domain's reference.",
            ["domain"], buckets=DISTANCE_BUCKETS, registry=r,
        )  # fmt: skip
        self.nearest_distance = Histogram(
            "carddeck_nearest_domain_distance", "Distance from the batch (or image) signature to the nearest domain.",
            buckets=DISTANCE_BUCKETS, registry=r,
        )  # fmt: skip
        self.shift_batches = Counter(
            "carddeck_shift_batches",
            "Batches (unit=batch) and sliding windows of small requests (unit=window) by shift state: "
            "in_distribution, covered (a shift the deck handles), uncovered (one it does not).",
            ["model", "state", "unit"], registry=r,
        )  # fmt: skip
        self.shift_statistic = Histogram(
            "carddeck_shift_statistic",
            "MMD^2 between a batch (or window) and the clean reference, in units of the calibrated threshold.",
            ["model", "unit"], buckets=SHIFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.shift_distance = Histogram(
            "carddeck_shift_distance",
            "MMD^2 to the nearest known shifted condition (domain or calibration corruption), in threshold units.",
            ["model", "unit"], buckets=SHIFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.expected_accuracy = Gauge(
            "carddeck_expected_accuracy",
            "Estimated accuracy of the deck on the latest batch or window (no labels needed); 0 when unknown.",
            ["model"], registry=r,
        )  # fmt: skip
        self.shift_false_alarm_rate = Gauge(
            "carddeck_shift_false_alarm_rate",
            "Calibrated false-alarm rate of the shift detector per in-distribution batch or window "
            "(expected run time between false alarms: its inverse).",
            registry=r,
        )  # fmt: skip
        self.shift_detector_fitted = Gauge(
            "carddeck_shift_detector_fitted",
            "1 while a shift detector fitted to the deck's cards judges traffic; 0 while the state is unknown "
            "(none stored for these cards, a refit running).", registry=r,
        )  # fmt: skip
        self.shift_refits = Counter(
            "carddeck_shift_refits", "Background refits of the shift detector after a deck change, by outcome.",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.shift_refit_seconds = Gauge(
            "carddeck_shift_refit_duration_seconds", "Duration of the latest shift detector refit.", registry=r
        )  # fmt: skip
        self.deck_version = Gauge("carddeck_deck_version", "Version of the deck snapshot being served.", registry=r)
        self.deck_cards = Gauge("carddeck_deck_cards", "Number of CARDs in the deck being served.", registry=r)
        self.default_policy = Gauge(
            "carddeck_default_policy_info",
            "1 for the policy served when a request names none, labelled with the deck's configured one: they "
            "differ when the configured policy cannot serve (a calibrated router whose card was removed).",
            ["policy", "configured"], registry=r,
        )  # fmt: skip
        self.card_changes = Counter(
            "carddeck_card_changes", "Card loads and removals, by operation and outcome.", ["op", "outcome"],
            registry=r,
        )  # fmt: skip
        self.store_up = Gauge(
            "carddeck_store_up", "1 when the last poll could read the deck store's manifest, 0 when it could not.",
            registry=r,
        )  # fmt: skip
        self.store_last_sync = Gauge(
            "carddeck_store_last_sync_timestamp_seconds",
            "Unix time of the last poll that found this replica serving the store's deck version "
            "(time() minus it: how stale the served snapshot may be).",
            registry=r,
        )  # fmt: skip
        self.store_poll_errors = Counter(
            "carddeck_store_poll_errors",
            "Polls of the deck store that failed (unreachable, or a deck that cannot be loaded).", registry=r,
        )  # fmt: skip
        self.build = Info("carddeck_build", "Versions this server was built from.", registry=r)

        self._lock = threading.Lock()
        self._card_domains: dict[str, str] = {}
        self._card_children: dict[tuple[str, str], _CardChildren] = {}
        self._shift_children: set[tuple[str, str]] = set()
        self._children_of: dict[tuple[Any, ...], Any] = {}  # label values -> child, see _child
        self.set_shift_detector(None)
        self.build_info()

    # -- requests (called by the interceptor) ---------------------------------------------------
    def observe_rpc(self, service: str, rpc: str, code: str, seconds: float) -> None:
        self._child(self.requests, service, rpc, code).inc()
        self._child(self.request_duration, service, rpc).observe(seconds)

    def rpc_started(self, service: str, rpc: str) -> None:
        self._child(self.in_flight_requests, service, rpc).inc()

    def rpc_finished(self, service: str, rpc: str, code: str, seconds: float) -> None:
        self._child(self.in_flight_requests, service, rpc).dec()
        self.observe_rpc(service, rpc, code, seconds)

    def _child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, remembered: ``labels`` takes the metric's lock on every call, and
        at batch 1 / concurrency 32 the request threads queued on it (20% of their time, py-spy)."""
        key = (id(metric), *values)
        child = self._children_of.get(key)
        if child is None:
            child = self._children_of[key] = metric.labels(*values)
        return child

    @contextmanager
    def in_flight(self, service: str, rpc: str) -> Iterator[None]:
        gauge = self._child(self.in_flight_requests, service, rpc)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    # -- dataplane --------------------------------------------------------------------------------
    def observe_card(self, card: str, seconds: float) -> None:
        self._child(self.card_duration, card).observe(seconds)

    def observe_batch(self, size: int, wait_seconds: float | Iterable[float] = ()) -> None:
        """One batch of ``size`` images ran; ``wait_seconds``: the queue wait of each request in it."""
        self.batch_size.observe(size)
        waits = [wait_seconds] if isinstance(wait_seconds, int | float) else wait_seconds
        for wait in waits:
            self.queue_wait.observe(wait)

    def observe_execution(self, model: str, images: int) -> None:
        """One batch run of ``model`` holding ``images`` of its images."""
        self._child(self.model_inferences, model).inc(images)
        self._child(self.model_executions, model).inc()

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def track_images_in_flight(self, images: Callable[[], int]) -> None:
        """Read the images in flight at scrape time (``lambda: dataplane.budget.used``)."""
        self.images_in_flight.set_function(images)

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        """Read the queue depth at scrape time (e.g. ``lambda: batcher.queue_depth``) instead of setting it."""
        self.queue_depth.set_function(depth)

    def observe_routing(self, routing: RoutingLike) -> None:
        """Record one gate decision: selections and weights per card, distances per domain.

        Per-batch routing is one decision (distance rows are all equal, one is observed); per-sample
        routing is one decision per image.
        """
        self.observe_routings([routing])

    def observe_routings(self, routings: Sequence[RoutingLike]) -> None:
        """:meth:`observe_routing` for several requests (a micro-batch): the same counts, with one
        counter update per card for all of them instead of one per request (a per-request update was
        ~0.1 ms of lock and label lookups, as much as routing the image)."""
        groups: dict[tuple[str, bool, tuple[str, ...], tuple[str, ...]], list[RoutingLike]] = {}
        for routing in routings:
            shape = np.shape(routing.weights)
            if len(shape) != 2 or shape[1] != len(routing.card_names):
                raise ValueError(f"routing.weights must be [N, {len(routing.card_names)}], got {list(shape)}")
            key = (routing.policy, routing.per_sample, tuple(routing.card_names), tuple(routing.domains))
            groups.setdefault(key, []).append(routing)
        for (policy, per_sample, cards, domains), group in groups.items():
            self._observe_group(policy, per_sample, cards, domains, group)

    def _observe_group(
        self, policy: str, per_sample: bool, cards: tuple[str, ...], domains: tuple[str, ...], group: list[RoutingLike]
    ) -> None:
        # The decisions: every image routed per sample; the first row of each request routed per batch
        # (its rows are all equal), which stands for len(request) images.
        if per_sample:
            weights = np.concatenate([np.asarray(r.weights, np.float64) for r in group])
            images_per_row = np.ones(len(weights))
            rows = [np.asarray(r.distances, np.float64) for r in group]
        else:
            weights = np.stack([np.asarray(r.weights[0], np.float64) for r in group])
            images_per_row = np.array([len(r.weights) for r in group], np.float64)
            rows = [np.asarray(r.distances[:1], np.float64) for r in group]
        mode = "sample" if per_sample else "batch"
        self.gate_decisions.labels(policy=policy, mode=mode).inc(len(weights))
        ran = weights > 0
        decided = ran.sum(axis=0)
        images = (ran * images_per_row[:, None]).sum(axis=0)
        share = (weights * images_per_row[:, None]).sum(axis=0)
        for k, card in enumerate(cards):
            if decided[k] == 0:
                continue
            children = self._children(card)
            children.selections.inc(int(decided[k]))
            children.images.inc(int(images[k]))
            children.weight.inc(float(share[k]))
        distances = np.concatenate(rows) if rows else np.zeros((0, 0))
        if distances.size == 0 or len(domains) == 0:
            return
        for d, domain in enumerate(domains):
            hist = self._child(self.domain_distance, domain)
            for value in distances[:, d].tolist():
                hist.observe(value)
        for value in distances.min(axis=1).tolist():
            self.nearest_distance.observe(value)

    # -- shift signal -------------------------------------------------------------------------------
    def observe_shift(self, model: str, unit: str, verdict: Verdict) -> None:
        """One tested batch or window (``unit``) of ``model``."""
        if (model, unit) not in self._shift_children:  # every state from the first test on, so rates start at 0
            for state in SHIFT_STATES:
                self.shift_batches.labels(model=model, state=state, unit=unit)
            self._shift_children.add((model, unit))
        self.shift_batches.labels(model=model, state=verdict.state, unit=unit).inc()
        self.shift_statistic.labels(model=model, unit=unit).observe(verdict.statistic)
        if np.isfinite(verdict.distance):
            self.shift_distance.labels(model=model, unit=unit).observe(verdict.distance)
        # Unknown (NaN) goes out as 0, what the deck can vouch for: a NaN sample would blind avg_over_time (and
        # CarddeckExpectedAccuracyLow) for its whole window, and leaving the sample out would hide the drop.
        accuracy = verdict.expected_accuracy if np.isfinite(verdict.expected_accuracy) else 0.0
        self.expected_accuracy.labels(model=model).set(accuracy)

    def set_shift_detector(self, detector: ShiftDetector | None) -> None:
        """A new detector (or none): its false-alarm rate, and the gauge of the old one is stale."""
        self.expected_accuracy.clear()
        self.shift_detector_fitted.set(0 if detector is None else 1)
        if detector is None:
            self.shift_false_alarm_rate.set(float("nan"))
        else:
            self.shift_false_alarm_rate.set(detector.alpha)

    def observe_refit(self, outcome: str, seconds: float) -> None:
        """A background refit of the shift detector ended (``ok``, ``failed`` or ``stale``)."""
        self.shift_refits.labels(outcome=outcome).inc()
        self.shift_refit_seconds.set(seconds)

    def _children(self, card: str) -> _CardChildren:
        domain = self._card_domains.get(card, UNKNOWN_DOMAIN)
        key = (card, domain)
        children = self._card_children.get(key)
        if children is None:
            with self._lock:
                children = _CardChildren(
                    self.gate_selections.labels(card=card, domain=domain),
                    self.gate_images.labels(card=card, domain=domain),
                    self.gate_weight.labels(card=card, domain=domain),
                )
                self._card_children[key] = children
        return children

    # -- deck -------------------------------------------------------------------------------------
    def set_deck(self, version: int, cards: int | Iterable[Any]) -> None:
        """The served snapshot changed. ``cards``: its CardMeta objects (``.name``, ``.key``,
        ``.domain``), which also tells the gate metrics each card's domain; or just their number."""
        if isinstance(cards, int):
            count = cards
        else:
            metas = list(cards)
            count = len(metas)
            with self._lock:
                for meta in metas:
                    self._card_domains[meta.name] = meta.domain
                    self._card_domains[getattr(meta, "key", meta.name)] = meta.domain
        self.deck_version.set(version)
        self.deck_cards.set(count)

    def set_default_policy(self, policy: str, configured: str) -> None:
        with self._lock:
            self.default_policy.clear()
            self.default_policy.labels(policy=policy, configured=configured).set(1)

    def card_change(self, op: str, outcome: str) -> None:
        """A card load/removal finished: ``op`` add/remove, ``outcome`` ok/already_present/rejected."""
        self.card_changes.labels(op=op, outcome=outcome).inc()

    def set_store(self, reachable: bool, last_sync: float, failed: bool) -> None:
        """A poll of the deck store ended (see :class:`carddeck.serving.snapshot.StoreState`)."""
        self.store_up.set(1 if reachable else 0)
        self.store_last_sync.set(last_sync)
        if failed:
            self.store_poll_errors.inc()

    def build_info(self, extra: Mapping[str, str] | None = None) -> None:
        from carddeck import __version__

        info = {"version": __version__, "python": platform.python_version()}
        for module in ("grpc", "onnxruntime", "numpy"):
            try:
                info[module] = str(__import__(module).__version__)
            except ImportError:
                info[module] = "none"
        info.update(extra or {})
        self.build.info(info)


@dataclass
class MetricsServer:
    """The running ``/metrics`` endpoint; ``port`` is the bound one (useful with port 0)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(metrics: Metrics, host: str = "0.0.0.0", port: int = 8002) -> MetricsServer:
    """Serve ``metrics.registry`` at ``http://host:port/metrics`` from a daemon thread (port 0: any free one)."""
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    return MetricsServer(server, thread)


__all__ = [
    "BATCH_BUCKETS",
    "DISTANCE_BUCKETS",
    "LATENCY_BUCKETS",
    "SHIFT_BUCKETS",
    "Metrics",
    "MetricsServer",
    "start_metrics_server",
]
