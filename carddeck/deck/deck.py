"""The Deck: an immutable snapshot of a deck store, ready to route, run and combine.

``Deck.open`` reads the manifest once and builds one ORT session per served card (reusing the
sessions of a previous snapshot for cards whose file hash did not change), so adding a card builds
a new snapshot next to the old one and in-flight requests finish on the one they started with.

``predict``: validate the images against the cards' input contract, route them through the gate,
run each selected card once on the rows routed to it, and combine the softmax probabilities with
the routing weights.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from carddeck.card import CardMeta, InputSpec
from carddeck.deck.contract import prepare_images
from carddeck.deck.runtime import CardSession, card_pool, choose_providers, cpu_cores, run_claimed, softmax
from carddeck.deck.store import MODEL_FILE, DeckStore, Manifest
from carddeck.errors import CardNotFound, InvalidInput, NotReady
from carddeck.gating.policies import DEFAULT_POLICY, POLICIES, Gate, GateParams, Routing, combine_weights
from carddeck.gating.shift import Trust

log = logging.getLogger(__name__)


def top_labels(probabilities: np.ndarray) -> np.ndarray:
    """The predicted class of each row: int64 [N]."""
    return probabilities.argmax(axis=1).astype(np.int64)


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # [N, C] float32
    routing: Routing
    verdict: Trust | None = None  # the server's verdict on it (carddeck.gating.shift.Trust); None offline
    adapted: bool = False  # answered by the cards' adaptive variants (carddeck.deck.adapt), on these images alone
    # per image, the share of its routing weight on cards whose top label is the deck's (NaN: one card answered);
    # the shift detector's evidence that a new shift leaves the answers standing (carddeck.gating.shift)
    agreement: np.ndarray | None = None
    labels: np.ndarray = field(init=False)  # [N] int64, from the probabilities

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", top_labels(self.probabilities))


class Deck:
    """Immutable: build a new one with ``Deck.open(root, previous=old)`` after the store changes."""

    def __init__(
        self,
        root: Path | str,
        manifest: Manifest,
        cards: tuple[CardMeta, ...],
        sessions: dict[str, CardSession],
        gate: Gate | None,
        default_policy: str,
        policy_note: str = "",
        store: DeckStore | None = None,
    ) -> None:
        self.root = root
        self.store = store  # where the snapshot came from: stored versions it does not serve are read there
        self.manifest = manifest
        self.version = manifest.version
        self.cards = cards
        self.card_keys = tuple(m.key for m in cards)  # what a shift detector must have been fitted for
        self._sessions = sessions  # by card name (a deck serves one version per name)
        self.gate = gate
        self.default_policy = default_policy
        self.policy_note = policy_note  # why default_policy is not the configured one ("" when it is)
        # adaptive variants (carddeck.deck.adapt), built on first use: by card name, None = not adaptable
        self._adaptive: dict[str, CardSession | None] = {}
        self._adaptive_lock = threading.Lock()

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: Path | str | DeckStore,
        *,
        previous: Deck | None = None,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        run_cards: bool = True,
        max_run_rows: int | None = None,
        spin: bool = False,
    ) -> Deck:
        """``run_cards=False``: no ORT session, only the gate and contract (for a front whose cards run elsewhere).
        ``max_run_rows``: the most images a card runs at once (larger batches go in slices; None: any).
        ``spin``: let ONNX Runtime's threads spin between runs (:class:`~carddeck.deck.runtime.CardSession`)."""
        store = root if isinstance(root, DeckStore) else DeckStore(root)  # a store object keeps its connection
        manifest = store.manifest()
        entries = manifest.active()
        metas = tuple(store.read_meta(e) for e in entries)
        chosen = choose_providers(providers)
        # default: one thread per session, runs cut into chunks across the cores (carddeck.deck.runtime)
        threads, row_chunks = (intra_op_threads, 1) if intra_op_threads else (1, cpu_cores())
        reuse = {s.digest: s for s in previous._sessions.values()} if previous is not None else {}
        sessions: dict[str, CardSession] = {}
        for entry in entries if run_cards else ():  # one at a time: ORT session creation is not parallel
            digest = entry.sha256.get(MODEL_FILE, "")
            old = reuse.get(digest)
            if old is not None and old.key == entry.key and old.max_rows == max_run_rows:
                sessions[entry.name] = old
                continue
            sessions[entry.name] = CardSession(
                store.read_model(entry),
                key=entry.key,
                digest=digest,
                providers=chosen,
                intra_op_threads=threads,
                max_rows=max_run_rows,
                spin=spin,
                row_chunks=row_chunks,
            )
        gate, policy, note = _load_gate(store, manifest, metas)
        log.info("deck %s version %d: %d cards, default policy %s", store.root, manifest.version, len(metas), policy)
        deck = cls(store.root, manifest, metas, sessions, gate, policy, note, store)
        if previous is not None and previous.manifest.calibration == manifest.calibration:
            for name, session in sessions.items():  # an unchanged card keeps its adaptive variant too
                if previous._sessions.get(name) is session and name in previous._adaptive:
                    deck._adaptive[name] = previous._adaptive[name]
        return deck

    @property
    def configured_policy(self) -> str:
        """The manifest's default policy (``default_policy`` differs when it cannot serve: see ``policy_note``)."""
        return str(self.manifest.gate.get("policy", DEFAULT_POLICY))

    # -- the contract -------------------------------------------------------------------------
    @property
    def class_names(self) -> tuple[str, ...]:
        return self.cards[0].class_names if self.cards else ()

    @property
    def input(self) -> InputSpec:
        if not self.cards:
            raise NotReady(f"deck {self.root} has no cards yet")
        return self.cards[0].input

    @property
    def card_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cards)

    def card(self, name: str, version: int | None = None) -> CardMeta:
        """The served card ``name``, or its stored ``version`` (served or not): the one lookup of a card by
        name (CardNotFound names the cards there are)."""
        if version is not None:
            entry = self.manifest.find(name, version)
            return (self.store or DeckStore(self.root)).read_meta(entry)
        for meta in self.cards:
            if meta.name == name:
                return meta
        raise CardNotFound.among(name, self.card_names)

    def card_index(self, name: str) -> int:
        """``name``'s column in routing weights (card order)."""
        return self.cards.index(self.card(name))

    def providers(self) -> dict[str, list[str]]:
        """The execution providers each card's session got."""
        return {name: s.providers for name, s in self._sessions.items()}

    def prepare(self, images: object) -> np.ndarray:
        return prepare_images(images, self.input)

    def _gate(self) -> Gate:
        if self.gate is None:
            raise NotReady(f"deck {self.root} has no cards yet")
        return self.gate

    def route(self, images: np.ndarray, *, policy: str | None = None, per_sample: bool = False) -> Routing:
        return self.route_prepared(self.prepare(images), policy=policy, per_sample=per_sample)

    def route_prepared(self, x: np.ndarray, *, policy: str | None = None, per_sample: bool = False) -> Routing:
        """:meth:`route` for images already checked by :meth:`prepare` (validation is a pass over the data)."""
        return self._gate().route(x, policy=policy or self.default_policy, per_sample=per_sample)

    def route_features(
        self, features: np.ndarray, sizes: Sequence[int], *, policy: str | None = None, per_sample: bool = False
    ) -> list[Routing]:
        """Several requests routed at once from the ``sample_features`` of their images, request after
        request, each on its own rows (:meth:`~carddeck.gating.Gate.route_many`)."""
        return self._gate().route_many(features, sizes, policy=policy or self.default_policy, per_sample=per_sample)

    def predict(self, images: np.ndarray, *, policy: str | None = None, per_sample: bool = False) -> Prediction:
        x = self.prepare(images)
        routing = self.route_prepared(x, policy=policy, per_sample=per_sample)
        agreement = np.empty(len(x), np.float32)
        return Prediction(self.run_routed(x, routing.weights, agreement=agreement), routing, agreement=agreement)

    def adaptive_session(self, name: str) -> CardSession | None:
        """Card ``name``'s adaptive variant (:mod:`carddeck.deck.adapt`: normalisation re-estimated on the
        batch it runs on), built on first use from the card's file and the deck's calibration images;
        None when the card has nothing to adapt or the deck stores no calibration images."""
        with self._adaptive_lock:
            if name not in self._adaptive:
                self._adaptive[name] = self._build_adaptive(name)
            return self._adaptive[name]

    def warm_adaptive(self) -> None:
        """Build every card's adaptive variant now (seconds per card), so the first shifted request need not."""
        for name in self.card_names:
            self.adaptive_session(name)

    @property
    def adaptive_ready(self) -> bool:
        """Every card's adaptive variant is built, and at least one card has one."""
        with self._adaptive_lock:
            built = [self._adaptive[n] for n in self.card_names if n in self._adaptive]
        return len(built) == len(self.card_names) and any(s is not None for s in built)

    def _build_adaptive(self, name: str) -> CardSession | None:
        from carddeck.deck.adapt import build_adaptive

        store = self.store or DeckStore(self.root)
        images = store.calibration_images()
        if images is None:
            log.warning("deck %s stores no calibration images: card %s is served unadapted", self.root, name)
            return None
        session = self._sessions[name]
        entry = self.manifest.find(name)
        model = build_adaptive(store.read_model(entry), self.prepare(images))
        if model is None:
            log.info("card %s has no normalised convolution to adapt", name)
            return None
        return CardSession(
            model,
            key=session.key,
            digest=session.digest,
            providers=session.providers,
            intra_op_threads=session.intra_op_threads,
        )

    def run_routed(
        self,
        x: np.ndarray,
        weights: np.ndarray,
        *,
        on_card: Callable[[str, float], None] | None = None,
        adapt: bool = False,
        agreement: np.ndarray | None = None,
    ) -> np.ndarray:
        """Run each card once on the rows ``weights`` [N, K] (columns in card order) give it; weighted mean
        of the probabilities.

        ``on_card(name, seconds)`` is told how long each card took (the server's per-card latency).
        ``adapt``: run the cards' adaptive variants (those that have one), whose normalisation statistics
        come from the rows they run on: pass one request's images only.
        ``agreement``: float32 [N] filled with the cards' agreement per image (:func:`mix`).
        """
        cards = [
            (k, rows, (self.adaptive_session(name) if adapt else None) or self._sessions[name], name)
            for k, name, rows in routed_rows(weights, self.card_names)
        ]
        subs = [x if len(rows) == len(x) else np.ascontiguousarray(x[rows]) for _, rows, _, _ in cards]
        # every card's chunks in one job list: one hand-off to the card pool per run, none per card
        jobs = [(c, span) for c, (_, rows, session, _) in enumerate(cards) for span in session.spans(len(rows))]

        def run(job: tuple[int, tuple[int, int]]) -> tuple[np.ndarray, float, float]:
            c, (lo, hi) = job
            t0 = time.perf_counter()
            return cards[c][2].logits(subs[c][lo:hi]), t0, time.perf_counter()

        runs = run_claimed(jobs, run, card_pool(), cpu_cores())  # this thread runs chunks too
        outputs = []
        for c, (_, _, _, name) in enumerate(cards):
            mine = [out for (card, _), out in zip(jobs, runs) if card == c]
            if on_card is not None:  # from its first chunk's start to its last one's end
                on_card(name, max(end for _, _, end in mine) - min(start for _, start, _ in mine))
            outputs.append(softmax(mine[0][0] if len(mine) == 1 else np.concatenate([lg for lg, _, _ in mine])))
        combine = self.gate.params.combine if self.gate is not None else "mean"
        mixed = [(k, rows) for k, rows, _, _ in cards]
        return mix(weights, mixed, outputs, len(self.class_names), combine=combine, agreement=agreement)

    def run_card(self, name: str, images: np.ndarray) -> np.ndarray:
        """Probabilities [N, C] from one card, no gate."""
        return softmax(self._sessions[self.card(name).name].logits(self.prepare(images)))


