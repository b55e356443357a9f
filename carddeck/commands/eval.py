"""``carddeck eval``: robustness tables of a deck (JSON, markdown, PNG).

Example::

    carddeck eval --deck models/digits32 --data digits32 --out reports/digits32
    carddeck eval --deck DECK --data cifar10:DATA/cifar-10-batches-py --corrupted cifar10c:DATA/CIFAR-10-C --out R
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from carddeck.commands.cli import (
    DECK_LOCATION_HELP,
    add_order_argument,
    comma_ints,
    interrupted,
    out_dir,
    positive_int,
)

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deck", required=True, help=DECK_LOCATION_HELP)
    parser.add_argument(
        "--data",
        default=None,
        help="dataset spec for the clean test split (and val, to fit); default: the one the deck's cards record",
    )
    parser.add_argument(
        "--corrupted",
        default="generate",
        help="'generate' (corrupt the test split on the fly, seed --seed) or a corrupted suite spec "
        "(cifar10c:PATH, cifar100c:PATH, c:PATH, or just a directory written by `carddeck corrupt`)",
    )
    parser.add_argument("--corruptions", default=None, help="comma-separated subset (default: the 15 benchmark ones)")
    parser.add_argument(
        "--severities",
        type=comma_ints,
        default=None,
        help="comma-separated (default: 1,2,3,4,5, or those the suite holds)",
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="use only the first N test images per condition"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="serving batch size the gate routes (default 64)"
    )
    add_order_argument(parser, "with --seed")
    parser.add_argument(
        "--router",
        choices=("auto", "deck", "fit", "none"),
        default="auto",
        help="calibrated router: the deck's (deck), fitted now on corrupted val data (fit), deck's if it has one "
        "else fit (auto, default), or none",
    )
    parser.add_argument(
        "--held-out",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score 'calibrated/held-out' and 'guarded/held-out': each corruption routed by a router fitted "
        "without it (default: on)",
    )
    parser.add_argument(
        "--adapt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score the served path with test-time adaptation ('adaptive', 'adaptive/held-out', "
        "'adaptive/held-out-family'; needs the deck's shift detector and calibration images; default: on)",
    )
    parser.add_argument("--val-images", type=positive_int, default=None, help="limit validation images when fitting")
    parser.add_argument("--max-cards", type=positive_int, default=None, help="router: largest card set (default K/2)")
    parser.add_argument("--cost", type=float, default=0.0, help="router: accuracy given up per extra card")
    parser.add_argument("--metric", choices=("l2", "l1", "cosine"), default=None, help="override the gate's distance")
    parser.add_argument("--no-per-sample", action="store_true", help="skip the per-sample routing variants")
    parser.add_argument("--seed", type=int, default=0, help="corruption seed for generated test data")
    parser.add_argument("--out", type=out_dir, required=True, help="output directory for eval.json, eval.md, eval.png")


def run(args: argparse.Namespace) -> int:
    from carddeck.eval.report import write_report

    try:
        result = _evaluate(args)
    except KeyboardInterrupt:
        interrupted(f"eval of {args.deck} before its report: nothing was written to {args.out}")
        raise
    try:
        paths = write_report(result, Path(args.out))
    except KeyboardInterrupt:
        interrupted(f"eval of {args.deck} while writing its report: {args.out} may hold part of it; run it again")
        raise
    print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _evaluate(args: argparse.Namespace) -> Any:
    """The evaluation (an EvalResult with its notes), nothing written."""
    import numpy as np

    from carddeck.data.corruptions import FAMILIES
    from carddeck.data.datasets import data_for_cards, load_dataset
    from carddeck.deck import Deck
    from carddeck.errors import InvalidInput
    from carddeck.eval.robustness import (
        collect_runs,
        conditions_for,
        evaluate,
        fit_router_on,
        generated_source,
        held_out_routers,
        suite_source,
    )

    deck = Deck.open(args.deck)
    if not deck.cards:
        raise InvalidInput(f"deck {args.deck} has no cards to evaluate")
    args.data = data_for_cards(args.data, [c.provenance.dataset for c in deck.cards], f"deck {args.deck}")
    test = load_dataset(args.data, "test")
    order = np.arange(len(test.labels))
    if args.order == "shuffled":
        if args.corrupted != "generate":
            raise InvalidInput("--order shuffled needs --corrupted generate (a stored suite keeps its own order)")
        order = np.random.default_rng(args.seed).permutation(len(test.labels))
    images, labels = test.images[order][: args.limit], test.labels[order][: args.limit]
    if test.class_names != deck.class_names:
        raise InvalidInput(
            f"dataset {args.data} has classes {list(test.class_names)[:5]}..., the deck's cards "
            f"{list(deck.class_names)[:5]}...; evaluate a deck on the data it was trained for"
        )
    notes: dict[str, object] = {"deck": str(deck.root), "deck_version": deck.version, "data": args.data}
    if args.order == "shuffled":
        notes["order"] = f"test images shuffled (seed {args.seed}) before batching"
    if args.corrupted == "generate":
        from carddeck.data.corruptions import BENCHMARK_CORRUPTIONS, CORRUPTIONS

        available: list[str] = list(CORRUPTIONS.names())
        default: list[str] = list(BENCHMARK_CORRUPTIONS)
        severities_available = [1, 2, 3, 4, 5]
        source = generated_source(images, labels, seed=args.seed)
        notes["corrupted"] = f"generated from the test split with carddeck.data.corruptions, seed {args.seed}"
    else:
        from carddeck.data.corrupted import load_corrupted
        from carddeck.data.corruptions import BENCHMARK_CORRUPTIONS

        spec = args.corrupted
        if Path(spec).is_dir():  # a bare directory: any suite in the CIFAR-10-C layout
            spec = f"c:{spec}"
        suite = load_corrupted(spec)
        if len(suite.class_names) != len(deck.class_names):
            raise InvalidInput(
                f"corrupted suite {args.corrupted} has {len(suite.class_names)} classes, "
                f"the deck's cards {len(deck.class_names)}"
            )
        available = list(suite.corruptions)
        default = [c for c in BENCHMARK_CORRUPTIONS if c in available] or available
        severities_available = list(suite.severities)
        source = suite_source(images, labels, suite, args.limit)
        notes["corrupted"] = spec
    corruptions = args.corruptions.split(",") if args.corruptions else default
    unknown = [c for c in corruptions if c not in available]
    if unknown:
        raise InvalidInput(f"corruption(s) {unknown} not available; choose from {', '.join(available)}")
    severities = args.severities or severities_available
    missing = [s for s in severities if s not in severities_available]
    if missing:
        raise InvalidInput(f"severities {missing} not available; choose from {severities_available}")
    args.severities = severities
    runs = collect_runs(deck, conditions_for(corruptions, args.severities), source, desc="eval (test)")

    router = deck.gate.router if deck.gate is not None else None
    mode = args.router if args.router != "auto" else ("deck" if router is not None else "fit")
    if mode == "deck" and router is None:
        raise InvalidInput(f"deck {args.deck} has no calibrated router: run `carddeck calibrate` or use --router fit")
    fit: dict[str, Any] = {
        "batch_size": args.batch_size,
        "max_cards": args.max_cards,
        "cost": args.cost,
        "metric": args.metric,
    }
    held_out = family = None
    if mode == "fit" or (mode == "deck" and args.held_out):
        val = load_dataset(args.data, "val")
        vi, vl = val.images[: args.val_images], val.labels[: args.val_images]
        val_runs = collect_runs(
            deck,
            conditions_for(corruptions, args.severities),
            generated_source(vi, vl, seed=args.seed + 1),
            desc="eval (val, to fit routers)",
        )
        if mode == "fit":
            router = fit_router_on(deck, val_runs, **fit)
            notes["router"] = f"fitted on {len(vi)} val images x {len(val_runs)} conditions (seed {args.seed + 1})"
        if args.held_out:
            held_out = held_out_routers(deck, val_runs, **fit)
            notes["held-out"] = "*/held-out: per corruption, a router fitted on val data without that corruption"
            family = held_out_routers(deck, val_runs, FAMILIES, **fit)
            notes["held-out-family"] = (
                "*/held-out-family: a router fitted without the corruption's whole family ("
                + "; ".join(f"{f}: {', '.join(m)}" for f, m in FAMILIES.items())
                + ")"
            )
    if mode == "none":
        router = None
    elif mode == "deck":
        notes["router"] = "the deck's (carddeck calibrate)"
    result = evaluate(
        deck,
        runs,
        router=router,
        batch_size=args.batch_size,
        per_sample=not args.no_per_sample,
        metric=args.metric,
        held_out_routers=held_out,
        family_routers=family,
    )
    if args.adapt:
        from carddeck.eval.adaptation import add_adaptive_rows

        add_adaptive_rows(
            result, deck, runs, source, router=router, held_out=held_out, family=family, families=FAMILIES
        )
    result.notes.update(notes)
    result.notes["verdict"] = verdict(result)
    return result


def verdict(result: object) -> str:
    """Which gate policies beat the uniform deck and the best single card running at most half the cards."""
    from carddeck.eval.robustness import EvalResult

    assert isinstance(result, EvalResult)
    if not result.corrupted:
        return "no corrupted conditions"
    cards = [m for m in result.methods if m.startswith("card:")]
    best_card = max(cards, key=result.mean_corrupted)
    uniform = result.mean_corrupted("uniform")
    half = len(cards) / 2
    gates = [m for m in result.methods if m not in cards and m not in ("uniform", "oracle", "set-oracle")]
    winners = [
        m
        for m in gates
        if result.mean_corrupted(m) >= max(uniform, result.mean_corrupted(best_card))
        and result.cards_per_image[m] <= half
    ]
    summary = ", ".join(f"{m} {100 * result.mean_corrupted(m):.2f}" for m in winners) or "none"
    return (
        f"uniform {100 * uniform:.2f}, best card {best_card} {100 * result.mean_corrupted(best_card):.2f}; "
        f"gates at least as good with <= {half:g} cards/image: {summary}"
    )
