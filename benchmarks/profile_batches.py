"""Where the cores sit idle under small-request load: the batch worker's timeline and every thread's waits.

    python benchmarks/profile_batches.py [--deck DECK] [--model resnet20-augmix-lrr] [--load 1x32] [--seconds 5]
                                         [--kind oip|carddeck|http] [--perf] [--tree DIR]
                                         [-- extra `carddeck serve` flags]

Starts ``carddeck serve`` through this script, which first wraps the batch worker's steps (forming a batch, the
micro-batch run, each ONNX Runtime call, the chunk hand-off to the card pool, setting the answers) to log wall
and thread CPU times; the wrappers change no answer. Drives it from client processes like ``bench_server.py``
(the deck's own traffic) and prints, over the load window:

* the whole machine's busy share (/proc/stat) and, per thread group of the server, CPU ms per image, runqueue
  wait (ready but no core) and voluntary context switches per image (from /proc: a thread that waits for a lock,
  a condition or the GIL sleeps, and each wait for the GIL is one);
* the batch worker: batch sizes, the share of the window it spends forming batches, running them, and inside
  ONNX Runtime; per batch, its wall time outside ONNX Runtime against its CPU time there (the difference is
  waiting: for the GIL, for a lock, for a core); how long the card pool's helper takes to start and how long
  the worker then waits for it; how much of the window has 0, 1 or 2 ONNX Runtime runs going;
* with ``--perf`` (Linux ``perf``, tracepoints allowed): every voluntary context switch of the server for 2 s,
  classified from its native stack: waiting for the GIL (and after what: ONNX Runtime, a numpy call that
  released it, gRPC's core, a lock wait) or waiting on a lock or condition, gRPC's completion queue.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


# -- inside the server ------------------------------------------------------------------------------------------
def serve_traced(out: str, argv: list[str]) -> int:
    """Run the ``carddeck`` command with the batch worker's steps timed; SIGUSR1 writes the log to ``out``."""
    from carddeck.deck import deck as deck_module
    from carddeck.deck import runtime
    from carddeck.serving import batching, microbatch, verdicts

    log: dict[str, list] = collections.defaultdict(list)
    clock, cpu = time.perf_counter, time.thread_time

    def timed(owner: object, name: str, key: str, worker_only: bool = True) -> None:
        fn = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if worker_only and not threading.current_thread().name.startswith("carddeck-batch"):
                return fn(*args, **kwargs)
            t0, c0 = clock(), cpu()
            try:
                return fn(*args, **kwargs)
            finally:
                sized = len(args) > 1 and hasattr(args[1], "__len__")
                size = len(args[1]) if sized else 0  # the batch's requests, or an ORT run's rows
                log[key].append((t0, clock(), c0, cpu(), threading.get_native_id(), size))

        setattr(owner, name, wrapper)

    timed(batching.MicroBatcher, "_next_batch", "form")
    timed(batching.MicroBatcher, "_execute", "batch")
    if hasattr(batching.MicroBatcher, "_finish_batch"):  # pipelined (session 12): the cards run in the second stage
        timed(batching.MicroBatcher, "_finish_batch", "batch")
    timed(batching.MicroBatcher, "_run_entries", "run")
    timed(runtime.CardSession, "_run", "ort", worker_only=False)
    # the stages between card runs: the gate (features and routing), the verdict, the listeners
    timed(microbatch, "_route", "gate", worker_only=False)
    timed(verdicts.Verdicts, "of", "verdict", worker_only=False)
    timed(verdicts.Verdicts, "observe", "observe", worker_only=False)
    claimed = deck_module.run_claimed

    def run_claimed(jobs: Any, fn: Any, pool: Any, threads: int) -> Any:
        helper: list[float] = []  # when a thread other than the caller started a chunk
        caller = threading.get_native_id()

        def job(j: Any) -> Any:
            if threading.get_native_id() != caller:
                helper.append(clock())
            return fn(j)

        t0 = clock()
        out = claimed(jobs, job, pool, threads)
        log["claimed"].append((t0, clock(), len(jobs), min(threads, len(jobs)) - 1, min(helper, default=None)))
        return out

    deck_module.run_claimed = run_claimed

    def dump(*_: object) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        Path(out + ".tmp").write_text(json.dumps({**log, "names": names}))
        os.replace(out + ".tmp", out)

    signal.signal(signal.SIGUSR1, dump)
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # every thread's stack in the server's log (a hang)
    from carddeck.commands.cli import main

    sys.argv = ["carddeck", *argv]
    return main() or 0