def routed_rows(weights: np.ndarray, card_names: Sequence[str]) -> list[tuple[int, str, np.ndarray]]:
    """(column, card name, rows) of each card ``weights`` [N, K] give at least one row: each runs once, on those."""
    routed = weights > 0
    if routed.all():  # every card on every row (the usual per-batch routing): no search
        every = all_rows(len(weights))
        return [(k, name, every) for k, name in enumerate(card_names)]
    return [(k, card_names[k], np.flatnonzero(routed[:, k])) for k in np.flatnonzero(routed.any(axis=0)).tolist()]


_rows = np.arange(64)
_rows.flags.writeable = False


def all_rows(n: int) -> np.ndarray:
    """``np.arange(n)``, read-only, from a cached array: ``np.arange`` releases the GIL to fill its array, and on the
    batch thread of a busy server every release is a wait to take it back while no card runs (session 11)."""
    global _rows
    if n > len(_rows):
        grown = np.arange(max(n, 2 * len(_rows)))
        grown.flags.writeable = False
        _rows = grown
    return _rows[:n]


def mix(
    weights: np.ndarray,
    jobs: Sequence[tuple[int, np.ndarray]],
    probabilities: Sequence[np.ndarray],
    num_classes: int,
    *,
    combine: str = "mean",
    agreement: np.ndarray | None = None,
) -> np.ndarray:
    """Each card's probabilities over its rows ((column, rows) per job), summed with the routing ``weights``
    [N, K], or with weights from ``combine`` (:func:`carddeck.gating.policies.combine_weights`).
    ``agreement``: float32 [N] to fill with :func:`agreement_of` the result."""
    if combine != "mean":  # needs every routed card's output on every row first
        per_card = np.zeros((weights.shape[1], len(weights), num_classes), np.float32)
        for (k, rows), p in zip(jobs, probabilities):
            per_card[k, rows] = p
        weights = combine_weights(weights, per_card, combine)
    n = len(weights)
    if len(jobs) == 1 and len(jobs[0][1]) == n:  # one card on every row (a card model): no scatter
        probs = (weights[:, jobs[0][0], None] * probabilities[0]).astype(np.float32, copy=False)
    else:
        probs = np.zeros((n, num_classes), np.float32)
        for (k, rows), p in zip(jobs, probabilities):
            probs[rows] += weights[rows, k, None] * p
    if agreement is not None:
        agreement[:] = agreement_of(weights, jobs, probabilities, probs)
    return probs


