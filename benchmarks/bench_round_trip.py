"""Where one request's time goes between a client and ``carddeck serve``: what the server adds to in-process.

    python benchmarks/bench_round_trip.py [--card resnet20-augmix-lrr] [--batch 64] [--requests 200]

One client thread (``tritonclient.grpc``, uint8 images, as ``bench_peers.py``'s load) sends one request at a
time to ``carddeck serve`` on a one-card deck, alternating each request with the same card in this process
(``Deck.run_card``: decode, ONNX Runtime, softmax) and with the gRPC floor (``bench_peers.py``'s: grpcio's
threaded server answering zeros of the right shape, no model), so all three see the same machine load.
The server runs with a hook that stamps when ``ModelInfer`` starts and returns (``time.perf_counter``,
the system-wide monotonic clock, so the client's stamps compare with the server's). Per request:
  * ``to handler``: client call -> ModelInfer starts (the client's encoding, gRPC, the server's grpcio
    hand-offs, our interceptors, parsing);
  * ``handler``: ModelInfer (decode, data plane, the card, the response message);
  * ``from handler``: ModelInfer returns -> the client has its answer (serialization, gRPC, the client's
    decoding);
medians over ``--requests`` requests, and the client's and the server's CPU per request. The handler
against in-process is the server's own cost around the same card; the floor's round trip is what any
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_peers import Peer, free_port, tree_cpu_seconds  # noqa: E402


def serve_stamped(stamps: str, argv: list[str]) -> int:
    """``carddeck serve`` with OipServicer.ModelInfer's start and end written to ``stamps``, one line each call."""
    from carddeck.commands.cli import main
    from carddeck.server import oip_servicer

    infer = oip_servicer.OipServicer.ModelInfer
    out = open(stamps, "w", buffering=1)  # noqa: SIM115 - lives with the process

    @functools.wraps(infer)  # keeps the @rpc declarations (access level, work)
    def stamped(self, request, context):
        t0 = time.perf_counter()
        response = infer(self, request, context)
        out.write(f"{t0} {time.perf_counter()}\n")
        return response

    oip_servicer.OipServicer.ModelInfer = stamped  # type: ignore[method-assign]
    sys.argv = ["carddeck", *argv]
    return main()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--card", default="resnet20-augmix-lrr")
    parser.add_argument("--deck", type=Path, default=ROOT / "models")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--stamps", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.stamps:  # the server process
        return serve_stamped(args.stamps, rest)

    import tritonclient.grpc as tc

    from carddeck.deck import Deck, DeckStore

    source = DeckStore(args.deck)
    tmp = Path(tempfile.mkdtemp(prefix="bench-round-trip-"))
    DeckStore.create(tmp / "deck").add_card(source.read_model(source.manifest().find(args.card)))
    deck = Deck.open(tmp / "deck")
    spec, classes = deck.input, len(deck.class_names)
    stamps = tmp / "stamps.txt"
    port, floor_port = free_port(1), free_port(1)
    serve = ["serve", "--deck", str(tmp / "deck"), "--port", str(port), "--http-port", "-1", "--metrics-port", "-1"]
    server = Peer(
        "CARD-Deck",
        [sys.executable, __file__, "--stamps", str(stamps), *serve, "--poll-interval-s", "0"],
        port,
        args.card,
        cwd=ROOT,
    )
    floor_cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_peers.py"), "--as", "floor"]
    floor_cmd += ["--port", str(floor_port), "--classes", str(classes)]
    floor = Peer("gRPC floor", floor_cmd, floor_port, args.card)
    try:
        for peer in (server, floor):
            if not peer.wait_ready():
                print(f"{peer.label}: {peer.error}")
                return 1
        shape = (args.batch, spec.height, spec.width, spec.channels)
        images = (np.random.default_rng(0).random(shape) * 255).astype(np.uint8)
        inp = tc.InferInput("images", list(shape), "UINT8")
        inp.set_data_from_numpy(images)
        client, floor_client = tc.InferenceServerClient(server.address), tc.InferenceServerClient(floor.address)
        for _ in range(20):  # warm up all three
            client.infer(args.card, [inp])
            floor_client.infer(args.card, [inp])
            deck.run_card(args.card, images)
        time.sleep(0.3)
        skip = len(stamps.read_text().splitlines())
        local, floor_s, calls = [], [], []
        client_cpu = server_cpu = 0.0
        for _ in range(args.requests):
            t0 = time.perf_counter()
            deck.run_card(args.card, images)
            local.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            floor_client.infer(args.card, [inp])
            floor_s.append(time.perf_counter() - t0)
            s0, c0, t0 = tree_cpu_seconds(server.proc.pid), time.thread_time(), time.perf_counter()
            client.infer(args.card, [inp])
            t1 = time.perf_counter()
            client_cpu += time.thread_time() - c0
            server_cpu += tree_cpu_seconds(server.proc.pid) - s0
            calls.append((t0, t1))
        time.sleep(0.3)
        served = [tuple(map(float, line.split())) for line in stamps.read_text().splitlines()[skip:]]
        if len(served) != len(calls):
            print(f"expected {len(calls)} stamped calls, the server wrote {len(served)}")
            return 1
    finally:
        server.stop()
        floor.stop()

    def ms(values: list[float]) -> float:
        return 1e3 * statistics.median(values)

    total = [b - a for a, b in calls]
    to_handler = [s[0] - a for (a, _), s in zip(calls, served)]
    handler = [s[1] - s[0] for s in served]
    from_handler = [b - s[1] for (_, b), s in zip(calls, served)]
    n = args.requests
    print(f"card {args.card}, batch {args.batch}, {n} requests, one at a time; medians (ms):")
    print(f"  in-process Deck.run_card         {ms(local):8.3f}")
    print(f"  gRPC floor round trip            {ms(floor_s):8.3f}")
    print(f"  carddeck serve round trip        {ms(total):8.3f}")
    print(f"    client -> handler              {ms(to_handler):8.3f}")
    print(f"    handler (ModelInfer)           {ms(handler):8.3f}   ({ms(handler) - ms(local):+.3f} on in-process)")
    print(f"    handler -> client              {ms(from_handler):8.3f}")
    print(f"  CPU per request: client thread {1e3 * client_cpu / n:.3f}, server process {1e3 * server_cpu / n:.3f}")
    cap = ms(local) / (ms(local) + ms(floor_s))
    print(f"  in-process / round trip {ms(local) / ms(total):.3f} (the closed-loop throughput ratio at concurrency 1); "
          f"the floor's cap, in-process / (in-process + floor) {cap:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
