"""What one request costs in Python on its way through the server's layers: CPU microseconds per request.

    python benchmarks/bench_request_python.py [--deck models] [--model carddeck] [--images 1] [--requests 2000]
                                              [--rounds 5] [--before-tree DIR] [--with-ort]

``--images`` uint8 images per request (default 1), one thread, no transport and no micro-batching (a lone
request runs in its own thread): the Open Inference Protocol's ModelInfer called through the layers a gRPC
call goes through, each measured on its own, so the differences are each layer's share:
  * ``handler chain``: the bytes in, through the interceptors (metrics, request id, auth), the one
    wrapper (:func:`carddeck.server.handlers.served`: parse, drain accounting, error mapping), the servicer,
    and the response serialized;
  * ``servicer``: ``OipServicer.ModelInfer`` on a parsed message (decode, options, result, response);
  * ``dataplane``: ``Dataplane.run_card`` / ``predict`` on the decoded images (budget, dispatch, micro-batch
    run, statistics, verdict: the shift monitor judges every request, with the detector the deck stores, as
    ``carddeck serve`` does);
  * ``in-process``: ``Deck.run_card`` / ``predict``, the floor.
Without ``--with-ort`` the card answers constant logits (ONNX Runtime's time varies by more than the
Python measured here on a shared machine): what remains is the Python per request, which on 2 cores
every request pays out of the same CPU as inference. CPU time of this thread (``time.thread_time``),
median of ``--rounds``. ``--before-tree``: the same measured from another source tree (e.g. ``git
archive`` of an older commit) in a subprocess, rounds alternated: before/after ratios from one run.
``no interceptors``: the handler chain without the interceptors (request id, metrics, auth), so the
difference between the two is theirs. gRPC's own per-call cost is not here: ``bench_grpc_floor.py`` measures it.
``--threads N`` adds a row: the handler chain called by N threads at once, micro-batching on, the card's run
(without ``--with-ort``) a GIL-free sleep of ``--ort-ms`` per image standing in for ONNX Runtime so that
batches form as under load; CPU of the whole process per request. Its difference from ``handler chain`` is
what a request costs when its thread sleeps and wakes around the batch (hand-offs, cold caches), less the
micro-batch's work shared by the requests in it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("handler chain", "no interceptors", "servicer", "dataplane", "in-process")


class _Context:
    """What the handlers read from a grpc.ServicerContext, for a call that is live and has no deadline."""

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> None:
        return None

    def is_active(self) -> bool:
        return True

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def code(self) -> None:
        return None

    def add_callback(self, callback: Any) -> bool:
        return True

    def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def auth_context(self) -> dict[str, Any]:
        return {}


def measure(
    deck_path: str,
    model_name: str,
    requests: int,
    with_ort: bool,
    images: int = 1,
    threads: int = 0,
    ort_ms: float = 0.8,
) -> dict[str, float]:
    """One round in this process (the tree on sys.path): CPU us per request of each layer."""
    import numpy as np
    from prometheus_client import CollectorRegistry

    from carddeck.deck.runtime import CardSession
    from carddeck.observability.metrics import Metrics
    from carddeck.observability.shift import ShiftLoader, ShiftMonitor
    from carddeck.server.app import OIP_SERVICE, access_table
    from carddeck.server.auth import AuthInterceptor
    from carddeck.server.handlers import _handler
    from carddeck.server.interceptors import ObservabilityInterceptor
    from carddeck.server.oip_servicer import OipServicer
    from carddeck.serving.access import Tokens
    from carddeck.serving.dataplane import Dataplane, DataplaneConfig
    from carddeck.serving.settings import Settings
    from carddeck.wire.proto_gen.inference import grpc_service_pb2 as oip

    settings = Settings(deck=deck_path)
    metrics = Metrics(CollectorRegistry())
    # batching on only for the threaded row: a lone request runs in its caller's thread either way
    dp = Dataplane(DataplaneConfig(deck_path=deck_path, batching=threads > 0), metrics=metrics)
    shift = ShiftMonitor(metrics)  # every answer carries its verdict, as serve() assembles it
    dp.on_swap.append(ShiftLoader(shift, refit=False))
    dp.judge = shift.judge
    dp.start()
    if not with_ort:
        classes = len(dp.deck.class_names)
        CardSession._run = lambda self, x: np.zeros((len(x), classes), np.float32)  # type: ignore[method-assign]
    servicer = OipServicer(dp, settings)
    inner = _handler(servicer.ModelInfer, OIP_SERVICE.methods_by_name["ModelInfer"], dp.request)
    details = namedtuple("Details", "method invocation_metadata")("/inference.GRPCInferenceService/ModelInfer", ())
    chain = [ObservabilityInterceptor(metrics), AuthInterceptor(Tokens.from_settings(settings), access_table())]

    def handler() -> Any:  # what grpc's interceptor pipeline does for each call
        def at(i: int) -> Any:
            return inner if i == len(chain) else chain[i].intercept_service(lambda d: at(i + 1), details)

        return at(0)

    spec = dp.deck.input
    image = (np.random.default_rng(0).random((images, spec.height, spec.width, spec.channels)) * 255).astype(np.uint8)
    tensor = oip.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8", shape=image.shape)
    message = oip.ModelInferRequest(model_name=model_name, inputs=[tensor], raw_input_contents=[image.tobytes()])
    raw = message.SerializeToString()
    serialize = oip.ModelInferResponse.SerializeToString
    model = dp.resolve(model_name)
    card = model.card is not None
    calls = {
        "handler chain": lambda: serialize(handler().unary_unary(raw, _Context())),
        "no interceptors": lambda: serialize(inner.unary_unary(raw, _Context())),
        "servicer": lambda: servicer.ModelInfer(message, _Context()),  # type: ignore[arg-type]
        "dataplane": lambda: dp.run_card(model, image) if card else dp.predict(image, model=model),
        "in-process": lambda: dp.deck.run_card(model_name, image) if card else dp.deck.predict(image),
    }
    out = {}
    try:
        for layer in LAYERS:
            call = calls[layer]
            for _ in range(max(50, requests // 10)):  # warm-up
                call()
            t0 = time.thread_time()
            for _ in range(requests):
                call()
            out[layer] = (time.thread_time() - t0) / requests * 1e6
        if threads:
            if not with_ort:  # ORT releases the GIL while it runs: so does a sleep, and batches form

                def run(self: CardSession, x: np.ndarray) -> np.ndarray:
                    time.sleep(ort_ms * len(x) / 1e3)
                    return np.zeros((len(x), classes), np.float32)

                CardSession._run = run  # type: ignore[method-assign]
            out[f"{threads} threads"] = threaded(calls["handler chain"], threads, requests)
    finally:
        dp.close()
    return out


def threaded(call: Any, threads: int, requests: int) -> float:
    """CPU microseconds of this whole process per ``call``, ``threads`` threads calling at once."""
    each = max(1, requests // threads)

    def loop() -> None:
        for _ in range(each):
            call()

    pool = [threading.Thread(target=loop) for _ in range(threads)]
    t0 = time.process_time()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return (time.process_time() - t0) / (each * threads) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deck", default=str(ROOT / "models"))
    parser.add_argument("--model", default="carddeck", help="the deck model or one of its cards")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--with-ort", action="store_true", help="run the card too (noisier)")
    parser.add_argument("--before-tree", type=Path, help="also measure this source tree, rounds alternated")
    parser.add_argument("--threads", type=int, default=0, help="also the handler chain from this many threads")
    parser.add_argument("--ort-ms", type=float, default=0.8, help="the card's stand-in sleep per image (--threads)")
    parser.add_argument("--one-round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_round:
        print(json.dumps(measure(args.deck, args.model, args.requests, args.with_ort, args.images, args.threads,
                                 args.ort_ms)))  # fmt: skip
        return 0
    trees = {"after": ROOT, **({"before": args.before_tree.resolve()} if args.before_tree else {})}
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():  # each round in a fresh process of its tree
            cmd = [sys.executable, __file__, "--one-round", "--deck", args.deck, "--model", args.model,
                   "--requests", str(args.requests), "--images", str(args.images),
                   "--threads", str(args.threads), "--ort-ms", str(args.ort_ms),
                   *(["--with-ort"] if args.with_ort else [])]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(tree)}
            done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=True)
            rounds[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    ort = "with" if args.with_ort else "no"
    print(f"model {args.model} of {args.deck}, {args.images} images per request, {ort} ONNX Runtime; "
          f"CPU us per request, median of {args.rounds} rounds (range)")  # fmt: skip
    layers = list(rounds["after"][0])  # LAYERS, and the threaded row when asked for
    for layer in layers:
        cells = []
        for name in trees:
            values = sorted(r[layer] for r in rounds[name])
            cells.append(f"{name} {statistics.median(values):7.1f} ({values[0]:.0f}-{values[-1]:.0f})")
        print(f"  {layer:<16} " + "   ".join(cells))
    if "before" in trees:
        print("after / before, each round's ratio, median (range):")
        for layer in layers:
            each = sorted(a[layer] / b[layer] for a, b in zip(rounds["after"], rounds["before"]))
            print(f"  {layer:<16} {statistics.median(each):.2f} ({each[0]:.2f}-{each[-1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
