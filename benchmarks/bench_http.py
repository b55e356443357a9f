"""The Open Inference Protocol over HTTP against the same protocol over gRPC, one server, one run.

    python benchmarks/bench_http.py [--deck PATH] [--seconds 3]

One ``carddeck serve`` subprocess (loopback) serves both ports; Triton's own clients drive it
(``tritonclient.grpc``; ``tritonclient.http`` with binary tensors and with JSON tensors). For batch
1 and batch 64 UINT8 images, at concurrency 1 and 8 (one client per thread), it prints images/s
and p50/p99 request latency, and each HTTP variant's throughput as a ratio of gRPC's (the
baseline, measured in the same run against the same server). The deck defaults to the packaged
default deck (six ResNet CARDs).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from carddeck.deck import default_deck_path  # noqa: E402


def start(deck: Path, log: Path) -> tuple[subprocess.Popen, int, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDDECK_")}
    cmd = [sys.executable, "-m", "carddeck", "serve", "--deck", str(deck), "--port", "0", "--http-port", "0"]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, "--metrics-port", "-1", "--poll-interval-s", "0"], cwd=ROOT,
                                env={**env, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        http = re.search(r"HTTP \(Open Inference Protocol, /v2\) on \S+:(\d+)", text)
        grpc = re.search(r"serving deck .* on \S+:(\d+)", text)
        if http and grpc:
            return proc, int(grpc.group(1)), int(http.group(1))
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{text[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start in 120 s")


def caller(kind: str, grpc_port: int, http_port: int, images: np.ndarray) -> Callable[[], None]:
    """One client (for one thread) that sends ``images`` to the deck model once per call."""
    if kind == "grpc":
        import tritonclient.grpc as tc

        client = tc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        outputs = [tc.InferRequestedOutput("probabilities"), tc.InferRequestedOutput("labels")]
    else:
        import tritonclient.http as tc  # type: ignore[no-redef]

        client = tc.InferenceServerClient(f"127.0.0.1:{http_port}")
        binary = kind == "http binary"
        outputs = [tc.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "labels")]
    tensor = tc.InferInput("images", list(images.shape), "UINT8")
    if kind == "http json":
        tensor.set_data_from_numpy(images, binary_data=False)
    else:
        tensor.set_data_from_numpy(images)

    def call() -> None:
        result = client.infer("carddeck", [tensor], outputs=outputs)
        assert result.as_numpy("labels").shape == (len(images),)

    return call


def measure(factories: list[Callable[[], Callable[[], None]]], seconds: float, batch: int) -> tuple[float, ...]:
    """images/s, p50 and p99 latency (ms), one thread per client for ``seconds``.

    Each thread builds its own client (tritonclient.http's gevent client stays on its thread) and
    warms it up before the clock starts.
    """
    latencies: list[float] = []
    lock = threading.Lock()
    ready = threading.Barrier(len(factories) + 1)
    clock: dict[str, float] = {}

    def loop(factory: Callable[[], Callable[[], None]]) -> None:
        call = factory()
        call()  # connection, first run
        ready.wait()
        mine = []
        while time.monotonic() < clock["stop"]:
            t0 = time.perf_counter()
            call()
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=loop, args=(f,)) for f in factories]
    for t in threads:
        t.start()
    clock["stop"] = time.monotonic() + 3600  # set for real once every thread is warm
    ready.wait()
    t0 = time.monotonic()
    clock["stop"] = t0 + seconds
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    ms = np.asarray(latencies) * 1e3
    return len(latencies) * batch / elapsed, float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deck", type=Path, default=default_deck_path())
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        proc, grpc_port, http_port = start(args.deck, Path(tmp) / "serve.log")
        try:
            print(f"deck {args.deck}; {args.seconds:g} s per row; ratio = images/s over gRPC's in the same row")
            print(
                f"{'batch':>5} {'conc':>4}  {'transport':<12} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'ratio':>6}"
            )
            for batch, concurrency in ((1, 1), (1, 8), (64, 1), (64, 8)):
                images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
                base = None
                for kind in ("grpc", "http binary", "http json"):
                    factory = functools.partial(caller, kind, grpc_port, http_port, images)
                    rate, p50, p99 = measure([factory] * concurrency, args.seconds, batch)
                    base = base or rate
                    row = f"{batch:>5} {concurrency:>4}  {kind:<12} {rate:>9.0f} {p50:>8.2f} {p99:>8.2f}"
                    print(f"{row} {rate / base:>6.2f}")
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
