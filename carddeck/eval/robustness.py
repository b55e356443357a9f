"""Robustness evaluation of a deck: every card, the uniform deck, each gate policy and the oracle.

Each card runs once per condition (clean, or a corruption at a severity) on the test images; every
policy is then scored from those cached probabilities and the routing weights it produces for
serving-sized batches (``batch_size``), so adding a policy costs no extra inference and every
method sees exactly the same corrupted images. Two oracles bound what a gate could reach, knowing
the test labels: ``oracle`` takes the best single card per condition, ``set-oracle`` the best set
of at most half the cards (predictions averaged), the sets the calibrated router chooses among.
Anything fitted (the calibrated router) uses the validation split, corrupted with a different seed;
reported numbers come from the test split only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from carddeck.deck.deck import Deck
from carddeck.errors import InvalidInput
from carddeck.gating.policies import Gate, Routing, combine_weights
from carddeck.gating.router import CalibratedRouter, CalibrationPoint, candidate_subsets, fit_router
from carddeck.gating.signature import sample_features

log = logging.getLogger(__name__)

CLEAN = ("clean", 0)
GATE_POLICIES = ("nearest-domain", "top-k", "soft", "calibrated", "guarded")
ROUTER_POLICIES = ("calibrated", "guarded")  # need a fitted router
# Conditions are (corruption, severity); severity 0 is the clean images.
Condition = tuple[str, int]
# A source of test images for a condition: -> (images uint8 NHWC, labels int64)
Source = Callable[[Condition], tuple[np.ndarray, np.ndarray]]


@dataclass
class ConditionRun:
    """What every card said about one condition's images, and their signatures."""

    condition: Condition
    labels: np.ndarray  # [n]
    probabilities: np.ndarray  # [K, n, C]
    signatures: np.ndarray  # [n, D] per-sample features (batch signatures are their batch means)


@dataclass
class EvalResult:
    cards: tuple[str, ...]
    conditions: tuple[Condition, ...]
    accuracy: dict[str, dict[Condition, float]]  # method -> condition -> accuracy
    cards_per_image: dict[str, float]  # method -> mean number of cards run per image (all conditions)
    batch_size: int
    notes: dict[str, Any] = field(default_factory=dict)
    # method -> {"aurc", "coverage" [...], "risk" [...]}: selective prediction on the corrupted conditions
    selective: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def corrupted(self) -> tuple[Condition, ...]:
        return tuple(c for c in self.conditions if c != CLEAN)

    def clean(self, method: str) -> float | None:
        return self.accuracy[method].get(CLEAN)

    def mean_corrupted(self, method: str) -> float:
        return float(np.mean([self.accuracy[method][c] for c in self.corrupted]))

    def per_corruption(self, method: str) -> dict[str, float]:
        names = dict.fromkeys(c for c, _ in self.corrupted)
        return {n: float(np.mean([a for (c, _), a in self.accuracy[method].items() if c == n])) for n in names}

    @property
    def methods(self) -> list[str]:
        return list(self.accuracy)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cards": list(self.cards),
            "batch_size": self.batch_size,
            "notes": self.notes,
            "conditions": [f"{c}/{s}" for c, s in self.conditions],
            "methods": {
                m: {
                    "clean": self.clean(m),
                    "mean_corrupted": self.mean_corrupted(m) if self.corrupted else None,
                    "cards_per_image": self.cards_per_image.get(m),
                    "per_corruption": self.per_corruption(m),
                    "per_condition": {f"{c}/{s}": a for (c, s), a in self.accuracy[m].items()},
                }
                for m in self.methods
            },
            "selective": self.selective,
        }


def risk_coverage(risk: np.ndarray, wrong: np.ndarray, points: int = 21) -> dict[str, Any]:
    """Selective prediction (Geifman & El-Yaniv): answer the images of lowest estimated risk first; the
    error among the answered images at each coverage, and its area (AURC, the mean over all coverages)."""
    order = np.argsort(risk, kind="stable")
    errors = np.cumsum(wrong[order]) / np.arange(1, len(order) + 1)
    at = np.linspace(0, len(order) - 1, points).round().astype(int)
    return {"aurc": float(errors.mean()), "coverage": ((at + 1) / len(order)).tolist(), "risk": errors[at].tolist()}


def run_condition(deck: Deck, condition: Condition, images: np.ndarray, labels: np.ndarray) -> ConditionRun:
    chunk = 512  # bounds memory on large test sets
    probs = np.stack(
        [
            np.concatenate([deck.run_card(name, images[i : i + chunk]) for i in range(0, len(images), chunk)])
            for name in deck.card_names
        ]
    )
    return ConditionRun(condition, np.asarray(labels, np.int64), probs, sample_features(images))


def batches(n: int, size: int) -> Iterable[slice]:
    return (slice(i, min(i + size, n)) for i in range(0, n, size))