def agreement_of(
    weights: np.ndarray, jobs: Sequence[tuple[int, np.ndarray]], probabilities: Sequence[np.ndarray], mixed: np.ndarray
) -> np.ndarray:
    """float32 [N]: per image, the share of its routing weight on cards whose top label is the ``mixed`` one's;
    NaN where fewer than two cards answered it (one card always agrees with itself). Cards trained on different
    domains agree on a shifted image as on clean ones while it still shows what they learnt; on foreign images
    (another kind of image, noise, black) each extrapolates its own way."""
    n = len(mixed)
    if len(jobs) < 2:  # one card: no image has two voices (and argmax releases the GIL, a wait on a busy server)
        return np.full(n, np.nan, np.float32)
    if n == 1:  # a one-image request, the verdict's tightest budget: plain Python over its cards, 6x cheaper
        top, siding, weight = mixed[0].argmax(), 0.0, 0.0
        for (k, _), p in zip(jobs, probabilities):
            w = float(weights[0, k])
            weight += w
            siding += w if p[0].argmax() == top else 0.0
        return np.array([siding / weight if len(jobs) >= 2 else np.nan], np.float32)
    label = np.argmax(mixed, axis=1)
    if all(len(rows) == n for _, rows in jobs):  # per-request routing: every routed card on every row, no scatter
        sides = np.argmax(np.stack(probabilities, axis=1), axis=2) == label[:, None]  # [N, J]: one call, not J
        agreeing = np.add.reduce(np.take(weights, [k for k, _ in jobs], axis=1) * sides, axis=1)
        total, voices = np.add.reduce(weights, axis=1), np.count_nonzero(weights, axis=1)  # unrouted cards weigh 0
    else:
        agreeing, total, voices = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.int64)
        for (k, rows), p in zip(jobs, probabilities):
            w = weights[rows, k]
            total[rows] += w
            voices[rows] += w > 0
            agreeing[rows] += np.where(np.argmax(p, axis=1) == label[rows], w, 0.0)
    out = np.full(n, np.nan, np.float32)
    np.divide(agreeing, total, out=out, where=voices >= 2)
    return out


