"""What the shift signal costs next to the Predict it watches, on a deck (default: the default deck),
fed test images of the dataset its cards were trained on.

Measures, in the same run: ``Deck.predict`` on a 64-image request (route + the selected cards +
combine) and the shift monitor's work on that request (features of 16 evenly spaced images, the
MMD statistics against every reference condition, the state and the expected accuracy, and the
cards' agreement per image that ``Deck.predict`` computes for it), and a window test of 32
single-image requests. Target (issue 17): the detector under 1% of the Predict.

    python benchmarks/bench_shift.py [--deck models] [--batch 64] [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carddeck.data.datasets import data_for_cards, load_dataset
from carddeck.deck import Deck
from carddeck.deck.deck import agreement_of, routed_rows
from carddeck.observability.shift import ShiftLoader, ShiftMonitor


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs (after one warm-up)."""
    fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def agreement_work(deck: Deck, images) -> Callable[[], object]:
    """The cards' agreement of one request as ``Deck.predict`` computes it (its share of the verdict's cost)."""
    p = deck.predict(images)
    jobs = [(k, rows) for k, _, rows in routed_rows(p.routing.weights, deck.card_names)]
    probs = [deck.run_card(deck.card_names[k], images[rows]) for k, rows in jobs]
    return lambda: agreement_of(p.routing.weights, jobs, probs, p.probabilities)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deck", default=str(Path(__file__).resolve().parents[1] / "models"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    deck = Deck.open(args.deck)
    monitor = ShiftMonitor(window=32, stride=8)  # the server's defaults
    ShiftLoader(monitor, refit=False)(deck)  # the stored detector only
    if monitor.detector is None:
        print(f"deck {args.deck} has no shift detector: run `carddeck shift --deck {args.deck} --fit`")
        return 1
    data = data_for_cards(None, [c.provenance.dataset for c in deck.cards], f"deck {args.deck}")
    images = load_dataset(data, "test").images[: args.batch]  # the deck's own kind of traffic
    x = deck.prepare(images)
    prediction = deck.predict(images)
    probs, sigs, agree = prediction.probabilities, prediction.routing.features, prediction.agreement
    singles = [deck.predict(images[i : i + 1]) for i in range(32)]  # each routed on its own, as served
    agree_batch, agree_one = agreement_work(deck, images), agreement_work(deck, images[:1])

    predict = timed(lambda: deck.predict(images), args.repeats)
    batch = timed(lambda: monitor.observe("m", x, probs, sigs, agree), args.repeats)
    batch += timed(agree_batch, args.repeats)
    for i, p in enumerate(singles):  # fill the window
        monitor.observe("w", x[i : i + 1], p.probabilities, p.routing.features, p.agreement)

    def eight_singles() -> None:  # features of each; one window test (every 8th request)
        for i, p in enumerate(singles[:8]):
            monitor.observe("w", x[i : i + 1], p.probabilities, p.routing.features, p.agreement)

    window = timed(eight_singles, args.repeats) / 8 + timed(agree_one, args.repeats)
    single = timed(lambda: deck.predict(images[:1]), args.repeats)
    print(f"Predict, {args.batch} images:                 {1e3 * predict:8.3f} ms")
    print(f"shift monitor on that request (batch):  {1e3 * batch:8.3f} ms  = {100 * batch / predict:.2f}% of it")
    print(f"Predict, 1 image:                       {1e3 * single:8.3f} ms")
    print(f"shift monitor per 1-image request:      {1e3 * window:8.3f} ms  = {100 * window / single:.2f}% of it")
    print("  (its features and the cards' agreement, and every 8th request a test of the 32-image window: the")
    print("  server's defaults)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
