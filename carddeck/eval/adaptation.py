"""The served path with test-time adaptation, scored like the gate rows of ``carddeck eval``.

Per serving-sized batch of a condition: the gate routes it (a router fitted without the condition's
corruption, or its whole family, for the held-out rows); the shift signal tests it on what the
unadapted deck said (a detector without the held-out corruptions), as the server judges a request;
when the trigger fires on that verdict and the unadapted answer (:mod:`carddeck.serving.adaptation`),
the routed cards' adaptive variants (:mod:`carddeck.deck.adapt`) answer instead, each on that batch
alone, as the server runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np

from carddeck.deck.adapt import DEFAULT_PRIOR, build_adaptive
from carddeck.deck.deck import Deck, agreement_of, routed_rows
from carddeck.deck.runtime import CardSession, softmax
from carddeck.deck.store import DeckStore
from carddeck.eval.robustness import CLEAN, Condition, ConditionRun, EvalResult, Source, batches, route_run
from carddeck.gating.policies import Gate
from carddeck.gating.router import CalibratedRouter
from carddeck.gating.shift import ShiftDetector, Trust
from carddeck.serving.adaptation import Trigger


@dataclass
class AdaptiveCards:
    """The deck's cards' adaptive variants at one prior, with their outputs cached per batch (the
    same batch routed by several gates runs once)."""

    deck: Deck
    prior: float = DEFAULT_PRIOR
    sessions: dict[str, CardSession | None] = field(default_factory=dict)
    cache: dict[tuple[Condition, int, int, int], np.ndarray | None] = field(default_factory=dict)

    def session(self, name: str) -> CardSession | None:
        if self.prior == DEFAULT_PRIOR:
            return self.deck.adaptive_session(name)
        if name not in self.sessions:
            store = self.deck.store or DeckStore(self.deck.root)
            images = store.calibration_images()
            model = (
                None
                if images is None
                else build_adaptive(
                    store.read_model(store.manifest().find(name)), self.deck.prepare(images), self.prior
                )
            )
            plain = self.deck.adaptive_session(name)  # for its provider and thread settings
            self.sessions[name] = None if model is None or plain is None else CardSession(
                model, key=plain.key, digest=plain.digest, providers=plain.providers,
                intra_op_threads=plain.intra_op_threads,
            )  # fmt: skip
        return self.sessions[name]

    def probabilities(self, condition: Condition, rows: slice, k: int, x: np.ndarray) -> np.ndarray | None:
        """Card ``k``'s adaptive probabilities on the batch ``x`` (``rows`` of the condition's images)."""
        key = (condition, rows.start, rows.stop, k)
        if key not in self.cache:
            session = self.session(self.deck.card_names[k])
            self.cache[key] = softmax(session.logits(x)) if session is not None else None
        return self.cache[key]


@dataclass
class AdaptiveScore:
    accuracy: dict[Condition, float]
    adapted: dict[Condition, float]  # share of batches that were adapted
    cards_per_image: float


def score_adaptive(
    deck: Deck,
    runs: Sequence[ConditionRun],
    source: Source,
    cards: AdaptiveCards,
    *,
    gate_for: Callable[[Condition], Gate],
    detector_for: Callable[[Condition], ShiftDetector | None],
    policy: str,
    batch_size: int,
    trigger: Trigger,
) -> AdaptiveScore:
    acc: dict[Condition, float] = {}
    adapted: dict[Condition, float] = {}
    counts = []
    for run in runs:
        x = deck.prepare(source(run.condition)[0])
        weights = route_run(gate_for(run.condition), run, policy, False, batch_size)
        mixed = np.einsum("nk,knc->nc", weights, run.probabilities)
        jobs = [(k, rows) for k, _, rows in routed_rows(weights, deck.card_names)]
        agreement = agreement_of(weights, jobs, [run.probabilities[k, rows] for k, rows in jobs], mixed)
        judge = served_verdicts(detector_for(run.condition))
        fired = []
        for sl in batches(len(run.labels), batch_size):
            xb = x[sl]
            verdict = judge(xb, mixed[sl], run.signatures[sl], agreement[sl]) if judge is not None else None
            go = trigger.fires_on(verdict, mixed[sl])
            fired.append(go)
            if not go:
                continue
            out = np.zeros_like(mixed[sl])
            for k in np.flatnonzero(weights[sl].max(axis=0) > 0):
                p = cards.probabilities(run.condition, sl, int(k), xb)
                out += weights[sl, k, None] * (p if p is not None else run.probabilities[k, sl])
            mixed[sl] = out
        acc[run.condition] = float((mixed.argmax(axis=1) == run.labels).mean())
        adapted[run.condition] = float(np.mean(fired))
        counts.append((weights > 0).sum(axis=1))
    return AdaptiveScore(acc, adapted, float(np.concatenate(counts).mean()))


def served_verdicts(detector: ShiftDetector | None) -> Callable[..., Trust] | None:
    """One request's verdict as the server computes it (a :class:`ShiftMonitor` with the server's settings:
    a request of ``min_batch`` images or more is tested on its own, on that many evenly spaced images)."""
    if detector is None:
        return None
    from carddeck.observability.shift import ShiftMonitor

    monitor = ShiftMonitor()
    monitor.set_detector(detector)

    def judge(x: np.ndarray, probabilities: np.ndarray, gate_features: np.ndarray, agreement: np.ndarray) -> Trust:
        return monitor.judge([("eval", x, SimpleNamespace(features=gate_features), probabilities, agreement)])[0]

    return judge


def held_out_detector(detector: ShiftDetector | None, corruptions: Sequence[str]) -> ShiftDetector | None:
    """The detector without the reference conditions of ``corruptions`` (it never saw them)."""
    for name in corruptions:
        detector = detector.without(name) if detector is not None else None
    return detector


def held_out_gate(gate: Gate, routers: dict[str, CalibratedRouter], key: str) -> Gate:
    return replace(gate, router=routers.get(key, gate.router))


def deck_detector(deck: Deck) -> ShiftDetector | None:
    """The deck's shift detector, as the server loads it (None: the deck has none for its cards). No
    background refit, as a server starts: its result would come after the eval, in a warning at exit."""
    from carddeck.observability.shift import ShiftLoader, ShiftMonitor

    monitor = ShiftMonitor()
    ShiftLoader(monitor, refit=False)(deck)
    return monitor.detector


def add_adaptive_rows(
    result: EvalResult,
    deck: Deck,
    runs: Sequence[ConditionRun],
    source: Source,
    *,
    router: CalibratedRouter | None,
    held_out: dict[str, CalibratedRouter] | None,
    family: dict[str, CalibratedRouter] | None,
    families: dict[str, Sequence[str]],
    trigger: Trigger | None = None,
    prior: float = DEFAULT_PRIOR,
) -> None:
    """``adaptive`` (the default policy with the deck's router, then adaptation where it triggers), and
    the same with each corruption, or its whole family, held out of the router and the detector."""
    if deck.gate is None:
        return
    trigger = trigger or Trigger()
    detector = deck_detector(deck)
    gate = replace(deck.gate, router=router) if router is not None else deck.gate
    cards = AdaptiveCards(deck, prior)
    family_of = {c: tuple(members) for members in families.values() for c in members}
    rows = {"adaptive": ({}, lambda name: ())}
    if held_out:
        rows["adaptive/held-out"] = (held_out, lambda name: (name,))
    if family:
        rows["adaptive/held-out-family"] = (family, lambda name: family_of.get(name, (name,)))
    fired = {}
    for method, (routers, unseen) in rows.items():
        score = score_adaptive(
            deck,
            runs,
            source,
            cards,
            gate_for=lambda c, routers=routers: held_out_gate(gate, routers, c[0]),
            detector_for=lambda c, unseen=unseen: held_out_detector(detector, unseen(c[0])),
            policy=deck.default_policy,
            batch_size=result.batch_size,
            trigger=trigger,
        )
        result.accuracy[method] = score.accuracy
        result.cards_per_image[method] = score.cards_per_image
        fired[method] = score.adapted
    shifted = [c for c in result.corrupted]
    adapted = fired.get("adaptive/held-out", fired["adaptive"])
    result.notes["adaptation"] = (
        f"adaptive*: the default policy ({deck.default_policy}), then the routed cards' adaptive variants "
        f"(prior N={prior:g}) on batches of at least {trigger.min_batch} that the shift signal calls "
        f"{' or '.join(trigger.states or ('anything',))}; adapted {100 * adapted.get(CLEAN, 0.0):.1f}% of clean "
        f"and {100 * np.mean([adapted[c] for c in shifted]):.1f}% of corrupted test batches"
        + (
            ""
            if detector is not None
            else " (the deck has no shift detector for its cards: nothing was adapted; fit one with "
            "`carddeck shift --deck DIR --fit`)"
        )
    )


__all__ = [
    "AdaptiveCards",
    "AdaptiveScore",
    "add_adaptive_rows",
    "deck_detector",
    "held_out_detector",
    "held_out_gate",
    "score_adaptive",
    "served_verdicts",
]