def route_run(gate: Gate, run: ConditionRun, policy: str, per_sample: bool, batch_size: int) -> np.ndarray:
    """Routing weights [n, K] for one condition, in serving-sized batches."""
    out = []
    for sl in batches(len(run.labels), batch_size):
        sigs = run.signatures[sl] if per_sample else run.signatures[sl].mean(axis=0, keepdims=True)
        r: Routing = gate.route_signatures(sigs, policy=policy, per_sample=per_sample, batch_size=sl.stop - sl.start)
        out.append(r.weights)
    return np.concatenate(out)


def calibration_points(runs: Sequence[ConditionRun], batch_size: int) -> list[CalibrationPoint]:
    points = []
    for run in runs:
        for sl in batches(len(run.labels), batch_size):
            points.append(
                CalibrationPoint(
                    run.signatures[sl].mean(axis=0),
                    run.probabilities[:, sl],
                    run.labels[sl],
                    tag=f"{run.condition[0]}/{run.condition[1]}",
                )
            )
    return points


def held_out_routers(
    deck: Deck, runs: Sequence[ConditionRun], groups: dict[str, Sequence[str]] | None = None, **fit: Any
) -> dict[str, CalibratedRouter]:
    """For each corruption in ``runs``, a router fitted on the other conditions only; with ``groups``
    (e.g. the corruption families), on the conditions outside the corruption's whole group."""
    names = dict.fromkeys(r.condition[0] for r in runs if r.condition != CLEAN)
    out: dict[str, CalibratedRouter] = {}
    for members in groups.values() if groups else ([n] for n in names):
        held = [n for n in members if n in names]
        if held:
            router = fit_router_on(deck, [r for r in runs if r.condition[0] not in held], **fit)
            out.update(dict.fromkeys(held, router))
    return out


def fit_router_on(
    deck: Deck,
    runs: Sequence[ConditionRun],
    *,
    batch_size: int,
    max_cards: int | None = None,
    cost: float = 0.0,
    metric: str | None = None,
) -> CalibratedRouter:
    """The calibrated router from validation runs (one calibration point per serving batch)."""
    gate = deck.gate
    if gate is None:
        raise InvalidInput("the deck has no cards")
    return fit_router(
        calibration_points(runs, batch_size),
        gate.keys,
        max_cards=max_cards,
        metric=metric or gate.params.metric,
        cost=cost,
    )


