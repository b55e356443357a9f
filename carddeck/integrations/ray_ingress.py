"""The ingress deployment: the OIP REST routes of :mod:`carddeck.http` and the carddeck.v1 gRPC servicer (through
Ray Serve's gRPC proxy), both over a :class:`~carddeck.integrations.ray_plane.RayDataplane`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from carddeck.integrations.ray_config import RayDeckConfig, replica_logging
from carddeck.integrations.ray_metrics import RayMetricsExport
from carddeck.integrations.ray_plane import RayDataplane


class _Aborted(Exception):
    pass


class _GrpcContext:
    """The ``grpc.ServicerContext`` surface our servicers use, over Ray Serve's gRPC context."""

    def __init__(self, ray_context: Any) -> None:
        self.ray_context = ray_context
        self.code: Any = None  # the status code an abort set

    def time_remaining(self) -> float | None:
        return None  # Ray's proxy does not pass the client's deadline on

    def is_active(self) -> bool:
        return True

    def set_trailing_metadata(self, metadata: Any) -> None:
        # the error's class name rides here, so the Python client raises the same typed error through Ray
        self.ray_context.set_trailing_metadata(list(metadata))

    def abort(self, code: Any, details: str) -> None:
        self.code = code
        self.ray_context.set_code(code)
        self.ray_context.set_details(details)
        raise _Aborted


# carddeck.v1 RPCs served through Ray Serve's gRPC proxy: the unary ones (the proxy has no client streaming,
# so AddCard is not among them), each with the response type an aborted call answers with.
GRPC_RPCS = ("Predict", "Route", "ListCards", "GetCard", "RemoveCard")
SERVICE = "carddeck.v1.CardDeck"  # its full name: the auth rules' method paths and the metrics' service label
GRPC_SERVICER = "carddeck.integrations.ray_grpc.add_CardDeckServicer_to_server"


@serve.deployment
@serve.ingress()
class CardDeckIngress:
    """HTTP: the OIP REST routes of carddeck.http. gRPC (Ray's proxy, ``GRPC_SERVICER``): ``GRPC_RPCS``
    of carddeck.v1 through the server's own servicer. Handle methods: ``predict``, ``ready``, ``counts``."""

    def __init__(self, config: RayDeckConfig, reconciler: DeploymentHandle) -> None:
        import carddeck.integrations.ray_grpc  # noqa: F401 (the messages' pickled module name)
        from carddeck.app.transports import carddeck_rpcs

        replica_logging()
        self.config = config
        self.plane = RayDataplane(config, reconciler)
        self.replica = serve.get_replica_context().replica_tag  # the `replica` label of its exported series
        self.export = RayMetricsExport(self.plane.metrics.registry, only=self.plane.metric_families())
        # the gRPC server's RPCs (drain accounting and error mapping included) and its rule per method
        self.rpcs, self.auth = carddeck_rpcs(self.plane, config.settings())

    async def _grpc(self, rpc: str, request: Any, grpc_context: Any) -> Any:
        """One carddeck.v1 call through the server's servicer; a refused or failed call answers an empty
        response with its status code and message set on Ray's context (what the proxy sends back)."""
        from carddeck.wire.proto_gen.carddeck.v1 import carddeck_pb2 as pb

        empty = {"Predict": pb.PredictResponse, "Route": pb.RouteResponse, "ListCards": pb.ListCardsResponse,
                 "GetCard": pb.Card, "RemoveCard": pb.RemoveCardResponse}[rpc]  # fmt: skip
        context, metrics = _GrpcContext(grpc_context), self.plane.metrics
        metrics.rpc_started(SERVICE, rpc)  # counted and timed as carddeck serve's interceptor does
        start, code = time.perf_counter(), "OK"
        try:
            refusal = self.auth.check(f"/{SERVICE}/{rpc}", grpc_context.invocation_metadata())
            if refusal is not None:
                context.abort(*refusal)
            return await asyncio.to_thread(self.rpcs[rpc], request, context)
        except _Aborted:
            code = getattr(context.code, "name", str(context.code))
            return empty()
        except BaseException:
            code = "UNKNOWN"
            raise
        finally:
            metrics.rpc_finished(SERVICE, rpc, code, time.perf_counter() - start)

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

        return http_app(self.plane, self.config.settings(), self.plane.metrics)

    async def predict(self, images: np.ndarray, policy: str | None = None, per_sample: bool = False) -> dict[str, Any]:
        """The gated deck's answer (probabilities, labels, routing weights and card names, deck version), its
        verdict (:class:`~carddeck.gating.shift.Trust`) and the ingress replica that answered."""
        prediction, deck = await asyncio.to_thread(self.plane.predict, images, policy=policy, per_sample=per_sample)
        return {
            "probabilities": prediction.probabilities,
            "labels": prediction.labels,
            "weights": prediction.routing.weights,
            "card_names": prediction.routing.card_names,
            "policy": prediction.routing.policy,
            "version": deck.version,
            "verdict": prediction.verdict,
            "replica": self.replica,
        }

    async def ready(self) -> dict[str, Any]:
        """Whether a snapshot with cards is served, its version and cards, whether a shift detector judges its
        traffic, and which ingress replica says so."""
        snap = self.plane._snapshot
        return {
            "ready": self.plane.ready,
            "version": None if snap is None else snap.version,
            "cards": [] if snap is None else list(snap.card_names),
            "shift_detector": self.plane.shift.detector is not None,
            "replica": self.replica,
        }

    async def counts(self) -> dict[str, int]:
        return self.plane.counts()

    def __del__(self) -> None:
        self.plane.close()
        self.export.close()


__all__ = ["GRPC_RPCS", "GRPC_SERVICER", "CardDeckIngress"]
