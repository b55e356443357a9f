"""Test-time adaptation (carddeck.deck.adapt): its cost per shifted Predict, how often it runs on
clean traffic, and (``--choose``) the prior N and minimum batch size, measured on the validation split.

Cost (default mode), same run, same deck: a 64-image request of a random draw of test images at
``--corruption`` severity 5 (default fog; pick one the deck's shift signal calls uncovered: on leaves32,
contrast) through ``Dataplane.predict`` with adaptation on, against the same request
with adaptation off; the ratio of medians is the figure. Clean false alarms: the share of clean
64-image test batches (resampled) the trigger adapts, against the detector's stated false-alarm rate.

``--choose``: the default policy (guarded gate) on corrupted validation batches of each size,
every large enough batch adapted (no trigger, no spread guard), for each prior N: mean change against
the unadapted path on clean and corrupted batches, and the corruptions that lose.

    python benchmarks/bench_adapt.py [--deck models] [--repeats 20]
    python benchmarks/bench_adapt.py --choose [--grid 16:64,0:64] [--severities 1,3,5] [--cache runs.pkl]
    python benchmarks/bench_adapt.py --spread [--severities 1,2,3,4,5]   # the spread guard's decisions on val
    python benchmarks/bench_adapt.py --min-batch 16,24,32,48,64 [--shuffled] [--severities 1,2,3,4,5]

``--min-batch``: the served trigger (``uncovered`` verdicts, the spread guard, a detector without the
condition's corruption) on val requests of each size, every one of them large enough, against the
same requests unadapted: where adapting starts to pay, i.e. the smallest request worth adapting.

``--spread``: the spread guard (:func:`carddeck.serving.adaptation.class_spread`) on every validation batch
of 32 and 64 images, stored order and shuffled, against the rule it replaced (the mean probabilities'
effective number of classes >= 0.85 of all C): how many decisions differ, and the guard's value on the
batches of one or two true classes against those of five or more.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carddeck.commands.cli import comma_ints
from carddeck.data.corruptions import BENCHMARK_CORRUPTIONS, corrupt
from carddeck.data.datasets import data_for_cards, load_dataset
from carddeck.deck import Deck
from carddeck.eval.adaptation import AdaptiveCards, deck_detector, score_adaptive
from carddeck.eval.robustness import CLEAN, collect_runs, conditions_for, generated_source, route_run
from carddeck.serving.adaptation import MIN_SPREAD, Trigger, class_spread

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shift import timed


def val_runs(args: argparse.Namespace, deck: Deck, data: str) -> tuple[list, Callable]:  # type: ignore[type-arg]
    """Every card on corrupted validation images (cached in ``--cache``: the sweeps reuse them)."""
    val = load_dataset(data, "val")
    source = generated_source(val.images, val.labels, seed=1)  # the seed carddeck eval fits on
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        with open(cache, "rb") as f:
            return pickle.load(f), source
    runs = collect_runs(deck, conditions_for(BENCHMARK_CORRUPTIONS, args.severities), source, desc="val")
    if cache is not None:
        with open(cache, "wb") as f:
            pickle.dump(runs, f)
    return runs, source


def choose(args: argparse.Namespace, deck: Deck, data: str) -> int:
    runs, source = val_runs(args, deck, data)
    val = load_dataset(data, "val")
    detector = deck_detector(deck)
    assert deck.gate is not None
    policy = deck.default_policy
    print(f"deck {deck.root}, {len(val.images)} val images, policy {policy}, severities {args.severities}")
    print("| N | batch | clean change | corrupted change | corrupted (unadapted) | losing > 0.5 |")
    print("|---|---|---|---|---|---|")
    for prior, size in args.grid:
        cards = AdaptiveCards(deck, float(prior))
        kw = {"gate_for": lambda c: deck.gate, "detector_for": lambda c: detector, "policy": policy}
        base = score_adaptive(deck, runs, source, cards, **kw, batch_size=size, trigger=Trigger(min_batch=0))
        ada = score_adaptive(deck, runs, source, cards, **kw, batch_size=size, trigger=Trigger(size, None, 0.0))
        cor = [c for c in base.accuracy if c != CLEAN]
        per = {
            n: np.mean([ada.accuracy[c] - base.accuracy[c] for c in cor if c[0] == n])
            for n in dict.fromkeys(c[0] for c in cor)
        }
        losing = ", ".join(f"{n} {100 * d:+.1f}" for n, d in per.items() if d < -0.005) or "none"
        print(
            f"| {prior} | {size} | {100 * (ada.accuracy[CLEAN] - base.accuracy[CLEAN]):+.2f} "
            f"| {100 * np.mean([ada.accuracy[c] - base.accuracy[c] for c in cor]):+.2f} "
            f"| {100 * np.mean([base.accuracy[c] for c in cor]):.2f} | {losing} |",
            flush=True,
        )
    return 0


def triggers(args: argparse.Namespace, deck: Deck, data: str) -> int:
    """Which shift states should trigger adaptation: each corruption held out of the detector (it
    never saw it), the default policy with the deck's router, adaptation at the first --grid pair."""
    from carddeck.eval.adaptation import held_out_detector

    runs, source = val_runs(args, deck, data)
    detector = deck_detector(deck)
    prior, size = args.grid[0]
    cards = AdaptiveCards(deck, float(prior))
    kw = {"gate_for": lambda c: deck.gate, "policy": deck.default_policy, "batch_size": 64}
    kw["detector_for"] = lambda c: held_out_detector(detector, (c[0],))
    base = score_adaptive(deck, runs, source, cards, **kw, trigger=Trigger(min_batch=0))
    print(f"N={prior}, min batch {size}, detector without the condition's corruption; points against unadapted")
    print("| trigger states | clean | mean corrupted | adapted (clean / corrupted batches) | per corruption |")
    print("|---|---|---|---|---|")
    for states in (("covered", "uncovered"), ("uncovered",), None):
        ada = score_adaptive(deck, runs, source, cards, **kw, trigger=Trigger(size, states))
        cor = [c for c in base.accuracy if c != CLEAN]
        per = {
            n: 100 * np.mean([ada.accuracy[c] - base.accuracy[c] for c in cor if c[0] == n])
            for n in dict.fromkeys(c[0] for c in cor)
        }
        name = " or ".join(states) if states else "always"
        print(
            f"| {name} | {100 * (ada.accuracy[CLEAN] - base.accuracy[CLEAN]):+.2f} "
            f"| {np.mean(list(per.values())):+.2f} | {100 * ada.adapted[CLEAN]:.0f}% / "
            f"{100 * np.mean([ada.adapted[c] for c in cor]):.0f}% | "
            + ", ".join(f"{n} {d:+.1f}" for n, d in per.items() if abs(d) >= 0.05)
            + " |",
            flush=True,
        )
    return 0


