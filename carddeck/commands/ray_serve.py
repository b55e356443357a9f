"""``carddeck ray-serve``: run a deck on Ray Serve (a local Ray cluster, or one given by --address)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from carddeck.errors import InvalidInput

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--deck", default="", help="deck store: a directory or s3://BUCKET/PREFIX (default: the packaged deck)"
    )
    parser.add_argument("--address", default="", help="Ray cluster address (default: start a local cluster)")
    parser.add_argument(
        "--num-cpus", type=float, default=None, help="logical CPUs of the local cluster (default: the cores)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="Serve's HTTP proxy address (0.0.0.0 for every interface)")
    parser.add_argument("--http-port", type=int, default=8000, help="Serve's HTTP proxy port: the OIP REST routes")
    parser.add_argument("--ingress-replicas", type=int, default=1,
                        help="replicas of the gated ingress; they share the deck (each polls the store). Each "
                             "judges the shift of requests under 16 images over a window of its own: with N "
                             "replicas a window fills, and is retested, after about N times more images")  # fmt: skip
    parser.add_argument("--card-num-cpus", type=float, default=0.1, help="CPUs each card replica asks Ray for")
    parser.add_argument("--min-replicas", type=int, default=1, help="fewest replicas of a card")
    parser.add_argument("--max-replicas", type=int, default=2, help="most replicas of a card")
    parser.add_argument("--target-ongoing-requests", type=float, default=4.0,
                        help="autoscaling target: ongoing requests per card replica")  # fmt: skip
    parser.add_argument("--metrics-port", type=int, default=8002,
                        help="Prometheus metrics of a local cluster: Ray's metrics export, where the carddeck_* "
                             "series go out as ray_carddeck_* (serve/ray/prometheus.yml strips the prefix); 0: "
                             "any free port. With --address: the cluster's (ray start --metrics-export-port)",
                        )  # fmt: skip
    parser.add_argument("--poll-interval-s", type=float, default=1.0, help="how often to look for store changes")
    parser.add_argument("--drain-s", type=float, default=10.0,
                        help="a removed card's deployment outlives the ingress's last use of it this long")  # fmt: skip
    parser.add_argument("--max-request-images", type=int, default=None,
                        help="most images in one request (default: carddeck serve's, from its settings)")  # fmt: skip
    parser.add_argument("--max-inflight-images", type=int, default=None,
                        help="most images each ingress replica works on at once; past it RESOURCE_EXHAUSTED / "
                             "429 (default: carddeck serve's, from its settings)")  # fmt: skip
    parser.add_argument("--allow-unauthenticated-admin", action="store_true",
                        help="serve repository load/unload without a token (local experiments only); the token is "
                             "carddeck serve's: env CARDDECK_ADMIN_TOKEN or CARDDECK_ADMIN_TOKEN_FILE")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise InvalidInput("carddeck ray-serve needs Ray Serve: pip install 'carddeck[ray]'") from None
    from carddeck.deck import default_deck_path
    from carddeck.integrations.ray_serve import RayDeckConfig, deploy, undeploy
    from carddeck.serving.settings import load_settings

    config = RayDeckConfig(
        deck=args.deck or str(default_deck_path()),
        poll_interval_s=args.poll_interval_s,
        drain_s=args.drain_s,
        ingress_replicas=args.ingress_replicas,
        card_num_cpus=args.card_num_cpus,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        max_request_images=args.max_request_images,
        max_inflight_images=args.max_inflight_images,
        allow_unauthenticated_admin=args.allow_unauthenticated_admin,
        admin_token=load_settings({}).resolved_admin_token(),  # from the environment, never a flag (ps shows flags)
    )
    config.settings()  # limits that do not fit together are refused here, before a cluster starts
    local: dict[str, Any] = {} if args.address else {"_metrics_export_port": args.metrics_port or None}
    ray.init(address=args.address or None, num_cpus=args.num_cpus, include_dashboard=False, **local)
    here = ray.util.get_node_ip_address()
    for node in ray.nodes():
        if node["Alive"] and node["NodeManagerAddress"] == here:
            log.info("metrics (ray_carddeck_*) on http://%s:%d/metrics", here, node["MetricsExportPort"])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.http_port})
        deploy(config)
        log.info("Ray Serve: deck %s, OIP REST on http://%s:%d/v2", config.deck, args.host, args.http_port)
        stop.wait()
    finally:
        undeploy()
        if not args.address:  # a cluster we started: take Serve down with it
            serve.shutdown()
        ray.shutdown()
    return 0
