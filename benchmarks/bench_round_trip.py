"""Where one request's time goes between a client and ``carddeck serve``: what the server adds to in-process.

    python benchmarks/bench_round_trip.py [--card resnet20-augmix-lrr | --whole-deck] [--batch 64] [--requests 200]

One client thread sends one request at a time to ``carddeck serve``, over both APIs: the Open Inference
Protocol's ``ModelInfer`` (``tritonclient.grpc``, uint8 images, as ``bench_peers.py``'s load) and
carddeck.v1 ``Predict`` (``carddeck.client.CardDeckClient``, whose answer carries routing and verdict),
each request alternating with the same work in this process and with the gRPC floor (``bench_peers.py``'s:
grpcio's threaded server answering zeros of the right shape, no model), in an order rotated each round, so
all of them see the same machine load. The served deck is one card of ``--deck`` (ModelInfer on the card,
in-process ``Deck.run_card``; Predict on the one-card gated deck, in-process ``Deck.predict``), or with
``--whole-deck`` the deck itself (ModelInfer on the deck model, both APIs against in-process
``Deck.predict``). Images: the deck's own traffic (its dataset's test images, as ``bench_server.py``).

The server runs with a hook that stamps when each handler starts and returns (``time.perf_counter``,
the system-wide monotonic clock, so the client's stamps compare with the server's). Per request:
  * ``to handler``: client call -> the handler starts (the client's encoding, gRPC, the server's grpcio
    hand-offs, our interceptors, parsing);
  * ``handler``: ModelInfer or Predict (decode, data plane, the cards, the verdict, the response message);
  * ``from handler``: the handler returns -> the client has its answer (serialization, gRPC, the client's
    decoding);
medians over ``--requests`` requests, and the client's and the server's CPU per request. The handler
against in-process is the server's own cost around the same work; the floor's round trip is what any
Python gRPC server pays on top. At concurrency 1 throughput is batch / latency, so these medians say
what a closed loop of one client gets of in-process throughput.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_peers import Peer, free_port, tree_cpu_seconds  # noqa: E402

STAMPED = (("oip_servicer", "OipServicer", "ModelInfer"), ("carddeck_servicer", "CardDeckServicer", "Predict"))


def serve_stamped(stamps: str, argv: list[str]) -> int:
    """``carddeck serve`` with each stamped handler's name, start and end written to ``stamps``, one line a call."""
    import importlib

    from carddeck.commands.cli import main

    out = open(stamps, "w", buffering=1)  # noqa: SIM115 - lives with the process

    def stamp(name: str, handler: Callable) -> Callable:
        @functools.wraps(handler)  # keeps the @rpc declarations (access level, work)
        def stamped(self, request, context):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            response = handler(self, request, context)
            out.write(f"{name} {t0} {time.perf_counter()}\n")
            return response

        return stamped

    for module, cls, name in STAMPED:
        servicer = getattr(importlib.import_module(f"carddeck.server.{module}"), cls)
        setattr(servicer, name, stamp(name, getattr(servicer, name)))
    sys.argv = ["carddeck", *argv]
    return main()


