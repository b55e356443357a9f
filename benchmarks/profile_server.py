"""Where a ``carddeck serve`` process spends its CPU under load: py-spy samples, grouped by stage.

    python benchmarks/profile_server.py [--deck models] [--load 1x32] [--kind carddeck|oip|http] [--seconds 8]
                                        [--model CARD] [--all-threads]

Starts the server like ``bench_server.py`` does, drives it from client processes at BATCHxCONCURRENCY,
samples the server with ``py-spy record --gil --format raw`` (the thread holding the GIL: the Python
work that serializes the server; ONNX Runtime runs with the GIL released and shows only with
``--all-threads``, where threads blocked in a wait are counted too), and prints each stage's share of
the samples, the leaf-most stage on each stack winning. Also prints the server CPU seconds per 1,000 images,
split by thread (from /proc, names from ``py-spy dump``): the card pool (ONNX Runtime, which runs its one
intra-op thread in the caller), the RPC workers, the batcher, gRPC's poller, and native threads.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from bench_server import Server, _traffic, measure_remote  # noqa: E402

from carddeck.deck import Deck  # noqa: E402

# (stage, substrings of "function (file)" frames), leaf-most match wins; order breaks ties within a frame
STAGES = (
    ("ORT session.run", ("onnxruntime/",)),
    ("signatures/FFT (gating/signature.py)", ("gating/signature.py",)),
    ("routing (policies, router)", ("gating/policies.py", "gating/router.py")),
    ("shift detector", ("shift.py",)),
    ("metrics (prometheus)", ("metrics.py", "prometheus_client/")),
    ("prepare/validate images", ("prepare_images",)),
    ("combine/mix/softmax", ("mix (", "softmax (", "combine (", "routed_rows")),
    ("batcher hand-off, futures, locks", ("batching.py", "concurrent/futures", "threading.py", "queue.py")),
    ("data plane bookkeeping", ("dataplane.py",)),
    ("protobuf/tensor codecs", ("convert.py", "google/protobuf", "serving/oip.py", "http/tensors.py")),
    ("interceptors/auth/logs", ("interceptors.py", "auth.py", "logs.py", "logging/")),
    ("gRPC runtime", ("grpc/",)),
    ("HTTP stack (uvicorn, starlette, anyio, asyncio)", ("uvicorn/", "starlette/", "anyio/", "asyncio/", "h11/")),
)


def stage_of(stack: list[str]) -> str:
    for frame in reversed(stack):  # leaf last in py-spy's raw format
        for stage, needles in STAGES:
            if any(n in frame for n in needles):
                return stage
    return "other"


def summarize(raw: Path) -> list[tuple[str, int]]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[stage_of(stack.split(";")[1:])] += int(n)  # the first frame names the thread
    return counts.most_common()


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid`` (user + system)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by native id (``py-spy dump``), pool numbers dropped; other threads are native."""
    text = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True).stdout
    found = re.findall(r"^Thread (\d+) \(\w+\): \"(.*)\"", text, re.M)
    return {int(tid): re.sub(r"_\d+$", "", name) for tid, name in found}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deck", type=Path, default=ROOT / "models")
    parser.add_argument("--load", default="1x32", help="BATCHxCONCURRENCY")
    parser.add_argument("--kind", choices=("carddeck", "oip", "http"), default="carddeck")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--model", default="carddeck", help="OIP model (oip, http kinds): the deck or one of its cards")
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--all-threads", action="store_true", help="every active thread, not only the GIL holder")
    parser.add_argument("--keep", type=Path, help="also write the raw stacks (and an SVG next to them) here")
    parser.add_argument("server_args", nargs="*", help="extra `carddeck serve` flags (after --)")
    args = parser.parse_args()
    batch, conc = (int(v) for v in args.load.split("x"))
    # the deck's own traffic, as bench_server sends: noise is far from every calibration batch, where the
    # guarded gate hedges over every card
    traffic = _traffic(Deck.open(args.deck, run_cards=False))[64]
    images = np.ascontiguousarray(np.resize(traffic, (batch, *traffic.shape[1:])))
    server = Server(args.deck, *args.server_args)
    pool = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
    try:
        list(pool.map(time.sleep, [0.1] * args.client_procs))
        measure_remote(pool, args.client_procs, args.kind, server, images, conc, 2.0, args.model)  # warm-up
        with tempfile.TemporaryDirectory() as tmp:
            raw = args.keep or Path(tmp) / "stacks.txt"
            cmd = ["py-spy", "record", "--pid", str(server.proc.pid), "--format", "raw", "-o", str(raw),
                   "--rate", "200", "--duration", str(int(args.seconds) + 2), "--nonblocking"]  # fmt: skip
            spy = subprocess.Popen([*cmd, *([] if args.all_threads else ["--gil"])], stdout=subprocess.DEVNULL)
            before = thread_cpu(server.proc.pid)
            r = measure_remote(pool, args.client_procs, args.kind, server, images, conc, args.seconds, args.model)
            after = thread_cpu(server.proc.pid)
            names = thread_names(server.proc.pid)
            spy.wait(60)
            rows = summarize(raw)
    finally:
        pool.shutdown()
        server.stop()
    total = sum(n for _, n in rows) or 1
    print(f"{args.kind} batch {batch} concurrency {conc}: {r['images_per_s']:.1f} img/s, p50 {r['p50_ms']:.2f} ms, "
          f"server {r['cpu_s_per_1k']:.2f} CPU s / 1k images; {total} py-spy samples of Python threads")  # fmt: skip
    for stage, n in rows:
        print(f"  {stage:<50} {100 * n / total:5.1f}%")
    images = r["images_per_s"] * args.seconds
    by_thread: collections.Counter[str] = collections.Counter()
    for tid, cpu in after.items():
        by_thread[names.get(tid, "native (gRPC core, ORT pools)")] += cpu - before.get(tid, 0.0)
    print("server CPU s / 1k images by thread (py-spy's own sampling included):")
    for name, cpu in by_thread.most_common():
        if cpu > 0:
            print(f"  {name:<50} {1000 * cpu / images:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
