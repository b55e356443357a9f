"""One serving process: load the deck, serve gRPC and HTTP, and drain gracefully on SIGTERM.

Shutdown order (SIGTERM or Ctrl-C): health goes NOT_SERVING (Watch streams see it at once), the
server keeps serving for ``shutdown_delay_s`` (so load balancers stop sending), then refuses new
work with UNAVAILABLE and waits up to ``drain_timeout_s`` for in-flight requests, then exits 0.
Requests still running then are cancelled and the process exits at once (within about a second):
ONNX Runtime cannot interrupt a card run, so nothing waits for one.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from carddeck.deck import DeckStore
from carddeck.deck.runtime import cpu_cores, one_blas_thread
from carddeck.errors import InvalidInput
from carddeck.observability.metrics import Metrics, start_metrics_server
from carddeck.observability.shift import ShiftLoader, ShiftMonitor
from carddeck.server.interceptors import ObservabilityInterceptor
from carddeck.serving.access import Tokens
from carddeck.serving.adaptation import Trigger
from carddeck.serving.settings import Settings

log = logging.getLogger("carddeck.server")
READ_ONLY_NOTE = "read-only: admin calls are refused; `carddeck deck init DIR` makes a copy you can change"


def _observability(settings: Settings) -> tuple[Metrics, Sequence[grpc.ServerInterceptor], Any]:
    """Metrics in a registry of their own, their interceptor, and the /metrics endpoint (off when port < 0)."""
    metrics = Metrics(CollectorRegistry())
    endpoint = None
    if settings.metrics_port >= 0:
        try:
            endpoint = start_metrics_server(metrics, settings.metrics_address, settings.metrics_port)
        except OSError as exc:
            raise InvalidInput(
                f"cannot listen for metrics on {settings.metrics_address}:{settings.metrics_port} ({exc.strerror}): "
                "stop the other server or choose another port with --metrics-port (0: any free port, -1: no "
                "metrics endpoint) [env CARDDECK_METRICS_PORT]"
            ) from None
        log.info("metrics on http://%s:%d/metrics", settings.metrics_address, endpoint.port)
    return metrics, (ObservabilityInterceptor(metrics),), endpoint


def check_hosts(settings: Settings) -> None:
    from carddeck.server.app import host_problem

    hosts = {settings.host: "--host"}
    if settings.metrics_port >= 0:
        hosts.setdefault(settings.metrics_address, "--metrics-host")
    for host, flag in hosts.items():
        problem = host_problem(host)
        if problem:
            raise InvalidInput(
                f"cannot listen on {host} ({problem}): {flag} takes an address of this machine "
                "(127.0.0.1; 0.0.0.0 for every interface)"
            )


def taken_ports(settings: Settings) -> list[str]:
    """Every configured port another process holds, with its flag: all at once, not one per attempt."""
    from carddeck.server.app import port_free

    ports = [
        ("gRPC", settings.host, settings.port, "--port"),
        ("HTTP", settings.host, settings.http_port, "--http-port"),
        ("metrics", settings.metrics_address, settings.metrics_port, "--metrics-port"),
    ]
    return [
        f"port {port} ({what}, {flag})" for what, host, port, flag in ports if port > 0 and not port_free(host, port)
    ]


def serve(settings: Settings, *, stop: threading.Event | None = None) -> int:
    from carddeck.http import start_http_server
    from carddeck.observability.logs import configure_logging
    from carddeck.server.app import build_server
    from carddeck.server.health import Health
    from carddeck.serving.dataplane import Dataplane, DataplaneConfig

    configure_logging(json_logs=settings.log_format == "json", level=logging.getLogger().level or logging.INFO)
    stop = stop or threading.Event()
    log.info("settings: %s", settings.public_dict())
    log.info("%s", one_blas_thread())
    check_hosts(settings)
    taken = taken_ports(settings)
    if taken:
        raise InvalidInput(
            f"cannot listen on {settings.host}: {'; '.join(taken)} in use; stop the other server or choose other "
            "ports (0: any free port)"
        )
    Tokens.from_settings(settings).announce()
    metrics, interceptors, endpoint = _observability(settings)
    dataplane = Dataplane(
        DataplaneConfig(
            deck_path=settings.deck_path,
            batching=settings.batching,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            preferred_batch_sizes=settings.preferred_batch_size_list(),
            batch_workers=settings.batch_workers or cpu_cores(),
            poll_interval_s=settings.poll_interval_s,
            providers=settings.provider_list(),
            intra_op_threads=settings.intra_op_threads or None,
            ort_spinning=settings.ort_spinning,
            calibration_data=settings.calibration_data,
            deck_model_name=settings.deck_model_name,
            debris_grace_s=settings.debris_grace_s,
            max_inflight_images=settings.max_inflight_images,
            store_timeout_s=settings.store_timeout_s,
        ),
        metrics=metrics,
    )
    metrics.track_images_in_flight(lambda: dataplane.budget.used)
    shift = ShiftMonitor(metrics, window=settings.shift_window, stride=settings.shift_stride)
    # a refit is stored in the deck: replicas sharing it and a restarted server load it rather than refit
    dataplane.on_swap.append(ShiftLoader(shift, on_refit=metrics.observe_refit, store_refit=True))
    dataplane.judge = shift.judge  # every answer carries its verdict (and the metrics count it)
    if settings.adapt_min_batch:
        dataplane.adaptation = Trigger(min_batch=settings.adapt_min_batch)
    health = Health()
    dataplane.on_swap.append(lambda deck: health.set_serving(dataplane.ready))
    dataplane.on_store.append(lambda state: health.set_store(state.in_sync))
    server = http = None
    drained = True  # an error before the drain leaves nothing running worth waiting for
    try:
        deck = dataplane.start()
        if settings.deck_model_name in deck.card_names:  # stored before the name was reserved
            log.warning(
                "card %r has the deck's own OIP model name and is shadowed by it; remove it and add it under "
                "another name (or serve with another --deck-model-name)",
                settings.deck_model_name,
            )
        server, port = build_server(settings, dataplane, health, interceptors=interceptors)
        server.start()
        if settings.http_port >= 0:
            http = start_http_server(settings, dataplane, metrics=metrics)
            log.info("HTTP (Open Inference Protocol, /v2) on %s:%d", settings.host, http.port)
        health.set_serving(dataplane.ready)
        health.set_store(dataplane.store_state.in_sync)
        log.info(
            "serving deck %s (version %d, %d cards, %s%s) on %s:%d",
            deck.root,
            deck.version,
            len(deck.cards),
            READ_ONLY_NOTE if DeckStore(deck.root).read_only else "writable",
            "" if deck.cards else "; NOT ready until a card is added",
            settings.host,
            port,
        )
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: stop.set())
        while not stop.wait(0.5):
            pass
        log.info("shutting down: health NOT_SERVING, draining up to %.1f s", settings.drain_timeout_s)
        dataplane.begin_shutdown()
        health.enter_shutdown()
        if settings.shutdown_delay_s:
            time.sleep(settings.shutdown_delay_s)
        drained = dataplane.drain(settings.drain_timeout_s)
        if drained:
            log.info("drained: every in-flight request finished")
        else:
            log.warning("drain timeout: %d requests still in flight are cancelled", dataplane.inflight)
        return 0
    finally:
        if http is not None:
            http.stop(timeout=10.0 if drained else 1.0)  # a drain timeout bounds the exit
        if server is not None:  # after a drain timeout: cancel what is left at once, wait for no card run
            server.stop(grace=1.0 if drained else None).wait(1.0)
        dataplane.close(wait=drained)
        health.close()
        if endpoint is not None:
            endpoint.stop()


__all__ = ["READ_ONLY_NOTE", "serve"]
