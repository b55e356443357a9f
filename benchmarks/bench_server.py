"""Server throughput, latency and CPU cost against in-process baselines, all measured in one run.

    python benchmarks/bench_server.py [--deck PATH] [--cards 3] [--seconds 3]

Measures (images/s, p50/p99 latency per request) at batch 64 / concurrency 1 and batch 1 / concurrency
1, 8 and 32:
  * the gRPC server (``carddeck serve`` subprocess, loopback), our API with micro-batching on and off,
    the Open Inference Protocol's ModelInfer through ``tritonclient.grpc`` (micro-batching on), and
    the same protocol over HTTP/REST through ``tritonclient.http`` with binary tensors (same server).
    The load comes from separate client processes (up to --client-procs, threads inside each), so
    the clients' GIL is not the server's; they still share the machine's cores, so the run also
    reports the **server process's CPU seconds per 1,000 images** (from /proc), which does not
    depend on how busy the machine is;
  * (a) the same CARDs in-process with ONNX Runtime and no server (``Deck.predict``), same loads,
    threads in this process, with its CPU seconds per 1,000 images at batch 64: the floor;
  * (b) a uniform deck in PyTorch eager: every card runs on every image, softmax average
    (how RobustBench serves the CARD-Deck).
Ratios printed at the end, with issue #23's targets in brackets (the b1 latency overhead's is #15's): batch 1 /
concurrency 32 server throughput over in-process batch 64; server CPU per image over in-process batch-64 CPU
per image; batch-1 latency overhead; batch 64 server over in-process. Each configuration is measured
--repeats times, interleaved with the others in an order rotated each repeat (the machine may be shared);
the median is reported. Remote throughput counts each client's calls over their own span (the last one ends
after the window).
--loads and --rows pick a subset (e.g. ``--loads 1x32 --rows micro-batching,http`` while profiling).

Without ``--deck`` it builds a temporary deck of ResNet-20 CARDs (``--kind linear``: linear cards,
where per-call overhead dominates) (``carddeck.nets``, exported with
``carddeck.export.onnx_export.to_onnx``; random weights, real signatures from digits32 clean /
gaussian / augmix images): timing does not depend on the weights' values. Needs the train extra (torch).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from carddeck.card import Provenance  # noqa: E402
from carddeck.deck import Deck, DeckStore  # noqa: E402

DOMAINS = ("clean", "gaussian", "augmix")
FLOOR = "(a) in-process ORT"


def build_linear_deck(root: Path, n_cards: int) -> tuple[Path, list]:
    """A deck of linear cards (tests.cards.tiny_card): so cheap that per-call overhead dominates."""
    import torch

    from carddeck.data.datasets import load_dataset
    from carddeck.gating import domain_signature
    from tests.cards import tiny_card_bytes, tiny_meta

    clean = load_dataset("digits32", "train").images[:256]
    store = DeckStore.create(root)
    modules = []
    for i in range(n_cards):
        domain = DOMAINS[i % len(DOMAINS)]
        sig = domain_signature(domain, clean, seed=0)
        store.add_card(tiny_card_bytes(tiny_meta(f"{domain}-{i}", domain=domain, signature=sig), seed=i))
        modules.append(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).eval())
    return root, modules


def build_deck(root: Path, n_cards: int) -> tuple[Path, list]:
    """A deck of ResNet-20 cards, and the torch modules they were exported from."""
    import torch

    from carddeck.data.datasets import load_dataset
    from carddeck.export.metadata import embed_meta
    from carddeck.export.onnx_export import to_onnx
    from carddeck.gating import domain_signature
    from carddeck.nets import build_net
    from tests.cards import tiny_meta

    clean = load_dataset("digits32", "train").images[:256]
    store = DeckStore.create(root)
    modules = []
    for i in range(n_cards):
        domain = DOMAINS[i % len(DOMAINS)]
        torch.manual_seed(i)
        net = build_net("resnet20", 10).eval()
        sig = domain_signature(domain, clean, seed=0)
        meta = tiny_meta(f"{domain}-{i}", domain=domain, signature=sig).replace(
            architecture="resnet20", provenance=Provenance(dataset="digits32", seed=i)
        )
        proto = embed_meta(to_onnx(net, 32, 32), meta)
        store.add_card(proto.SerializeToString())
        modules.append(net)
    return root, modules


def torch_modules_for(deck: Deck) -> list:
    import torch

    from carddeck.nets import build_net

    torch.manual_seed(0)
    return [build_net(m.architecture, m.num_classes).eval() for m in deck.cards]


# -- load generation -------------------------------------------------------------------------------
def measure(call: Callable[[np.ndarray], object], images: np.ndarray, concurrency: int, seconds: float) -> dict:
    """Run ``call(images)`` from ``concurrency`` threads for ``seconds``; throughput and latency percentiles."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds
    errors: list[BaseException] = []

    def worker() -> None:
        local = []
        while time.perf_counter() < stop_at or not local:  # at least one call each
            t0 = time.perf_counter()
            try:
                call(images)
            except BaseException as exc:  # report, do not hide
                errors.append(exc)
                return
            local.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(local)

    call(images)  # warm-up
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0, cpu0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, first: {errors[0]!r}")
    lat = np.array(latencies) * 1000
    return {
        "images_per_s": len(lat) * len(images) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "requests": len(lat),
        "cpu_s_per_1k": 1000 * cpu / (len(lat) * len(images)),  # this process, every thread
    }