# -- the load and the report ------------------------------------------------------------------------------------
def cpu_times() -> tuple[int, int]:
    """(all, idle) jiffies of the whole machine."""
    v = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(v), v[3] + v[4]


def threads(pid: int) -> dict[int, tuple[str, float, float, int]]:
    """Per thread: (comm, CPU s, runqueue wait s, voluntary switches)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            run_ns, wait_ns, _ = (task / "schedstat").read_text().split()
            status = (task / "status").read_text()
        except OSError:  # the thread ended
            continue
        switches = int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
        out[int(task.name)] = ((task / "comm").read_text().strip(), int(run_ns) / 1e9, int(wait_ns) / 1e9, switches)
    return out


def perf_record(pid: int, seconds: float, data: Path) -> None:
    """Record ``pid``'s context switches with their native stacks for ``seconds``."""
    record = ["perf", "record", "-q", "-e", "sched:sched_switch", "--call-graph", "dwarf,16384", "-p", str(pid)]
    subprocess.run([*record, "-o", str(data), "--", "sleep", str(seconds)], capture_output=True, check=True)


def perf_switches(data: Path) -> dict[int, dict[str, list[float]]]:
    """The recorded context switches by thread and by what the thread waits for: [count, seconds off its core
    until it ran again (the wait, then the wait for a core)]. A thread preempted while runnable waits for a core."""
    script = ["perf", "script", "-i", str(data), "-F", "tid,time,trace,ip,sym,dso"]
    text = subprocess.run(script, capture_output=True, text=True, check=True).stdout
    out: dict[int, dict[str, list[float]]] = collections.defaultdict(dict)
    away: dict[int, tuple[float, str]] = {}
    for sample in text.split("\n\n"):
        head, _, stack = sample.partition("\n")
        found = re.search(r"^\s*(\d+)\s+([\d.]+):.*prev_state=(\S+) ==> .*next_pid=(\d+)", head)
        if not found:
            continue
        tid, t, state, back = int(found[1]), float(found[2]), found[3], int(found[4])
        if back in away:
            since, kind = away.pop(back)
            out[back].setdefault(kind, [0, 0.0])[1] += t - since
        if state.startswith(("S", "R")):
            frames = [re.sub(r"\s+", " ", f).strip().split(" ", 1)[-1] for f in stack.splitlines()]
            kind = _wait_kind(frames) if state.startswith("S") else "preempted (then waiting for a core)"
            out[tid].setdefault(kind, [0, 0.0])[0] += 1
            away[tid] = (t, kind)
    return out


