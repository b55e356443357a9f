"""CARD-Deck on Ray Serve against ``carddeck serve``, the same deck, one run, one machine.

    python benchmarks/bench_ray.py [--deck PATH] [--seconds 5]

Both answer the Open Inference Protocol over HTTP; Triton's HTTP client (binary tensors) drives
each in turn at batch 1 / concurrency 32 and batch 64 / concurrency 4, UINT8 images. Printed:
images/s, p50/p99 request latency, and Ray's throughput as a ratio of ``carddeck serve``'s (the
baseline, measured in the same run). Ray runs as a local cluster (``ray.init``) with the
integration's defaults: one replica per card at start, autoscaling up to two.

On one machine this measures what Ray adds, not what it is for (spreading cards over machines):
every request crosses the Serve HTTP proxy actor, the ingress replica and one card replica per
selected card, each a separate process, with the images serialized through Ray's object store.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_http import caller, measure, start  # noqa: E402

from carddeck.deck import default_deck_path  # noqa: E402

ROWS = ((1, 32), (64, 4))  # (batch, concurrency)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_rows(http_port: int, seconds: float, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    out = []
    for batch, concurrency in ROWS:
        images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        factory = functools.partial(caller, "http binary", 0, http_port, images)
        measure([factory] * concurrency, 1.0, batch)  # warm-up: connections, autoscaling's first look
        out.append(measure([factory] * concurrency, seconds, batch))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deck", type=Path, default=default_deck_path())
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--num-cpus", type=float, default=4, help="logical CPUs of the local Ray cluster")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        proc, _, http_port = start(args.deck, Path(tmp) / "serve.log")
        try:
            results["carddeck serve"] = run_rows(http_port, args.seconds, np.random.default_rng(0))
        finally:
            proc.terminate()
            proc.wait(30)

    import ray
    from ray import serve

    from carddeck.integrations.ray_serve import RayDeckConfig, deploy, undeploy

    t0 = time.monotonic()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})  # fmt: skip
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(RayDeckConfig(deck=str(args.deck)))
        started = time.monotonic() - t0
        results["ray serve"] = run_rows(port, args.seconds, np.random.default_rng(0))
    finally:
        undeploy()
        serve.shutdown()
        ray.shutdown()

    print(f"deck {args.deck}; {args.seconds:g} s per row; Ray cluster + deck up in {started:.0f} s")
    print(f"{'batch':>5} {'conc':>4}  {'engine':<15} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6}")
    for i, (batch, concurrency) in enumerate(ROWS):
        base = results["carddeck serve"][i][0]
        for engine, rows in results.items():
            rate, p50, p99 = rows[i]
            print(f"{batch:>5} {concurrency:>4}  {engine:<15} {rate:>9.0f} {p50:>8.2f} {p99:>8.2f} {rate / base:>6.2f}")


if __name__ == "__main__":
    main()
