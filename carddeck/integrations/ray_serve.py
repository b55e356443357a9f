"""CARD-Deck on Ray Serve: a gated ingress and one autoscaled deployment per card, reconciled with a store.

Three kinds of deployment, all built from one :class:`RayDeckConfig`:

* ``CardDeckIngress`` (application ``carddeck``, the HTTP route prefix ``/``): the Open Inference
  Protocol REST routes of :mod:`carddeck.http` over a gate-only :class:`~carddeck.deck.Deck`
  snapshot (no ORT session). Each request is checked, signed and routed exactly as ``carddeck
  serve`` does it (the same Deck and Gate); each selected card gets only its rows; the results
  are combined with :func:`carddeck.deck.mix`, the code ``Deck.run_routed`` uses.
* ``CardReplica`` (one application per card, ``carddeck-card-<name>``, no HTTP route): one ORT
  session, ``@serve.batch`` merging concurrent requests, autoscaling on ongoing requests.
* ``DeckReconciler`` (one replica): polls the store; a new card (or version) gets its application,
  a removed card's application is deleted ``drain_s`` after the ingress stopped routing to it. When a
  deck's cards run and it stores no shift detector for them, it refits one (through the card
  deployments) and stores it in the deck; the ingress answers `unknown` until it loads it.

Each deployment's Prometheus series go out through Ray's metrics export under ``carddeck serve``'s names
(:mod:`~carddeck.integrations.ray_metrics`): the ingress's requests, images in flight, routing, shift, deck, card
changes and store; each card's batching (a batch there is one card's run, merged by ``@serve.batch``); the
reconciler's refits.

The ingress swaps in a new snapshot only once every card of it is deployed and running, and old
snapshots keep their handles until their requests finish, so no request fails during a change.
A card replica that dies under a request is retried once on another replica; a second failure is
:class:`CardUnavailable` (HTTP 503, gRPC UNAVAILABLE). Both are counted (:meth:`RayDataplane.counts`).

This module assembles the application; the parts live beside it: :mod:`~carddeck.integrations.ray_config`
(the shared config and names), :mod:`~carddeck.integrations.ray_cards` (card deployments and the reconciler),
:mod:`~carddeck.integrations.ray_metrics` (the metrics export),
:mod:`~carddeck.integrations.ray_plane` (the ingress's data plane over handles) and
:mod:`~carddeck.integrations.ray_ingress` (the ingress deployment, HTTP and gRPC).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from carddeck.errors import InvalidInput, NotReady
from carddeck.integrations.ray_cards import DeckReconciler
from carddeck.integrations.ray_config import APP, CARD_APP, CardUnavailable, RayDeckConfig, card_app_name
from carddeck.integrations.ray_ingress import GRPC_RPCS, GRPC_SERVICER, CardDeckIngress
from carddeck.integrations.ray_plane import RayDataplane

log = logging.getLogger(__name__)


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
    config = RayDeckConfig(**{"deck": str(default_deck_path()), **args})
    config.settings()  # limits that do not fit together are named here, not in every replica's constructor
    return application(config)


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


def undeploy(wait_s: float = 120.0) -> None:
    """Delete the carddeck application and every card application: all at once (each waits for its replicas'
    graceful shutdown), then wait until they are gone."""
    apps = [app for app in serve.status().applications if app == APP or app.startswith(CARD_APP)]
    for app in apps:
        serve.delete(app, _blocking=False)
    deadline = time.monotonic() + wait_s
    while any(app in serve.status().applications for app in apps):
        if time.monotonic() > deadline:
            raise NotReady(f"applications {', '.join(apps)} still there {wait_s:g} s after their deletion")
        time.sleep(0.2)


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