def min_batch(args: argparse.Namespace, deck: Deck, data: str) -> int:
    """The served trigger at each request size (``--min-batch``) against unadapted, on val."""
    from dataclasses import replace

    from carddeck.eval.adaptation import held_out_detector

    runs, source = val_runs(args, deck, data)
    if args.shuffled:  # a split stored class by class (leaves32) gives one-class requests, which never adapt
        perm = np.random.default_rng(0).permutation(len(runs[0].labels))
        runs = [replace(r, labels=r.labels[perm], probabilities=r.probabilities[:, perm],
                        signatures=r.signatures[perm]) for r in runs]  # fmt: skip
        stored = source
        source = lambda c: tuple(a[perm] for a in stored(c))  # noqa: E731
    detector = deck_detector(deck)
    cards = AdaptiveCards(deck)
    kw = {"gate_for": lambda c: deck.gate, "policy": deck.default_policy}
    kw["detector_for"] = lambda c: held_out_detector(detector, (c[0],))
    order = "shuffled" if args.shuffled else "stored"
    print(f"deck {deck.root}, val {order}, served trigger; points against unadapted")
    print("| request size | clean | mean corrupted | corrupted batches adapted | corruptions changing >= 0.3 |")
    print("|---|---|---|---|---|")
    for size in args.min_batch:
        base = score_adaptive(deck, runs, source, cards, **kw, batch_size=size, trigger=Trigger(min_batch=0))
        ada = score_adaptive(deck, runs, source, cards, **kw, batch_size=size, trigger=Trigger(min_batch=size))
        cor = [c for c in base.accuracy if c != CLEAN]
        per = {
            n: 100 * np.mean([ada.accuracy[c] - base.accuracy[c] for c in cor if c[0] == n])
            for n in dict.fromkeys(c[0] for c in cor)
        }
        print(
            f"| {size} | {100 * (ada.accuracy[CLEAN] - base.accuracy[CLEAN]):+.2f} "
            f"| {np.mean(list(per.values())):+.2f} | {100 * np.mean([ada.adapted[c] for c in cor]):.0f}% | "
            + (", ".join(f"{n} {d:+.1f}" for n, d in per.items() if abs(d) >= 0.3) or "none")
            + " |",
            flush=True,
        )
    return 0


