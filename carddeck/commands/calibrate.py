"""``carddeck calibrate``: domain reference signatures and the calibrated router of a deck.

Uses training data for the references (each domain's augmentation of clean training images) and
corrupted validation data for the router, never the test split.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import numpy as np

from carddeck.commands.cli import DECK_LOCATION_HELP, comma_ints, interrupted, positive_int

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deck", required=True, help=DECK_LOCATION_HELP)
    parser.add_argument(
        "--data",
        default=None,
        help="dataset spec: digits32, leaves32, cifar10:PATH, npz:PATH ... (default: the one the deck's cards record)",
    )
    parser.add_argument(
        "--signatures",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute each domain's reference signature from the training split (default: on)",
    )
    parser.add_argument(
        "--train-images", type=positive_int, default=2000, help="training images per reference signature"
    )
    parser.add_argument(
        "--router",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fit the calibrated router on corrupted validation images (default: on)",
    )
    parser.add_argument("--corruptions", default=None, help="comma-separated (default: the 15 benchmark corruptions)")
    parser.add_argument(
        "--severities", type=comma_ints, default=[1, 2, 3, 4, 5], help="comma-separated, default 1,2,3,4,5"
    )
    parser.add_argument("--val-images", type=positive_int, default=None, help="limit validation images (default: all)")
    parser.add_argument("--batch-size", type=int, default=64, help="calibration batch = serving batch size")
    parser.add_argument(
        "--max-cards", type=positive_int, default=None, help="largest card set the router may pick (default K/2)"
    )
    parser.add_argument("--cost", type=float, default=0.0, help="accuracy the router gives up per extra card")
    parser.add_argument("--seed", type=int, default=1, help="corruption seed for validation data (eval uses 0)")
    parser.add_argument("--policy", default=None, help="also make this the deck's default gate policy")
    parser.add_argument(
        "--store-calibration",
        type=int,
        default=0,
        metavar="N",
        help="store N clean training images in the deck, to sign cards added later without a signature",
    )


def run(args: argparse.Namespace) -> int:
    from carddeck.data.datasets import data_for_cards
    from carddeck.deck import DeckStore
    from carddeck.errors import InvalidInput

    store = DeckStore(args.deck)
    store.check_writable()  # before minutes of work that could not be saved
    cards = store.list_cards()
    if not cards:
        raise InvalidInput(f"deck {args.deck} has no cards to calibrate")
    if args.batch_size < 1:
        raise InvalidInput(f"--batch-size must be positive, got {args.batch_size}")
    # every name checked before the work: a refused calibration leaves the deck as it was
    from carddeck.data.corruptions import BENCHMARK_CORRUPTIONS, CORRUPTIONS
    from carddeck.gating.policies import POLICIES

    corruptions = args.corruptions.split(",") if args.corruptions else list(BENCHMARK_CORRUPTIONS)
    for name in corruptions:
        CORRUPTIONS.get(name)  # InvalidInput listing the valid names
    if any(s not in range(1, 6) for s in args.severities):
        raise InvalidInput(f"--severities must be among 1..5, got {args.severities}")
    if args.policy:
        POLICIES.get(args.policy)
    args.data = data_for_cards(args.data, [c.provenance.dataset for c in cards], f"deck {args.deck}")
    version = store.version
    try:
        change = _calibration(args, store, cards, corruptions)
        # One transaction: the references, the calibration images, the router and the policy land together or
        # not at all (each was a commit of its own: an error or Ctrl-C in the router's fit, minutes after the
        # references were committed, left the deck half calibrated, a version up).
        if change:
            store.set_gate(**change)
    except KeyboardInterrupt:
        now = store.manifest().version
        kept = (f"nothing was written: the deck is as it was (version {version})" if now == version else
                f"the deck is at version {now} (it was {version})")  # fmt: skip
        interrupted(f"calibrate of {args.deck}: {kept}")
        raise
    m = store.manifest()
    print(f"deck {store.root}: version {m.version}, gate {dict(m.gate).get('policy', 'nearest-domain')}")
    return 0


def _calibration(args: argparse.Namespace, store: Any, cards: list[Any], corruptions: list[str]) -> dict[str, Any]:
    """What calibrate changes (set_gate's arguments), computed without writing anything."""
    from carddeck.data.datasets import load_dataset
    from carddeck.deck import Deck
    from carddeck.gating.signature import domain_signature

    change: dict[str, Any] = {}
    if args.signatures or args.store_calibration:
        train = load_dataset(args.data, "train")
        order = np.random.default_rng(0).permutation(len(train))
        index = np.sort(order[: args.train_images])
        if args.signatures:
            references = {}
            for domain in dict.fromkeys(c.domain for c in cards):
                references[domain] = domain_signature(domain, train.images[index], seed=0)
                log.info("reference signature of domain %s from %d training images", domain, len(index))
            change["references"] = references
        if args.store_calibration:
            # a random draw, not the first of the sorted index: a split stored class by class (leaves32)
            # gave one class, and the adaptive cards' reference statistics came from it
            change["calibration"] = train.images[np.sort(order[: args.store_calibration])]
    if args.router:
        from carddeck.eval.robustness import collect_runs, conditions_for, fit_router_on, generated_source

        val = load_dataset(args.data, "val")
        images, labels = val.images[: args.val_images], val.labels[: args.val_images]
        deck = Deck.open(store.root)  # the router reads the cards' outputs only: the new references do not matter
        runs = collect_runs(
            deck,
            conditions_for(corruptions, args.severities),
            generated_source(images, labels, seed=args.seed),
            desc="calibrate",
        )
        router = fit_router_on(deck, runs, batch_size=args.batch_size, max_cards=args.max_cards, cost=args.cost)
        change["router"] = router
        log.info(
            "calibrated router: %d calibration batches, %d candidate card sets",
            len(router.signatures),
            len(router.subsets),
        )
    if args.policy:
        change["policy"] = args.policy
    return change