def _wait_kind(frames: list[str]) -> str:
    symbols = [f.split(" (")[0] for f in frames]
    if "take_gil" in symbols:
        for frame in frames[symbols.index("take_gil") + 1 :]:
            symbol, _, lib = frame.partition(" (")
            if symbol in ("PyEval_RestoreThread", "PyEval_AcquireThread", "PyGILState_Ensure"):
                continue
            if symbol in ("_PyEval_EvalFrameDefault", "eval_frame_handle_pending"):
                return "GIL, forced switch"
            where = symbol if "libpython" in lib else Path(lib.rstrip(")")).name.split(".")[0]
            known = {"acquire_timed": "a lock wait", "_multiarray_umath": "numpy", "cygrpc": "gRPC (cygrpc)"}
            return f"GIL, after {known.get(where, where)}"
    for frame in frames:
        if "acquire_timed" in frame or "PyThread_acquire_lock" in frame:
            return "a Python lock or condition"
        if "epoll" in frame or "pollset" in frame:
            return "gRPC poller (epoll)"
        if "grpc" in frame:
            return "gRPC core"
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deck", type=Path, help="default: a one-card deck of --model taken from models/")
    parser.add_argument("--model", default="resnet20-augmix-lrr", help="OIP model: a card, or the deck's name")
    parser.add_argument("--load", default="1x32", help="BATCHxCONCURRENCY")
    parser.add_argument("--kind", choices=("oip", "carddeck", "http"), default="oip")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--perf", action="store_true", help="classify voluntary context switches with perf")
    parser.add_argument("--tree", type=Path, default=ROOT, help="serve this source tree (e.g. `git archive` of main)")
    parser.add_argument("server_args", nargs="*", help="extra `carddeck serve` flags (after --)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np
    from bench_server import Server, _traffic, measure_remote

    from carddeck.deck import Deck, DeckStore

    tmp = Path(tempfile.mkdtemp(prefix="profile-batches-"))  # the one-card deck, the trace, perf's data
    deck = args.deck
    if deck is None:  # bench_peers' setup: the card alone
        source = DeckStore(ROOT / "models")
        deck = tmp / "deck"
        DeckStore.create(deck).add_card(source.read_model(source.manifest().find(args.model)))
    batch, conc = (int(v) for v in args.load.split("x"))
    traffic = _traffic(Deck.open(deck, run_cards=False))[64]
    images = np.ascontiguousarray(np.resize(traffic, (batch, *traffic.shape[1:])))
    out = str(tmp / "trace.json")
    entry = (sys.executable, str(Path(__file__).resolve()), "--as-server", out)
    server = Server(deck, *args.server_args, root=args.tree.resolve(), entry=entry)
    pool = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
    window: dict[str, object] = {}

    def sample() -> None:  # inside the clients' window (it opens 1.5 s after measure_remote starts)
        time.sleep(1.8)
        window.update(t0=time.perf_counter(), stat0=cpu_times(), threads0=threads(server.proc.pid))
        if args.perf:
            perf_record(server.proc.pid, min(2.0, args.seconds - 0.6), tmp / "perf.data")
        time.sleep(max(0.0, 1.5 + args.seconds - 0.3 - (time.perf_counter() - start)))
        window.update(t1=time.perf_counter(), stat1=cpu_times(), threads1=threads(server.proc.pid))

    try:
        list(pool.map(time.sleep, [0.1] * args.client_procs))
        for _ in range(3):  # warm-up; on a loaded machine the clients' first imports can outlast its window
            try:
                measure_remote(pool, args.client_procs, args.kind, server, images, conc, 2.0, args.model)
                break
            except IndexError:  # no call ended inside the window
                continue
        start = time.perf_counter()
        sampler = threading.Thread(target=sample)
        sampler.start()
        r = measure_remote(pool, args.client_procs, args.kind, server, images, conc, args.seconds, args.model)
        sampler.join()
        server.proc.send_signal(signal.SIGUSR1)
        for _ in range(100):
            if Path(out).exists():
                break
            time.sleep(0.1)
        trace = json.loads(Path(out).read_text())
        if args.perf:
            window["switches"] = perf_switches(tmp / "perf.data")
    finally:
        pool.shutdown()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # perf's data runs to hundreds of MB
    report(args, r, window, trace)
    return 0


def report(args: argparse.Namespace, r: dict, window: dict, trace: dict) -> None:
    import numpy as np

    t0, t1 = window["t0"], window["t1"]
    span = t1 - t0
    images = r["images_per_s"] * span
    (all0, idle0), (all1, idle1) = window["stat0"], window["stat1"]
    print(f"{args.kind} {args.load} on {args.model}: {r['images_per_s']:.0f} img/s, p50 {r['p50_ms']:.1f} ms, "
          f"server {r['cpu_s_per_1k']:.2f} CPU ms per image, mean batch {r['mean_batch'] or float('nan'):.1f}; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"machine busy {100 * (1 - (idle1 - idle0) / (all1 - all0)):.1f}% of its cores over {span:.1f} s")
    groups: dict[str, list[float]] = {}
    names = {int(k): v for k, v in trace["names"].items()}
    for tid, (comm, run, wait, switches) in window["threads1"].items():
        _, run0, wait0, switches0 = window["threads0"].get(tid, (comm, 0.0, 0.0, 0))
        g = groups.setdefault(re.sub(r"_\d+$", "", names.get(tid, f"native ({comm})")), [0.0, 0.0, 0, 0])
        g[0] += run - run0
        g[1] += wait - wait0
        g[2] += switches - switches0
        g[3] += 1
    print("  thread group                        CPU ms/img   % of a core   runqueue %   voluntary switches/img")
    for name, (run, wait, switches, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        if run > 0.002 * span:
            print(f"  {name[:30]:<30} ({n:2d}) {1000 * run / images:10.3f}   {100 * run / span:11.1f}"
                  f"   {100 * wait / span:10.1f}   {switches / images:10.2f}")  # fmt: skip

    def inside(rows: list) -> list:
        return [row for row in rows if t0 <= row[0] <= t1]

    batches, forms, ort = inside(trace.get("batch", [])), inside(trace.get("form", [])), inside(trace.get("ort", []))
    if not batches:
        print("no batch ran through the batch worker (requests ran alone in their own threads)")
        return
    worker = collections.Counter(b[4] for b in batches).most_common(1)[0][0]
    n = len(batches)
    mine = [o for o in ort if o[4] == worker]
    ort_wall, ort_cpu = sum(o[1] - o[0] for o in mine), sum(o[3] - o[2] for o in mine)
    run_wall, run_cpu = sum(b[1] - b[0] for b in batches), sum(b[3] - b[2] for b in batches)
    sizes = [o[5] for o in ort]  # rows per run
    print(f"batch worker: {n} batches ({n / span:.0f}/s) of {np.mean([b[5] for b in batches]):.1f} requests,"
          f" rows per ONNX Runtime run {np.mean(sizes):.1f};"
          f" share of the window: forming {100 * sum(f[1] - f[0] for f in forms) / span:.1f}%,"
          f" running {100 * run_wall / span:.1f}%"
          f" (in ONNX Runtime {100 * ort_wall / span:.1f}%)")  # fmt: skip
    print(f"  per batch: {1000 * run_wall / n:.2f} ms; ONNX Runtime {1000 * ort_wall / n:.2f} ms wall,"
          f" {1000 * ort_cpu / n:.2f} CPU; outside it {1000 * (run_wall - ort_wall) / n:.2f} ms wall,"
          f" {1000 * (run_cpu - ort_cpu) / n:.2f} CPU (the rest: waiting for the GIL, a lock or a core)")  # fmt: skip
    stages = []
    for key in ("gate", "verdict", "observe"):
        rows = inside(trace.get(key, []))
        if rows:
            stages.append(f"{key} {1000 * sum(r[1] - r[0] for r in rows) / n:.2f} ms wall, "
                          f"{1000 * sum(r[3] - r[2] for r in rows) / n:.2f} CPU")  # fmt: skip
    if stages:
        print("  of which, per batch: " + "; ".join(stages))
    helped = [c for c in inside(trace.get("claimed", [])) if c[3] > 0]
    if helped:
        late = [1000 * (c[4] - c[0]) for c in helped if c[4] is not None]
        print(f"  {len(helped)} runs split between the worker and a card-pool helper: the helper's first chunk started"
              f" {np.median(late) if late else float('nan'):.2f} ms (median) after the hand-off"
              f" ({len(helped) - len(late)} times the worker ran every chunk itself)")  # fmt: skip
    edges = sorted([(o[0], 1) for o in ort] + [(o[1], -1) for o in ort])
    level, last, share = 0, t0, collections.Counter[int]()
    for t, step in edges:
        t = min(max(t, t0), t1)
        share[min(level, 2)] += t - last
        last, level = t, level + step
    share[min(level, 2)] += t1 - last
    print("  ONNX Runtime runs going, share of the window: "
          + ", ".join(f"{k}{'+' if k == 2 else ''}: {100 * share[k] / span:.1f}%" for k in range(3)))  # fmt: skip
    switches = window.get("switches")
    if switches:
        recorded = min(2.0, args.seconds - 0.6)
        print(f"context switches (perf, {recorded:.0f} s): per image, and ms per image off the core after them")
        groups_of = {"batch worker": [worker], "all server threads": list(switches)}
        for label, tids in groups_of.items():
            kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
            for tid in tids:
                for kind, (count, off) in switches.get(tid, {}).items():
                    kinds[kind][0] += count
                    kinds[kind][1] += off
            total = sum(c for c, _ in kinds.values())
            per = images * recorded / span
            print(f"  {label}: {total / per:.2f} per image")
            for kind, (count, off) in sorted(kinds.items(), key=lambda kv: -kv[1][1])[:10]:
                print(f"    {kind:<40} {count / per:6.2f}   {1000 * off / per:7.3f} ms")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--as-server":
        sys.exit(serve_traced(sys.argv[2], sys.argv[3:]))
    sys.exit(main())
