"""grpc.health.v1 (Check and Watch) for Kubernetes probes and load balancers.

The overall status ("") and each API's status follow the data plane: SERVING once a deck with
cards is loaded, NOT_SERVING while it has none, and NOT_SERVING for good once shutdown begins
(Watch streams see the change at once).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2

from carddeck.server.handlers import add_servicer

SERVICES = ("", "carddeck.v1.CardDeck", "inference.GRPCInferenceService")
# Not in SERVICES: SERVING while the replica is in sync with its deck store, NOT_SERVING while it serves a
# snapshot it cannot refresh (store unreachable, or its new deck cannot be loaded). The replica stays ready.
STORE_SERVICE = "carddeck.store"


class Health:
    def __init__(self) -> None:
        # Non-blocking Watch: a watcher does not hold one of the server's worker threads.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="carddeck-health")
        self.servicer = health.HealthServicer(experimental_non_blocking=True, experimental_thread_pool=self._pool)
        self.set_serving(False)

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in SERVICES:
            self.servicer.set(name, status)

    def set_store(self, in_sync: bool) -> None:
        ok, stale = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        self.servicer.set(STORE_SERVICE, ok if in_sync else stale)

    def enter_shutdown(self) -> None:
        """NOT_SERVING everywhere, permanently: readiness goes false before the drain starts."""
        self.servicer.enter_graceful_shutdown()

    def add_to(self, server: grpc.Server) -> None:
        add_servicer(server, self.servicer, health_pb2.DESCRIPTOR.services_by_name["Health"])

    def close(self) -> None:
        self._pool.shutdown(wait=False)


__all__ = ["SERVICES", "STORE_SERVICE", "Health"]
