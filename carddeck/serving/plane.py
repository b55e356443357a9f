"""What the transports need from a data plane: the one surface the gRPC servicers and the HTTP routes call.

Two data planes provide it: :class:`carddeck.serving.dataplane.Dataplane` (``carddeck serve``: ORT sessions
in this process) and :class:`carddeck.integrations.ray_plane.RayDataplane` (Ray Serve's ingress: card
deployments behind handles). mypy checks both against it structurally, so a member the transports start
calling must be implemented by both before either type-checks.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from carddeck.card import CardMeta
from carddeck.deck import Deck, Prediction
from carddeck.serving.batching import BatchPolicy
from carddeck.serving.models import Model
from carddeck.serving.snapshot import StoreState
from carddeck.serving.stats import ModelStats


class Plane(Protocol):
    """A deck served to the transports: the current snapshot, inference on it, card changes, health, statistics."""

    @property
    def deck(self) -> Deck:
        """The current snapshot (NotReady before the first one)."""
        ...

    @property
    def ready(self) -> bool:
        """Serving a deck with cards (and not shutting down)."""
        ...

    @property
    def store_state(self) -> StoreState:
        """Where this replica stands with its deck store, as of its last poll."""
        ...

    def request(self) -> AbstractContextManager[None]:
        """Wraps every call that does work (drain accounting, where the plane drains itself)."""
        ...

    def resolve(self, name: str | None = None, version: str = "") -> Model:
        """The model ``name`` (None: the gated deck) on the current snapshot, which the request then keeps."""
        ...

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
        """The gated deck's prediction on ``model``'s snapshot, and that snapshot."""
        ...

    def run_card(
        self,
        model: Model,
        images: np.ndarray,
        *,
        timeout_s: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """One card's probabilities, no gate (a card served as a model of its own)."""
        ...

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
        """Start a request without waiting (the streaming RPCs): a future of what ``predict`` (the gated
        deck) or ``run_card`` (a card) return; invalid input may raise here or come in the future."""
        ...

    def announce(self) -> None:
        """A stream's next request is on its way: batches may wait for it (up to their queue delay)."""
        ...

    def withdraw(self) -> None:
        """An announced request will not come."""
        ...

    def batch_policy(self, model: Model) -> BatchPolicy:
        """How ``model``'s requests form batches (its OIP model configuration's dynamic_batching)."""
        ...

    def add_card(self, model: bytes | Path) -> tuple[CardMeta, bool]:
        """Add a card to the store; its CardMeta and whether it is new (False: the same bytes were there)."""
        ...

    def remove_card(self, name: str, version: int | None = None) -> tuple[list[str], str]:
        """Remove a card (one version, or all); the removed keys and a note when the default policy changed."""
        ...

    def stats(self, model: str) -> ModelStats:
        """Triton's per-model counters of the requests this replica answered."""
        ...


__all__ = ["Plane"]
