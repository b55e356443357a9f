"""Where the calibrated router is unsure, what should the default policy fall back to? Measured on val.

Each corruption, and each corruption family, is held out of a router fitted on the other validation
conditions; the held-out conditions' validation batches are then routed by the guarded policy, with
batches farther than ``tau`` kernel bandwidths from every calibration batch (the router's
``novelty``) sent instead to a fallback: the hedge (half the router's choice, a quarter the nearest
domain's cards, a quarter the uniform deck), the paper's nearest-domain gate, the uniform mix of the
cards good on clean data, or the whole uniform deck. All five severities by default: the served
router is fitted on all five, and the density of its calibration batches sets the kernel bandwidth.
Printed per (fallback, tau): held-out accuracy against the uniform deck (mean; the worst corruption;
corruptions more than 0.5 below), and how often the fallback fires on the conditions the router was
fitted on and on clean batches.

    python benchmarks/bench_fallback.py [--deck models] [--cache runs.pkl] [--taus 4,6,8,10,12,inf]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_adapt import val_runs

from carddeck.commands.cli import comma_ints
from carddeck.data.corruptions import FAMILIES
from carddeck.data.datasets import data_for_cards
from carddeck.deck import Deck
from carddeck.eval.robustness import CLEAN, batches, fit_router_on
from carddeck.gating.policies import Gate, fallback


def fallback_weights(gate: Gate, kind: str, sig: np.ndarray) -> np.ndarray:
    """[K] weights of a fallback for one batch signature (normalised)."""
    distances = gate.route_signatures(sig[None], policy="nearest-domain", per_sample=False, batch_size=1).distances
    w = fallback(gate, sig[None], distances, kind)[0]
    return w / w.sum()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deck", default=str(Path(__file__).resolve().parents[1] / "models"))
    parser.add_argument("--cache", default="")
    parser.add_argument("--severities", type=comma_ints, default=[1, 2, 3, 4, 5])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--taus", default="4,6,8,10,12,inf")
    args = parser.parse_args()
    deck = Deck.open(args.deck)
    assert deck.gate is not None
    data = data_for_cards(None, [c.provenance.dataset for c in deck.cards], f"deck {args.deck}")
    runs, _ = val_runs(args, deck, data)
    taus = [float(t) for t in args.taus.split(",")]
    kinds = ("hedge", "clean-cards", "nearest-domain", "uniform")
    groups = {**{c: (c,) for c in dict.fromkeys(r.condition[0] for r in runs if r.condition != CLEAN)}, **FAMILIES}
    # per group: for each held-out batch, (corruption, novelty, correct counts of guarded, fallbacks, uniform, n)
    held: list[tuple[str, str, float, dict[str, int], int]] = []
    familiar_novelty: list[float] = []
    for members in groups.values():
        router = fit_router_on(deck, [r for r in runs if r.condition[0] not in members], batch_size=args.batch_size)
        gate = replace(deck.gate, router=router)
        for run in runs:
            for sl in batches(len(run.labels), args.batch_size):
                sig = run.signatures[sl].mean(axis=0)
                novelty = float(router.novelty(sig[None])[0])
                if run.condition[0] not in members:
                    if len(members) == 1:  # each familiar batch counted once
                        familiar_novelty.append(novelty)
                    continue
                guarded = router.weights(sig[None], gate.keys, guard=True)[0]  # the guarded policy without a fallback
                options = {"guarded": guarded, **{k: fallback_weights(gate, k, sig) for k in kinds}}
                correct = {
                    name: int((np.einsum("k,knc->nc", w, run.probabilities[:, sl]).argmax(1) == run.labels[sl]).sum())
                    for name, w in options.items()
                }
                kind = "family" if len(members) > 1 else "corruption"
                held.append((kind, run.condition[0], novelty, correct, sl.stop - sl.start))
    print(f"deck {args.deck}: {len(runs)} val conditions, batches of {args.batch_size}")
    head = "held out | fallback | tau | mean - uniform | worst - uniform | below -0.5 | fires held-out | fires familiar"
    print(f"| {head} |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("corruption", "family"):
        rows = [h for h in held if h[0] == kind]
        names = list(dict.fromkeys(h[1] for h in rows))
        for fb in kinds:
            for tau in taus:
                per = {}
                for name in names:
                    mine = [h for h in rows if h[1] == name]
                    n = sum(h[4] for h in mine)
                    got = sum(h[3][fb] if h[2] > tau else h[3]["guarded"] for h in mine) / n
                    per[name] = 100 * (got - sum(h[3]["uniform"] for h in mine) / n)
                worst = min(per, key=per.__getitem__)
                fires = np.mean([h[2] > tau for h in rows])
                print(
                    f"| {kind} | {fb} | {tau:g} | {np.mean(list(per.values())):+.2f} | {worst} {per[worst]:+.1f} "
                    f"| {sum(v < -0.5 for v in per.values())} | {100 * fires:.0f}% "
                    f"| {100 * np.mean(np.array(familiar_novelty) > tau):.0f}% |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
