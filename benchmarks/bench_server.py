"""Server throughput and latency against in-process baselines, all measured in one run.

    python benchmarks/bench_server.py [--deck PATH] [--cards 3] [--seconds 3]

Measures (images/s, p50/p99 latency per request):
  * the gRPC server (``carddeck serve`` subprocess, loopback): batch 64 at concurrency 1, and batch 1
    at concurrency 1, 8 and 32 -- once with micro-batching on and once with it off;
  * (a) the same CARDs in-process with ONNX Runtime and no server (``Deck.predict``), same loads;
  * (b) a uniform deck in PyTorch eager: every card runs on every image, softmax average
    (how RobustBench serves the CARD-Deck).
Targets printed as ratios: at batch 64 the server reaches >= 90% of in-process throughput; at batch
1 and concurrency 32 micro-batching gives >= 3x the throughput of the same server with batching off.

Without ``--deck`` it builds a temporary deck of ResNet-20 CARDs (``--kind linear``: linear cards,
where per-call overhead dominates) (``carddeck.nets``, exported with
``carddeck.export.onnx_export.to_onnx``; random weights, real signatures from digits32 clean /
gaussian / augmix images): timing does not depend on the weights' values. Needs the train extra (torch).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
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

from carddeck.card import Provenance  # noqa: E402
from carddeck.deck import Deck, DeckStore  # noqa: E402

DOMAINS = ("clean", "gaussian", "augmix")


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
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} calls failed, first: {errors[0]!r}")
    lat = np.array(latencies) * 1000
    return {
        "images_per_s": len(lat) * len(images) / elapsed,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "requests": len(lat),
    }


class Server:
    def __init__(self, deck: Path, *args: str) -> None:
        self.log = tempfile.NamedTemporaryFile("w+b", suffix=".log", delete=False)  # noqa: SIM115 - lives with the server
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARDDECK_")}
        cmd = [sys.executable, "-m", "carddeck.cli", "serve", "--deck", str(deck), "--port", "0"]
        self.proc = subprocess.Popen(
            [*cmd, "--metrics-port", "-1", "--http-port", "-1", "--poll-interval-s", "0", *args],
            cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            match = re.search(r"serving deck .* on \S+:(\d+)", Path(self.log.name).read_text(errors="replace"))
            if match:
                self.address = f"127.0.0.1:{match.group(1)}"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("server did not start:\n" + Path(self.log.name).read_text(errors="replace")[-2000:])

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
    parser.add_argument("--repeats", type=int, default=2, help="measurements per configuration (best kept)")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    args = parser.parse_args()

    import grpc  # noqa: F401  (fail early without the serving deps)
    import torch

    from carddeck.server.client import CardDeckClient

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
        rng = np.random.default_rng(0)
        images = {n: (rng.random((n, 32, 32, 3)) * 255).astype(np.uint8) for n in (1, 64)}
        print(f"deck: {len(deck.cards)} cards ({', '.join(deck.card_names)}), policy {deck.default_policy}")
        print(f"cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}", flush=True)

        def torch_uniform(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
            with torch.inference_mode():
                return torch.stack([m(t).softmax(1) for m in modules]).mean(0).numpy()

        servers = {
            "server, micro-batching": Server(deck_path, "--max-wait-ms", str(args.max_wait_ms)),
            "server, batching off": Server(deck_path, "--no-batching"),
        }
        configs: dict[str, Callable[[np.ndarray], object]] = {
            "(a) in-process ORT": lambda x: deck.predict(x),
            "(b) torch eager uniform": torch_uniform,
        }
        for label, server in servers.items():
            local = threading.local()

            def call(x: np.ndarray, address: str = server.address, local: threading.local = local) -> object:
                if not hasattr(local, "c"):  # one channel per client thread, like separate clients
                    local.c = CardDeckClient(address)
                return local.c.predict(x)

            configs[label] = call
        rows: dict[str, dict] = {}
        # The machine is shared: configurations alternate, each measured --repeats times, best kept.
        try:
            for batch, conc in ((64, 1), (1, 1), (1, 8), (1, 32)):
                print(f"\nbatch {batch}, concurrency {conc}:", flush=True)
                for _ in range(args.repeats):
                    for label, fn in configs.items():
                        r = measure(fn, images[batch], conc, args.seconds)
                        key = f"{label}|b{batch}|c{conc}"
                        if key not in rows or r["images_per_s"] > rows[key]["images_per_s"]:
                            rows[key] = r
                for label in configs:
                    r = rows[f"{label}|b{batch}|c{conc}"]
                    print(
                        f"  {label:<26} {r['images_per_s']:9.1f} img/s  p50 {r['p50_ms']:8.2f} ms  "
                        f"p99 {r['p99_ms']:8.2f} ms",
                        flush=True,
                    )
        finally:
            for server in servers.values():
                server.stop()

    def tput(key: str) -> float:
        return rows[key]["images_per_s"]

    print("\nratios (targets in brackets):")
    r64 = tput("server, micro-batching|b64|c1") / tput("(a) in-process ORT|b64|c1")
    print(f"  server / in-process ORT, batch 64:                 {r64:5.2f}  [>= 0.90]")
    r32 = tput("server, micro-batching|b1|c32") / tput("server, batching off|b1|c32")
    print(f"  micro-batching / batching off, batch 1, conc 32:   {r32:5.2f}  [>= 3.00]")
    rt = tput("server, micro-batching|b64|c1") / tput("(b) torch eager uniform|b64|c1")
    print(f"  server / torch eager uniform deck, batch 64:       {rt:5.2f}")
    rt1 = tput("server, micro-batching|b1|c32") / tput("(b) torch eager uniform|b1|c32")
    print(f"  server / torch eager uniform deck, batch 1 conc 32: {rt1:5.2f}")
    eff = tput("(a) in-process ORT|b64|c1") / tput("(a) in-process ORT|b1|c1")
    print(f"  for reference: in-process ORT images/s at batch 64 / at batch 1: {eff:5.2f}")
    print("  (micro-batching can only win what the cards gain from larger batches plus the per-call overhead it saves)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
