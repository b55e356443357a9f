"""What every CARD-Deck deployment on Ray Serve shares: one picklable config, the application names, and the
card deployments' batching (:mod:`carddeck.integrations.ray_serve` assembles them)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from carddeck.errors import NotReady

APP = "carddeck"
CARD_APP = "carddeck-card-"  # + card name: one application per card
MAX_BATCH_SIZE = 64  # requests merged by @serve.batch (the server's max_batch_size)
BATCH_WAIT_S = 0.002  # the server's max_wait_ms


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
    max_request_images: int | None = None  # most images in one request (None: carddeck serve's default)
    max_inflight_images: int | None = None  # most images each ingress replica works on at once (None: as above)
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

        limits = {"max_request_images": self.max_request_images, "max_inflight_images": self.max_inflight_images}
        given: dict[str, Any] = {k: v for k, v in limits.items() if v is not None}  # the others: Settings' own
        return Settings(
            deck=self.deck,
            deck_model_name=self.deck_model_name,
            admin_token=self.admin_token,
            allow_unauthenticated_admin=self.allow_unauthenticated_admin,
            http_port=-1,
            metrics_port=-1,
            **given,
        )


def card_app_name(card: str) -> str:
    return CARD_APP + card


def replica_logging() -> None:
    """CARD-Deck's log lines (``carddeck.*``, INFO and up) where Serve puts a replica's own: its log file under
    the session's logs/serve and its stderr (Serve configures only the ``ray.serve`` logger). Idempotent."""
    serve_logger = logging.getLogger("ray.serve")
    ours = logging.getLogger("carddeck")
    ours.setLevel(min(serve_logger.getEffectiveLevel(), logging.INFO))
    for handler in serve_logger.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = not ours.handlers  # not twice through the root logger


__all__ = [
    "APP",
    "BATCH_WAIT_S",
    "CARD_APP",
    "MAX_BATCH_SIZE",
    "CardUnavailable",
    "RayDeckConfig",
    "card_app_name",
    "replica_logging",
]