def spread(args: argparse.Namespace, deck: Deck, data: str) -> int:
    """The spread guard's decisions on val against the rule it replaced (the mean probabilities' effective
    number of classes >= 0.85 of all C), and the guard's value on batches of few and of many classes."""
    from dataclasses import replace

    runs, _ = val_runs(args, deck, data)
    assert deck.gate is not None
    order = np.random.default_rng(0).permutation(len(runs[0].labels))
    print(f"deck {deck.root}, {len(runs)} val conditions, policy {deck.default_policy}, guard {MIN_SPREAD}")
    print("| order | batch | batches | old rule adapts | guard adapts | decisions that differ "
          "| guard: highest on <= 2 true classes / lowest on >= 5 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, perm in (("stored", slice(None)), ("shuffled", order)):
        for size in (32, 64):
            old, new, few, many = [], [], [0.0], [9.0]
            for run in runs:
                run = replace(run, labels=run.labels[perm], probabilities=run.probabilities[:, perm],
                              signatures=run.signatures[perm])  # fmt: skip
                weights = route_run(deck.gate, run, deck.default_policy, False, size)
                mixed = np.einsum("nk,knc->nc", weights, run.probabilities)
                for i in range(0, len(mixed) - size + 1, size):  # whole batches: the guard needs >= min batch
                    p, classes = mixed[i : i + size], len(np.unique(run.labels[i : i + size]))
                    mean = p.mean(axis=0)
                    old.append(np.exp(-np.sum(mean * np.log(np.maximum(mean, 1e-12)))) / p.shape[1] >= 0.85)
                    new.append(class_spread(p))
                    (few if classes <= 2 else many if classes >= 5 else []).append(new[-1])
            o, w = np.array(old), np.array(new) >= MIN_SPREAD
            print(f"| {name} | {size} | {len(o)} | {o.sum()} | {w.sum()} | {(o != w).sum()} "
                  f"| {max(few):.3f} / {min(many):.3f} |", flush=True)  # fmt: skip
    return 0


def cost(args: argparse.Namespace, deck: Deck, data: str) -> int:
    from carddeck.observability.shift import ShiftLoader, ShiftMonitor
    from carddeck.serving.dataplane import Dataplane, DataplaneConfig

    detector = deck_detector(deck)
    if detector is None:
        print(f"deck {args.deck} has no shift detector: run `carddeck shift --deck {args.deck} --fit`")
        return 1
    test = load_dataset(data, "test")
    rng = np.random.default_rng(0)
    plane = Dataplane(DataplaneConfig(args.deck, batching=False, poll_interval_s=3600))
    plane.start()
    try:
        plane.deck.warm_adaptive()
        # a random draw: a split stored class by class (leaves32) gives one class first, which is not adapted
        rows = rng.choice(len(test.images), args.batch, replace=False)
        shifted = corrupt(test.images[rows], args.corruption, 5, seed=0)
        monitor = ShiftMonitor()  # the server's: every answer gets its verdict, adaptation reads it
        plane.on_swap.append(ShiftLoader(monitor))
        ShiftLoader(monitor)(plane.deck)
        plane.judge = monitor.judge
        on = Trigger()
        plane.adaptation = on
        prediction, _ = plane.predict(shifted)
        if not prediction.adapted:
            print(f"the {args.corruption}/5 request was not adapted (not uncovered): nothing to measure")
            return 1
        adapted = timed(lambda: plane.predict(shifted), args.repeats)
        plane.adaptation = None
        plain = timed(lambda: plane.predict(shifted), args.repeats)
        print(f"{args.batch}-image {args.corruption}/5 Predict: adapted {1e3 * adapted:.1f} ms, "
              f"unadapted {1e3 * plain:.1f} ms (medians of {args.repeats}); ratio {adapted / plain:.2f}x")  # fmt: skip
        plane.adaptation = on
        fired = 0
        for _ in range(args.clean_batches):
            rows = rng.choice(len(test.images), args.batch, replace=False)
            fired += plane.predict(test.images[rows])[0].adapted
        print(
            f"clean {args.batch}-image test batches adapted: {fired}/{args.clean_batches} "
            f"({100 * fired / args.clean_batches:.2f}%); "
            f"the detector's stated false-alarm rate {100 * detector.alpha:.2f}%"
        )
    finally:
        plane.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deck", default=str(Path(__file__).resolve().parents[1] / "models"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--corruption", default="fog", help="the shifted request's corruption, severity 5")
    parser.add_argument("--clean-batches", type=int, default=400)
    parser.add_argument("--choose", action="store_true", help="measure N and the minimum batch on val")
    parser.add_argument("--triggers", action="store_true", help="measure which shift states should adapt, on val")
    parser.add_argument("--spread", action="store_true", help="the spread guard's decisions on val, against 0.85 of C")
    parser.add_argument("--min-batch", type=comma_ints, default=None, help="request sizes: the served trigger on val")
    parser.add_argument("--shuffled", action="store_true", help="--min-batch: shuffle val before batching")
    parser.add_argument(
        "--grid",
        type=lambda v: [tuple(int(x) for x in p.split(":")) for p in v.split(",")],
        default=[(16, 64), (0, 64), (64, 64), (16, 32), (16, 16)],
        help="N:batch pairs to measure (default 16:64,0:64,64:64,16:32,16:16)",
    )
    parser.add_argument("--cache", default="", help="pickle of the validation runs, reused when it exists")
    parser.add_argument("--severities", type=comma_ints, default=[1, 3, 5])
    args = parser.parse_args()
    deck = Deck.open(args.deck)
    data = data_for_cards(None, [c.provenance.dataset for c in deck.cards], f"deck {args.deck}")
    if args.triggers:
        return triggers(args, deck, data)
    if args.spread:
        return spread(args, deck, data)
    if args.min_batch:
        return min_batch(args, deck, data)
    return choose(args, deck, data) if args.choose else cost(args, deck, data)


if __name__ == "__main__":
    raise SystemExit(main())
