"""What one unary gRPC call costs a Python server by itself: the floor under every small request.

    python benchmarks/bench_grpc_floor.py [--seconds 3] [--concurrency 32]

A do-nothing handler that takes the request's bytes and answers 10 floats, served (a) by grpcio's
threaded server (a thread pool, what ``carddeck serve`` runs) and (b) by ``grpc.aio`` (one event
loop), each in its own process on a loopback port, loaded by client processes sending one 32x32x3
image per call (the batch-1 Predict's size). Prints calls/s, the mean latency (at concurrency 1: the
round trip a batch-1 request pays before any work) and the server process's CPU microseconds per
call (from /proc), which is what an image pays before any decoding, gating or inference: compare
with in-process ONNX Runtime's CPU per image at batch 64 (bench_server.py).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import grpc

METHOD = "/floor.Floor/Echo"
REPLY = bytes(40)  # ten float32s: a batch-1 answer's probabilities


def _handler() -> grpc.GenericRpcHandler:
    def echo(request: bytes, context: object) -> bytes:
        return REPLY

    return grpc.method_handlers_generic_handler("floor.Floor", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})


def serve_threaded(port: multiprocessing.Value, workers: int) -> None:  # type: ignore[valid-type]
    server = grpc.server(ThreadPoolExecutor(workers))
    server.add_generic_rpc_handlers((_handler(),))
    port.value = server.add_insecure_port("127.0.0.1:0")
    server.start()
    server.wait_for_termination()


def serve_aio(port: multiprocessing.Value, workers: int) -> None:  # type: ignore[valid-type]
    async def echo(request: bytes, context: object) -> bytes:
        return REPLY

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(echo)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Floor", {"Echo": handler}),))
        port.value = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def client_load(port: int, threads: int, start_at: float, stop_at: float) -> int:
    payload = os.urandom(32 * 32 * 3)
    calls = [0] * threads

    def worker(i: int) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        echo = channel.unary_unary(METHOD)
        echo(payload)
        time.sleep(max(0.0, start_at - time.time()))
        while time.time() < stop_at:
            echo(payload)
            calls[i] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return sum(calls)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved measurements (median kept)")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    servers = {}
    for name, target in (("threaded (thread pool)", serve_threaded), ("grpc.aio (event loop)", serve_aio)):
        port = ctx.Value("i", 0)
        proc = ctx.Process(target=target, args=(port, 32), daemon=True)
        proc.start()
        while port.value == 0:
            time.sleep(0.05)
        servers[name] = (proc, port.value)
    pool = ProcessPoolExecutor(args.client_procs, mp_context=ctx)
    n = min(args.client_procs, args.concurrency)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
    try:
        for _ in range(args.repeats):
            for name, (proc, port) in servers.items():
                start_at = time.time() + 1.5
                stop_at = start_at + args.seconds
                threads = [args.concurrency // n + (i < args.concurrency % n) for i in range(n)]
                futures = [pool.submit(client_load, port, t, start_at, stop_at) for t in threads]
                time.sleep(max(0.0, start_at - time.time()))
                cpu0 = cpu_seconds(proc.pid)
                calls = sum(f.result() for f in futures)
                cpu = cpu_seconds(proc.pid) - cpu0
                results[name].append((calls / args.seconds, 1e6 * cpu / max(calls, 1)))
    finally:
        pool.shutdown()
        for proc, _ in servers.values():
            proc.kill()
    print(f"do-nothing unary call, 3 KiB request, concurrency {args.concurrency}, {os.cpu_count()} cores, "
          f"grpc {grpc.__version__}; median of {args.repeats}:")  # fmt: skip
    for name, rows in results.items():
        rate = statistics.median(r for r, _ in rows)
        cpu = statistics.median(c for _, c in rows)
        latency = 1e3 * args.concurrency / rate  # each client thread waits for its call
        print(f"  {name:<24} {rate:8.0f} calls/s   mean latency {latency:6.2f} ms   server {cpu:6.0f} CPU us per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
