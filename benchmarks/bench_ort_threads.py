"""ONNX Runtime settings for merged batches, measured on the deck: threads and IOBinding.

    python benchmarks/bench_ort_threads.py [--deck models] [--rounds 5]

(1) Thread layouts for ``Deck.run_routed`` on a merged batch (the cards the default policy routes a
batch of random images to), batch 8 / 32 / 64: intra-op threads per card session 1 or 2 (the
deck's default is ``cores // min(cards, cores)``), cards run concurrently on the card pool or one
after another. (2) ``session.run`` against ``run_with_iobinding`` with a pre-allocated output, bound
once (only possible for a fixed batch size) or per call (what varying micro-batches need).
(3) One card's session with 1 or 2 intra-op threads, spinning (ORT's default) or not
(``session.intra_op.allow_spinning``), calls back to back or with a 1 ms gap (a server between
batches), batch 1 / 8 / 32 / 64.
Wall and process-CPU milliseconds per image, median of interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import carddeck.deck.deck as deck_module  # noqa: E402
from carddeck.deck import Deck  # noqa: E402
from carddeck.deck.runtime import CardSession, choose_providers, cpu_cores  # noqa: E402


class _Sequential:
    """A stand-in for the card pool that runs the cards one after another in the caller's thread."""

    @staticmethod
    def map(fn: Callable, jobs: list) -> list:  # type: ignore[type-arg]
        return [fn(j) for j in jobs]


def timed(fn: Callable[[], object], images: int, calls: int) -> tuple[float, float]:
    fn()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    return 1e3 * (time.perf_counter() - t0) / (calls * images), 1e3 * (time.process_time() - c0) / (calls * images)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deck", type=Path, default=ROOT / "models")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    decks = {intra: Deck.open(args.deck, intra_op_threads=intra) for intra in (1, 2)}
    pools = {"card pool": ThreadPoolExecutor(cpu_cores()), "sequential": _Sequential()}
    default = Deck.open(args.deck)._sessions[decks[1].card_names[0]].intra_op_threads
    print(f"deck {args.deck}: {len(decks[1].cards)} cards, {cpu_cores()} cores, default intra-op threads {default}")
    spec, classes = decks[1].input, len(decks[1].class_names)  # the deck's own contract
    print("(1) Deck.run_routed on a merged batch, ms per image (wall / CPU):")
    for n in (8, 32, 64):
        x = decks[1].prepare((rng.random((n, spec.height, spec.width, spec.channels)) * 255).astype(np.uint8))
        weights = decks[1].route_prepared(x).weights
        runs: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for intra, deck in decks.items():
                for name, pool in pools.items():
                    deck_module.card_pool = lambda pool=pool: pool  # type: ignore[assignment]
                    runs.setdefault((intra, name), []).append(
                        timed(lambda: deck.run_routed(x, weights), n, max(1, 128 // n))  # noqa: B023
                    )
        cards = int((weights > 0).any(axis=0).sum())
        print(f"  batch {n} ({cards} cards run):")
        for (intra, name), rows in runs.items():
            wall = statistics.median(w for w, _ in rows)
            cpu = statistics.median(c for _, c in rows)
            print(f"    intra-op {intra}, {name:<10}  wall {wall:6.3f}  CPU {cpu:6.3f}")
    session = decks[1]._sessions[decks[1].card_names[0]].session
    print(f"(2) one card ({decks[1].card_names[0]}), ms per call (CPU):")
    for n in (1, 8, 64):
        x = np.ascontiguousarray(rng.random((n, spec.channels, spec.height, spec.width), dtype=np.float32))
        out = np.empty((n, classes), np.float32)
        bound = session.io_binding()
        bound.bind_cpu_input("images", x)
        bound.bind_output("logits", "cpu", 0, np.float32, [n, classes], out.ctypes.data)

        def per_call() -> None:
            b = session.io_binding()
            b.bind_cpu_input("images", x)  # noqa: B023
            b.bind_output("logits", "cpu", 0, np.float32, [n, classes], out.ctypes.data)  # noqa: B023
            session.run_with_iobinding(b)

        variants: dict[str, Callable[[], object]] = {
            "run": lambda: session.run(["logits"], {"images": x}),  # noqa: B023
            "iobinding bound once": lambda: session.run_with_iobinding(bound),  # noqa: B023
            "iobinding per call": per_call,
        }
        results: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                results.setdefault(name, []).append(timed(fn, 1, max(3, 200 // n))[1])
        print(f"  batch {n}: " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in results.items()))
    spinning(args.deck, args.rounds, rng)
    return 0


def spinning(deck_path: Path, rounds: int, rng: np.random.Generator) -> None:
    deck = Deck.open(deck_path, run_cards=False)
    entry = deck.manifest.active()[0]
    model = deck.store.read_model(entry)  # type: ignore[union-attr]
    sessions = {
        (intra, spin): CardSession(
            model, key=entry.key, digest="", providers=choose_providers(), intra_op_threads=intra, spin=spin
        )
        for intra in (1, 2)
        for spin in (True, False)
    }
    spec = deck.input
    print(f"(3) {entry.name}: intra-op threads and spinning, ms per image (wall / CPU)")
    for n in (1, 8, 32, 64):
        x = np.ascontiguousarray(rng.random((n, spec.channels, spec.height, spec.width), dtype=np.float32))
        runs: dict[tuple[int, bool, float], list[tuple[float, float]]] = {}
        for _ in range(rounds):
            for (intra, spin), session in sessions.items():
                for gap in (0.0, 0.001):

                    def call(session: CardSession = session, gap: float = gap) -> None:
                        session.logits(x)  # noqa: B023
                        if gap:
                            time.sleep(gap)

                    calls = max(4, 256 // n)
                    wall, cpu = timed(call, n, calls)
                    runs.setdefault((intra, spin, gap), []).append((wall - 1e3 * gap / n, cpu))
        print(f"  batch {n}:")
        for (intra, spin, gap), rows in runs.items():
            wall = statistics.median(w for w, _ in rows)
            cpu = statistics.median(c for _, c in rows)
            print(f"    intra-op {intra}, spinning {'on ' if spin else 'off'}, gap {gap * 1e3:.0f} ms  "
                  f"wall {wall:6.3f}  CPU {cpu:6.3f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
