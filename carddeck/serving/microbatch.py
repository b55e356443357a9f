"""One micro-batch's run: the requests' prepared images merged, routed, run through the cards, split back.

The caller's thread turns a request into :class:`Work` (its images checked and prepared, its policy
name checked) so that bad input fails its own request, never a merged batch. The rest is paid once
per micro-batch (:class:`MicroBatchRun`): one ``sample_features`` call over all the requests' rows,
one policy call per policy (policies decide row by row, so one client's images never change another's
routing), each card run once on the rows routed to it, each request given back its own rows and
routing, and the verdicts and listeners (:mod:`carddeck.serving.verdicts`) told about all at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from carddeck.deck import Deck
from carddeck.errors import InvalidInput
from carddeck.gating import POLICIES, Routing
from carddeck.gating.shift import Trust
from carddeck.gating.signature import sample_features
from carddeck.serving.models import Model
from carddeck.serving.stats import Statistics
from carddeck.serving.verdicts import RoutedRequest, Verdicts


@dataclass(slots=True)  # made per request: a frozen init costs several times more
class Work:
    deck: Deck
    x: np.ndarray  # prepared float32 [n, C, H, W]
    weights: np.ndarray | None  # [n, K] in deck.card_names order; None: routed with the batch
    policy: str = ""
    per_sample: bool = False
    model: str = ""  # the model name it was asked under (on_predict listeners, execution counts)


@dataclass(slots=True)
class Done:
    probabilities: np.ndarray
    queued_s: float
    compute_s: float
    routing: Routing | None = None
    verdict: Trust | None = None
    adapted: bool = False


def deck_work(model: Model, images: np.ndarray, policy: str | None, per_sample: bool) -> Work:
    """A request to the gated deck, on ``model``'s snapshot (the one it finishes on)."""
    deck = model.deck
    x = deck.prepare(images)
    policy = policy or deck.default_policy
    POLICIES.get(policy)  # a bad name fails its own request here, not a merged batch
    return Work(deck, x, None, policy, per_sample, model.name)


def card_work(model: Model, images: np.ndarray) -> Work:
    """A request to one card, no gate: all of its rows go to that card."""
    deck = model.deck
    if model.card is None:
        raise InvalidInput(f"model {model.name!r} is the gated deck, not a card")
    k = deck.card_index(model.card.name)
    x = deck.prepare(images)
    weights = np.zeros((len(x), len(deck.cards)), np.float32)
    weights[:, k] = 1.0
    return Work(deck, x, weights, model=model.name)


@dataclass(slots=True)
class Routed:
    """A micro-batch between its stages (:meth:`MicroBatchRun.route_and_run`): the requests' indices per deck
    snapshot, each routed request's routing, and per request its probabilities and the cards' agreement."""

    works: list[Work]
    groups: list[list[int]]
    routings: dict[int, Routing]
    out: dict[int, np.ndarray]
    agreements: dict[int, np.ndarray]
    compute_s: float  # the gate's and the cards' time