# -- load from other processes ----------------------------------------------------------------------
def _traffic(deck: Deck) -> dict[int, np.ndarray]:
    """Requests of 1 and 64 images: test images of the dataset the deck's cards were trained on (the deck's
    own traffic; noise would be far from every calibration batch, where the guarded gate hedges over every
    card), else noise of the deck's input contract (a deck that records no dataset)."""
    from carddeck.data.datasets import data_for_cards, load_dataset
    from carddeck.errors import InvalidInput

    try:
        data = data_for_cards(None, [c.provenance.dataset for c in deck.cards], "the deck")
        test = load_dataset(data, "test").images
        print(f"traffic: {data} test images", flush=True)
    except InvalidInput as e:
        spec = deck.input
        test = (np.random.default_rng(0).random((64, spec.height, spec.width, spec.channels)) * 255).astype(np.uint8)
        print(f"traffic: noise ({e})", flush=True)
    return {n: np.ascontiguousarray(test[:n]) for n in (1, 64)}


def _client_call(kind: str, address: str, images: np.ndarray, model: str = "carddeck") -> Callable[[], object]:
    if kind == "carddeck":
        from carddeck.client.api import CardDeckClient

        client = CardDeckClient(address)
        return lambda: client.predict(images)
    if kind == "http":  # binary tensor data both ways, as tritonclient.http sends by default
        import tritonclient.http as th

        http = th.InferenceServerClient(address)
        tensor = th.InferInput("images", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        outputs = [th.InferRequestedOutput(n, binary_data=True) for n in ("probabilities", "labels")]
        return lambda: http.infer(model, [tensor], outputs=outputs)
    import tritonclient.grpc as tc

    oip = tc.InferenceServerClient(address)
    inp = tc.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    return lambda: oip.infer(model, [inp])


def client_load(
    kind: str,
    address: str,
    images: np.ndarray,
    threads: int,
    start_at: float,
    stop_at: float,
    model: str = "carddeck",
) -> tuple[list[float], float]:
    """In a client process: ``threads`` clients sending ``images`` (uint8, N, H, W, C: the same request the
    in-process baseline runs), each calling from ``start_at`` until a call ends after ``stop_at``; latencies (s)
    and when the last call ended (``time.time()``)."""
    latencies: list[float] = []
    ends: list[float] = []

    def worker() -> None:
        call = _client_call(
            kind, address, images, model
        )  # in its thread: tritonclient.http's gevent pool is per thread
        call()  # connect and warm up before the window opens
        time.sleep(max(0.0, start_at - time.time()))
        local = []
        while time.time() < stop_at:
            t0 = time.perf_counter()
            call()
            local.append(time.perf_counter() - t0)
        latencies.extend(local)
        ends.append(time.time())

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return latencies, max(ends)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_remote(pool: ProcessPoolExecutor, procs: int, kind: str, server: Server, images: np.ndarray, conc: int,
                   seconds: float, model: str = "carddeck") -> dict:  # fmt: skip
    """Load from ``min(conc, procs)`` client processes; throughput, latency and server CPU per 1,000 images."""
    n = min(conc, procs)
    start_at = time.time() + 1.5  # every client connected and warmed up first
    stop_at = start_at + seconds
    address = server.http_address if kind == "http" else server.address
    batch = len(images)
    futures = [
        pool.submit(client_load, kind, address, images, conc // n + (i < conc % n), start_at, stop_at, model)
        for i in range(n)
    ]
    time.sleep(max(0.0, start_at - time.time()))
    cpu0, counts0 = process_cpu_seconds(server.proc.pid), server.counts()
    results = [f.result() for f in futures]
    lat = np.concatenate([np.asarray(latencies) for latencies, _ in results]) * 1000
    cpu, counts = process_cpu_seconds(server.proc.pid) - cpu0, server.counts()
    images = len(lat) * batch
    executions = counts[1] - counts0[1]
    # over the calls' own span: the last call ends after stop_at (at batch 64, concurrency 1, counting it
    # against ``seconds`` moved a row by up to one request in ~40, 2.6%)
    elapsed = max(end for _, end in results) - start_at
    return {
        "images_per_s": images / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "requests": len(lat),
        "cpu_s_per_1k": 1000 * cpu / images,
        # mean executed batch (ModelStatistics: inferences / executions), warm-up calls included
        "mean_batch": (counts[0] - counts0[0]) / executions if executions and server.counts_batches else None,
    }


def cli_module(root: Path) -> str:
    """The ``python -m`` name of the ``carddeck`` command in the tree ``root`` (older trees: carddeck.cli)."""
    return "carddeck" if (root / "carddeck" / "__main__.py").exists() else "carddeck.cli"


class Server:
    def __init__(self, deck: Path, *args: str, root: Path = ROOT, entry: Sequence[str] = ()) -> None:
        """``carddeck serve`` of the source tree ``root`` (another checkout: its before figures, same run);
        ``entry``: what runs the ``carddeck`` command instead of ``python -m carddeck`` (a profiler's wrapper)."""
        self.counts_batches = root == ROOT  # before #23, ModelStatistics counted one execution per request
        self.log = tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False)  # noqa: SIM115 - lives with the server
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARDDECK_")}
        cmd = [*(entry or (sys.executable, "-m", cli_module(root))), "serve", "--deck", str(deck), "--port", "0"]
        self.proc = subprocess.Popen(
            [*cmd, "--metrics-port", "-1", "--http-port", "0", "--poll-interval-s", "0", *args],
            cwd=root, env={**env, "PYTHONPATH": str(root)}, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = Path(self.log.name).read_text(errors="replace")
            match = re.search(r"serving deck .* on \S+:(\d+)", text)
            http = re.search(r"HTTP \(Open Inference Protocol, /v2\) on \S+:(\d+)", text)
            if match and http:
                self.address = f"127.0.0.1:{match.group(1)}"
                self.http_address = f"127.0.0.1:{http.group(1)}"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("server did not start:\n" + Path(self.log.name).read_text(errors="replace")[-2000:])

    def counts(self) -> tuple[int, int]:
        """(inferences, executions) of every model so far, from the OIP's ModelStatistics."""
        import grpc

        from carddeck.wire.proto_gen.inference import grpc_service_pb2 as oip
        from carddeck.wire.proto_gen.inference import grpc_service_pb2_grpc

        with grpc.insecure_channel(self.address) as channel:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            stats = stub.ModelStatistics(oip.ModelStatisticsRequest(), timeout=10).model_stats
        return sum(m.inference_count for m in stats), sum(m.execution_count for m in stats)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        Path(self.log.name).unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deck", type=Path, help="deck store to serve (default: a temporary ResNet-20 deck)")
    parser.add_argument("--cards", type=int, default=3, help="cards in the temporary deck")
    parser.add_argument(
        "--kind", choices=("resnet20", "linear"), default="resnet20", help="cards of the temporary deck"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per configuration (median kept)")
    parser.add_argument("--loads", default="64x1,1x1,1x8,1x32", help="BATCHxCONCURRENCY, comma-separated")
    parser.add_argument("--rows", default="", help="comma-separated substrings of the row labels to run (default all)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--client-procs", type=int, default=4, help="client processes generating the load")
    parser.add_argument("--serve-args", default="", help="extra `carddeck serve` flags of the micro-batching server")
    parser.add_argument(
        "--before-tree", type=Path, help="also serve from this source tree (e.g. `git archive` of an older commit)"
    )
    args = parser.parse_args()

    import grpc  # noqa: F401  (fail early without the serving deps)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        if args.deck:
            deck_path = args.deck
            deck = Deck.open(deck_path)
            modules = torch_modules_for(deck)
        else:
            print(f"building a temporary deck of {args.cards} {args.kind} cards ...", flush=True)
            build = build_deck if args.kind == "resnet20" else build_linear_deck
            deck_path, modules = build(Path(tmp) / "deck", args.cards)
            deck = Deck.open(deck_path)
        images = _traffic(deck)
        print(f"deck: {len(deck.cards)} cards ({', '.join(deck.card_names)}), policy {deck.default_policy}")
        print(f"cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, "
              f"client processes: {args.client_procs}", flush=True)  # fmt: skip

        def torch_uniform(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
            with torch.inference_mode():
                return torch.stack([m(t).softmax(1) for m in modules]).mean(0).numpy()

        local: dict[str, Callable[[np.ndarray], object]] = {
            FLOOR: lambda x: deck.predict(x),
            "(b) torch eager uniform": torch_uniform,
        }
        extra = args.serve_args.split()
        servers = {
            "server, micro-batching": Server(deck_path, "--max-wait-ms", str(args.max_wait_ms), *extra),
            "server, batching off": Server(deck_path, "--no-batching"),
        }
        remote = {  # label -> (client kind, server)
            "server, micro-batching": ("carddeck", servers["server, micro-batching"]),
            "server, batching off": ("carddeck", servers["server, batching off"]),
            "server OIP (tritonclient)": ("oip", servers["server, micro-batching"]),
            "server OIP HTTP (binary)": ("http", servers["server, micro-batching"]),
        }
        if args.before_tree:  # the same deck served by the older code, measured in the same run
            before = servers["server before, micro-batching"] = Server(
                deck_path, "--max-wait-ms", str(args.max_wait_ms), root=args.before_tree.resolve()
            )
            remote["server before, micro-batching"] = ("carddeck", before)
            remote["server before, OIP HTTP (binary)"] = ("http", before)
        labels = [*local, *remote]
        if args.rows:
            wanted = args.rows.split(",")
            labels = [label for label in labels if label == FLOOR or any(w in label for w in wanted)]
        rows: dict[str, dict] = {}
        pool = ProcessPoolExecutor(args.client_procs, mp_context=multiprocessing.get_context("spawn"))
        list(pool.map(time.sleep, [0.1] * args.client_procs))  # start the client processes now
        # The machine is shared: configurations alternate, each measured --repeats times, the median kept.
        loads = [tuple(int(v) for v in load.split("x")) for load in args.loads.split(",")]
        if (64, 1) not in loads:
            loads.insert(0, (64, 1))  # the floor every ratio is taken against
        try:
            for batch, conc in loads:
                print(f"\nbatch {batch}, concurrency {conc}:", flush=True)
                runs: dict[str, list[dict]] = {}
                for rep in range(args.repeats):
                    # rotated each repeat: no row always first after the in-process ones (or a server's first)
                    for label in labels[rep % len(labels) :] + labels[: rep % len(labels)]:
                        if label in local:
                            r = measure(local[label], images[batch], conc, args.seconds)
                        else:
                            kind, server = remote[label]
                            r = measure_remote(pool, args.client_procs, kind, server, images[batch], conc, args.seconds)
                        runs.setdefault(label, []).append(r)
                for label, results in runs.items():  # the median run by throughput, with its own latencies
                    rows[f"{label}|b{batch}|c{conc}"] = sorted(results, key=lambda r: r["images_per_s"])[
                        len(results) // 2
                    ]
                for label in labels:
                    r = rows[f"{label}|b{batch}|c{conc}"]
                    who = "server" if label in remote else "this process"
                    mean = f"  mean batch {r['mean_batch']:5.1f}" if r.get("mean_batch") else ""
                    print(
                        f"  {label:<33} {r['images_per_s']:9.1f} img/s  p50 {r['p50_ms']:8.2f} ms  "
                        f"p99 {r['p99_ms']:8.2f} ms  {r['cpu_s_per_1k']:6.2f} CPU s / 1k images ({who}){mean}",
                        flush=True,
                    )
        finally:
            pool.shutdown()
            for server in servers.values():
                server.stop()

    def row(label: str, batch: int, conc: int) -> dict:
        return rows[f"{label}|b{batch}|c{conc}"]

    def have(*keys: tuple[str, int, int]) -> bool:
        return all(f"{label}|b{batch}|c{conc}" in rows for label, batch, conc in keys)

    floor = row(FLOOR, 64, 1)
    print("\nratios (issue #23's targets in brackets):")
    for label in remote:
        if label not in labels:
            continue
        print(f"  {label}:")
        if have((label, 64, 1)):
            r64 = row(label, 64, 1)["images_per_s"] / floor["images_per_s"]
            print(f"    batch 64 throughput / in-process batch 64:                  {r64:6.2f}  [>= 0.95]")
        if have((label, 1, 32)):
            r32 = row(label, 1, 32)["images_per_s"] / floor["images_per_s"]
            cpu = row(label, 1, 32)["cpu_s_per_1k"] / floor["cpu_s_per_1k"]
            print(f"    batch 1, conc 32 throughput / in-process batch 64:          {r32:6.2f}  [>= 0.60]")
            print(f"    batch 1, conc 32 server CPU per image / in-process batch 64: {cpu:6.2f}  [<= 1.50]")
        if have((label, 1, 1), (FLOOR, 1, 1)):
            overhead = row(label, 1, 1)["p50_ms"] - row(FLOOR, 1, 1)["p50_ms"]
            print(f"    batch 1, conc 1 p50 overhead over in-process:            {overhead:6.2f} ms [<= 0.40]")
    if not have(("server, micro-batching", 64, 1), ("server, micro-batching", 1, 32), ("server, batching off", 1, 32),
                ("(b) torch eager uniform", 1, 32), (FLOOR, 1, 1)):  # fmt: skip
        return 0
    r32 = row("server, micro-batching", 1, 32)["images_per_s"] / row("server, batching off", 1, 32)["images_per_s"]
    print(f"  micro-batching / batching off, batch 1, conc 32:             {r32:6.2f}")
    rt = row("server, micro-batching", 64, 1)["images_per_s"] / row("(b) torch eager uniform", 64, 1)["images_per_s"]
    print(f"  server / torch eager uniform deck, batch 64:                 {rt:6.2f}")
    rt1 = row("server, micro-batching", 1, 32)["images_per_s"] / row("(b) torch eager uniform", 1, 32)["images_per_s"]
    print(f"  server / torch eager uniform deck, batch 1 conc 32:          {rt1:6.2f}")
    eff = floor["images_per_s"] / row(FLOOR, 1, 1)["images_per_s"]
    print(f"  for reference: in-process ORT images/s at batch 64 / at batch 1: {eff:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