def _load_gate(store: DeckStore, manifest: Manifest, metas: tuple[CardMeta, ...]) -> tuple[Gate | None, str, str]:
    """The gate, the default policy it serves, and why that is not the configured one ("" when it is)."""
    config = dict(manifest.gate)
    policy = str(config.get("policy", DEFAULT_POLICY))
    POLICIES.get(policy)
    if not metas:
        return None, policy, ""
    router = None
    why = "the deck has no calibrated router"
    keys = tuple(m.key for m in metas)
    if config.get("router"):
        from carddeck.gating.router import CalibratedRouter

        try:
            router = CalibratedRouter.load(io.BytesIO(store.read_file(config["router"])))
        except InvalidInput as exc:  # serve on without it rather than refuse the whole deck
            log.warning("deck %s: ignoring the calibrated router: %s", store.root, exc)
            why = f"its calibrated router is unreadable ({exc})"
        missing = [k for k in router.card_keys if k not in keys] if router is not None else []
        if missing:
            log.warning(
                "deck %s: calibrated router is stale (cards %s gone); run carddeck calibrate", store.root, missing
            )
            router = None
            why = f"its calibrated router needs card{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    note = ""
    if policy in ("calibrated", "guarded") and router is None:
        log.warning("deck %s: default policy %r has no usable router; using %s", store.root, policy, DEFAULT_POLICY)
        note = (
            f"configured default policy {policy!r} cannot serve: {why}; serving {DEFAULT_POLICY!r} "
            "until `carddeck calibrate` fits a router to the current cards"
        )
        policy = DEFAULT_POLICY
    gate = Gate.from_cards(
        [(m.name, m.domain, m.signature) for m in metas],
        params=GateParams.from_dict(config.get("params")),
        references={d: tuple(v) for d, v in (config.get("references") or {}).items()},
        router=router,
        card_keys=keys,
    )
    return gate, policy, note


__all__ = ["Deck", "Prediction", "agreement_of", "mix", "prepare_images", "routed_rows", "top_labels"]