class MicroBatchRun:
    """``run(works) -> dones``, the function the micro-batcher calls (and a request alone, in its own thread);
    also in two stages, ``judge(route_and_run(works))``, so that a pipelined batcher
    (:mod:`carddeck.serving.batching`) judges a micro-batch while the next one is gated and run."""

    def __init__(self, verdicts: Verdicts, statistics: Statistics) -> None:
        self.verdicts = verdicts
        self.statistics = statistics

    def __call__(self, works: list[Work]) -> list[Done]:
        return self.judge(self.route_and_run(works))

    def route_and_run(self, works: list[Work]) -> Routed:
        """Group by snapshot, route every request on its own rows (one features call, one policy call per
        policy), run each card once over the merged rows, split back."""
        t0 = time.monotonic()
        out: dict[int, np.ndarray] = {}
        agreements: dict[int, np.ndarray] = {}
        routings: dict[int, Routing] = {}
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(works):
            groups.setdefault(id(w.deck), []).append(i)
        on_card = self.verdicts.on_card
        for idx in groups.values():
            deck = works[idx[0]].deck
            x = works[idx[0]].x if len(idx) == 1 else merge_rows([works[i].x for i in idx])
            routings.update(_route(deck, {i: works[i] for i in idx if works[i].weights is None}, x, len(idx)))
            weights = [_weights_of(works[i], routings.get(i)) for i in idx]
            agreement = np.empty(len(x), np.float32)
            probs = deck.run_routed(
                x, weights[0] if len(idx) == 1 else merge_rows(weights), on_card=on_card, agreement=agreement
            )
            offset = 0
            for i in idx:
                n = len(works[i].x)
                out[i], agreements[i] = probs[offset : offset + n], agreement[offset : offset + n]
                offset += n
        return Routed(works, list(groups.values()), routings, out, agreements, time.monotonic() - t0)

    def judge(self, routed: Routed) -> list[Done]:
        t0 = time.monotonic()
        works, routings, out, agreements = routed.works, routed.routings, routed.out, routed.agreements
        predicted = {
            i: RoutedRequest(w.model, w.x, routings[i], out[i], agreements[i])
            for i, w in enumerate(works)
            if i in routings
        }
        verdicts: dict[int, Trust] = {}
        for idx in routed.groups:  # judged by a detector fitted for the cards they ran on (a swap may lag)
            mine = [i for i in idx if i in predicted]
            cards = works[idx[0]].deck.card_keys
            verdicts.update(zip(mine, self.verdicts.of([predicted[i] for i in mine], cards)))
        # the verdict and the listeners (the shift signal) see the unadapted answer, the one its reference
        # conditions were measured on; a request the trigger fires on is then answered adapted
        adapted = {
            i: a
            for i, request in predicted.items()
            if (a := self.verdicts.adapted(works[i].deck, request, verdicts.get(i))) is not None
        }
        compute = routed.compute_s + time.monotonic() - t0  # not the wait between the stages
        self._count_execution(works, compute)
        self.verdicts.observe(list(predicted.values()))
        return [
            Done(adapted.get(i, out[i]), 0.0, compute, routings.get(i), verdicts.get(i), i in adapted)
            for i in range(len(works))
        ]

    def _count_execution(self, works: list[Work], compute_s: float) -> None:
        """One execution for each model in the batch, with its images (Triton's exec and inference counts)."""
        images: dict[str, int] = {}
        for w in works:
            images[w.model] = images.get(w.model, 0) + len(w.x)
        metrics = self.verdicts.metrics
        for model, n in images.items():
            self.statistics.record_execution(model, n, compute_s)
            if metrics is not None:
                metrics.observe_execution(model, n)


def merge_rows(parts: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts)`` (along rows; one dtype, one row shape), copied without releasing the GIL.

    numpy releases the GIL to copy an array of 500 elements or more (one 32x32 image: 3,072). In a server whose
    many handler threads queue for the GIL, each release cost the batch thread a wait to take it back, while
    no card ran: merging 10-12 one-image requests this way took 3-5 ms of a 14-19 ms batch (b1/c32, one
    card, 2 cores, session 11), against 0.06 ms for the same bytes copied here, under the GIL."""
    first = parts[0]
    if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in parts):
        return np.concatenate(parts)  # mixed inputs: numpy's casting rules (never from a batch of prepared work)
    out = np.empty((sum(len(p) for p in parts), *first.shape[1:]), first.dtype)
    if not out.size:
        return out
    flat, offset = out.data.cast("B"), 0
    for p in parts:
        if not p.size:
            continue
        raw = np.ascontiguousarray(p).data.cast("B")
        flat[offset : offset + raw.nbytes] = raw
        offset += raw.nbytes
    return out


def _weights_of(work: Work, routing: Routing | None) -> np.ndarray:
    if work.weights is not None:
        return work.weights
    assert routing is not None
    return routing.weights


def _route(deck: Deck, works: dict[int, Work], merged: np.ndarray, group: int) -> dict[int, Routing]:
    """Each request's routing on its own rows: one ``sample_features`` call over all of them, one
    policy call per (policy, per-sample) pair (:meth:`~carddeck.gating.Gate.route_many`). ``merged``: the
    rows of the ``group`` requests on this snapshot, in order; when all of them are routed here, those are
    the rows, not copied again."""
    if not works:
        return {}
    items = list(works.items())
    xs = [w.x for _, w in items]
    features = sample_features(merged if len(xs) == group else np.concatenate(xs))
    bounds = np.cumsum([0, *(len(x) for x in xs)]).tolist()
    by_policy: dict[tuple[str, bool], list[int]] = {}
    for j, (_, w) in enumerate(items):
        by_policy.setdefault((w.policy, w.per_sample), []).append(j)
    out: dict[int, Routing] = {}
    for (policy, per_sample), js in by_policy.items():
        rows = features if len(js) == len(items) else np.concatenate([features[bounds[j] : bounds[j + 1]] for j in js])
        sizes = [bounds[j + 1] - bounds[j] for j in js]
        for j, routing in zip(js, deck.route_features(rows, sizes, policy=policy, per_sample=per_sample)):
            out[items[j][0]] = routing
    return out


__all__ = ["Done", "MicroBatchRun", "Routed", "Work", "card_work", "deck_work", "merge_rows"]