def evaluate(
    deck: Deck,
    runs: Sequence[ConditionRun],
    *,
    router: CalibratedRouter | None,
    batch_size: int = 64,
    policies: Sequence[str] = GATE_POLICIES,
    per_sample: bool = True,
    metric: str | None = None,
    held_out_routers: dict[str, CalibratedRouter] | None = None,
    family_routers: dict[str, CalibratedRouter] | None = None,
) -> EvalResult:
    """Score every card, the uniform deck, each policy (per batch, and per sample if asked) and the oracle.

    ``held_out_routers`` (corruption -> a router fitted without that corruption) adds the row
    ``calibrated/held-out``: each corruption routed by a router that never saw it (a harder test of
    the calibrated gate than the same corruptions on other images); ``family_routers`` (corruption ->
    a router fitted without its whole family) adds ``*/held-out-family``.
    """
    from dataclasses import replace

    if deck.gate is None or not runs:
        raise InvalidInput("nothing to evaluate: the deck has no cards or there are no conditions")
    gate = replace(deck.gate, router=router) if router is not None else deck.gate
    if metric is not None:  # compare distances on the same runs
        gate = replace(gate, params=replace(gate.params, metric=metric))
    names = deck.card_names
    acc: dict[str, dict[Condition, float]] = {}
    per_image: dict[str, float] = {}
    conditions = tuple(r.condition for r in runs)

    selective: dict[str, dict[str, Any]] = {}

    def score(method: str, weights_of: Callable[[ConditionRun], np.ndarray], combine: str = "mean") -> None:
        acc[method], counts, msp, wrong = {}, [], [], []
        for run in runs:
            w = weights_of(run)  # [n, K]
            mixed = np.einsum("nk,knc->nc", combine_weights(w, run.probabilities, combine), run.probabilities)
            acc[method][run.condition] = float((mixed.argmax(axis=1) == run.labels).mean())
            counts.append((w > 0).sum(axis=1))
            if run.condition != CLEAN:
                msp.append(mixed.max(axis=1))
                wrong.append(mixed.argmax(axis=1) != run.labels)
        per_image[method] = float(np.concatenate(counts).mean())
        if msp and not method.startswith("card:"):  # risk = 1 - max softmax, the served risk estimate
            selective[method] = risk_coverage(1 - np.concatenate(msp), np.concatenate(wrong))

    def single(k: int) -> Callable[[ConditionRun], np.ndarray]:
        return lambda run: np.eye(len(names), dtype=np.float32)[np.full(len(run.labels), k)]

    def routed(policy: str, per_sample: bool) -> Callable[[ConditionRun], np.ndarray]:
        return lambda run: route_run(gate, run, policy, per_sample, batch_size)

    for k, name in enumerate(names):
        score(f"card:{name}", single(k))

    def uniform(run: ConditionRun) -> np.ndarray:
        return np.full((len(run.labels), len(names)), 1.0 / len(names), np.float32)

    score("uniform", uniform)
    for policy in policies:
        if policy in ROUTER_POLICIES and gate.router is None:
            continue
        score(policy, routed(policy, False))
        if per_sample:
            score(f"{policy}/per-sample", routed(policy, True))
    # confidence-weighted mixing of the same routing (see combine_weights), where several cards run
    score("uniform/confidence", uniform, "confidence")
    for policy in (p for p in policies if p in ROUTER_POLICIES and gate.router is not None):
        score(f"{policy}/confidence", routed(policy, False), "confidence")
    for suffix, routers in (("held-out", held_out_routers), ("held-out-family", family_routers)):
        if not routers or gate.router is None:
            continue
        for policy in (p for p in policies if p in ROUTER_POLICIES):

            def held_out(
                run: ConditionRun, policy: str = policy, routers: dict[str, CalibratedRouter] = routers
            ) -> np.ndarray:
                r = routers.get(run.condition[0], gate.router)  # clean: the full router
                return route_run(replace(gate, router=r), run, policy, False, batch_size)

            score(f"{policy}/{suffix}", held_out)
    acc["oracle"] = {c: max(acc[f"card:{n}"][c] for n in names) for c in conditions}
    per_image["oracle"] = 1.0
    acc["set-oracle"], per_image["set-oracle"] = set_oracle(runs, max(1, len(names) // 2))
    return EvalResult(names, conditions, acc, per_image, batch_size, selective=selective)


def set_oracle(runs: Sequence[ConditionRun], max_cards: int) -> tuple[dict[Condition, float], float]:
    """Per condition, the accuracy of the best set of at most ``max_cards`` cards (equal weights),
    and the mean set size per image. Sets come smallest first, so ties go to fewer cards; the
    singletons are among them, so this is never below the single-card oracle."""
    subsets = candidate_subsets(runs[0].probabilities.shape[0], max_cards)
    weights = subsets / subsets.sum(axis=1, keepdims=True).astype(np.float32)
    acc: dict[Condition, float] = {}
    sizes = []
    for run in runs:
        mixed = np.einsum("sk,knc->snc", weights, run.probabilities)
        scores = (mixed.argmax(axis=2) == run.labels[None, :]).mean(axis=1)
        best = int(np.argmax(scores))
        acc[run.condition] = float(scores[best])
        sizes.append(np.full(len(run.labels), subsets[best].sum()))
    return acc, float(np.concatenate(sizes).mean())


# -- where the images come from ----------------------------------------------------------------
def generated_source(images: np.ndarray, labels: np.ndarray, *, seed: int) -> Source:
    """Corrupt ``images`` on the fly with :func:`carddeck.data.corruptions.corrupt`."""
    from carddeck.data.corruptions import corrupt

    def get(condition: Condition) -> tuple[np.ndarray, np.ndarray]:
        name, severity = condition
        if condition == CLEAN:
            return images, labels
        return corrupt(images, name, severity, seed=seed), labels

    return get


def suite_source(clean_images: np.ndarray, clean_labels: np.ndarray, suite: Any, limit: int | None) -> Source:
    """A stored corrupted suite (CIFAR-10-C layout) for corruptions, ``clean_*`` for the clean condition."""

    def get(condition: Condition) -> tuple[np.ndarray, np.ndarray]:
        if condition == CLEAN:
            return clean_images, clean_labels
        data = suite.get(*condition)
        return data.images[:limit], data.labels[:limit]

    return get


def collect_runs(
    deck: Deck, conditions: Sequence[Condition], source: Source, *, desc: str = "eval"
) -> list[ConditionRun]:
    """Run every card on every condition's images (progress bar when tqdm is installed)."""
    try:
        from tqdm import tqdm

        it: Iterable[Condition] = tqdm(conditions, desc=desc, unit="condition")
    except ImportError:  # tqdm is in the train extra
        it = conditions
    runs = []
    for condition in it:
        images, labels = source(condition)
        runs.append(run_condition(deck, condition, images, labels))
    return runs


def conditions_for(corruptions: Sequence[str], severities: Sequence[int], *, clean: bool = True) -> list[Condition]:
    return ([CLEAN] if clean else []) + [(c, s) for c in corruptions for s in severities]


__all__ = [
    "CLEAN",
    "GATE_POLICIES",
    "ConditionRun",
    "EvalResult",
    "collect_runs",
    "conditions_for",
    "evaluate",
    "fit_router_on",
    "generated_source",
    "held_out_routers",
    "risk_coverage",
    "route_run",
    "run_condition",
    "set_oracle",
    "suite_source",
]