def main() -> int:
    if sys.argv[1:2] == ["--stamps"]:  # the server process: the rest is `carddeck serve`'s, untouched (--deck too)
        return serve_stamped(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card", default="resnet20-augmix-lrr")
    parser.add_argument("--whole-deck", action="store_true", help="serve --deck itself, not one of its cards")
    parser.add_argument("--deck", type=Path, default=ROOT / "models")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()

    import tritonclient.grpc as tc
    from bench_server import _traffic

    from carddeck.client import CardDeckClient
    from carddeck.deck import Deck, DeckStore

    tmp = Path(tempfile.mkdtemp(prefix="bench-round-trip-"))
    if args.whole_deck:
        served, model = args.deck, "carddeck"
    else:
        source = DeckStore(args.deck)
        served, model = tmp / "deck", args.card
        DeckStore.create(served).add_card(source.read_model(source.manifest().find(args.card)))
    deck = Deck.open(served)
    traffic = _traffic(deck)[64]
    images = np.ascontiguousarray(np.resize(traffic, (args.batch, *traffic.shape[1:])))
    stamps = tmp / "stamps.txt"
    port, floor_port = free_port(1), free_port(1)
    serve = ["serve", "--deck", str(served), "--port", str(port), "--http-port", "-1", "--metrics-port", "-1"]
    server = Peer(
        "CARD-Deck", [sys.executable, __file__, "--stamps", str(stamps), *serve, "--poll-interval-s", "0"], port, model,
        cwd=ROOT,
    )  # fmt: skip
    floor_cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_peers.py"), "--as", "floor"]
    floor_cmd += ["--port", str(floor_port), "--classes", str(len(deck.class_names))]
    floor = Peer("gRPC floor", floor_cmd, floor_port, model)
    try:
        for peer in (server, floor):
            if not peer.wait_ready():
                print(f"{peer.label}: {peer.error}")
                return 1
        inp = tc.InferInput("images", list(images.shape), "UINT8")
        inp.set_data_from_numpy(images)
        oip, floor_client = tc.InferenceServerClient(server.address), tc.InferenceServerClient(floor.address)
        ours = CardDeckClient(server.address)
        calls: dict[str, Callable[[], object]] = {
            "in-process Deck.predict": lambda: deck.predict(images),
            "gRPC floor": lambda: floor_client.infer(model, [inp]),
            "ModelInfer": lambda: oip.infer(model, [inp]),
            "Predict": lambda: ours.predict(images),
        }
        if not args.whole_deck:
            calls["in-process Deck.run_card"] = lambda: deck.run_card(args.card, images)
        for _ in range(10):  # warm up all of them
            for call in calls.values():
                call()
        time.sleep(0.3)
        skip = len(stamps.read_text().splitlines())
        labels = list(calls)
        wall: dict[str, list[float]] = {label: [] for label in labels}
        spans: dict[str, list[tuple[float, float]]] = {"ModelInfer": [], "Predict": []}
        client_cpu = dict.fromkeys(spans, 0.0)
        server_cpu = dict.fromkeys(spans, 0.0)
        local_cpu = dict.fromkeys(labels, 0.0)  # this process, every thread (ONNX Runtime's pools too)
        for i in range(args.requests):
            for label in labels[i % len(labels) :] + labels[: i % len(labels)]:  # rotated: no fixed neighbours
                s0, c0, p0 = tree_cpu_seconds(server.proc.pid), time.thread_time(), time.process_time()
                t0 = time.perf_counter()
                calls[label]()
                t1 = time.perf_counter()
                wall[label].append(t1 - t0)
                local_cpu[label] += time.process_time() - p0
                if label in spans:
                    client_cpu[label] += time.thread_time() - c0
                    server_cpu[label] += tree_cpu_seconds(server.proc.pid) - s0
                    spans[label].append((t0, t1))
        time.sleep(0.3)
        stamped: dict[str, list[tuple[float, float]]] = {"ModelInfer": [], "Predict": []}
        for line in stamps.read_text().splitlines()[skip:]:
            name, start, end = line.split()
            stamped[name].append((float(start), float(end)))
        if any(len(stamped[k]) != len(spans[k]) for k in spans):
            print(f"expected {args.requests} stamped calls of each handler, the server wrote "
                  f"{ {k: len(v) for k, v in stamped.items()} }")  # fmt: skip
            return 1
    finally:
        server.stop()
        floor.stop()

    def ms(values: list[float]) -> float:
        return 1e3 * statistics.median(values)

    n = args.requests
    what = "deck" if args.whole_deck else f"card {args.card}"
    print(f"{what} ({len(deck.cards)} cards served), batch {args.batch}, {n} requests of each, one at a time; "
          "medians (ms):")  # fmt: skip
    for label in labels:
        if label.startswith("in-process"):
            print(f"  {label:<32} {ms(wall[label]):8.3f}   CPU per request {1e3 * local_cpu[label] / n:.3f}")
    print(f"  gRPC floor round trip            {ms(wall['gRPC floor']):8.3f}")
    floor_ms = ms(wall["gRPC floor"])
    for rpc in spans:
        local = "in-process Deck.predict" if rpc == "Predict" or args.whole_deck else "in-process Deck.run_card"
        calls_, served_ = spans[rpc], stamped[rpc]
        total = [b - a for a, b in calls_]
        handler = [e - s for s, e in served_]
        base = ms(wall[local])
        print(f"  {rpc} round trip{'':<{21 - len(rpc)}} {ms(total):8.3f}   (against {local})")
        print(f"    client -> handler              {ms([s - a for (a, _), (s, _) in zip(calls_, served_)]):8.3f}")
        print(f"    handler                        {ms(handler):8.3f}   ({ms(handler) - base:+.3f} on in-process)")
        print(f"    handler -> client              {ms([b - e for (_, b), (_, e) in zip(calls_, served_)]):8.3f}")
        print(f"    CPU per request: client thread {1e3 * client_cpu[rpc] / n:.3f}, "
              f"server process {1e3 * server_cpu[rpc] / n:.3f}")  # fmt: skip
        print(f"    in-process / round trip {base / ms(total):.3f} (the closed-loop throughput ratio at concurrency "
              f"1); the floor's cap, in-process / (in-process + floor) {base / (base + floor_ms):.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
