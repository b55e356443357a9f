"""Routing policies: from signatures and reference signatures to the cards that run, and their weights.

A policy is a function ``(gate, signatures [N, D], distances [N, M]) -> weights [N, K]`` registered
in ``POLICIES`` by name. Rows of the weights sum to 1; a zero means the card does not run for that
image. ``Gate`` holds what policies need (the deck's cards, their domains, the domains' reference
signatures, parameters, an optional calibrated router) and builds the ``Routing`` explanation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from carddeck.errors import InvalidInput, shown
from carddeck.gating.signature import SIGNATURE_DIM, sample_features
from carddeck.registry import Registry

if TYPE_CHECKING:
    from carddeck.gating.router import CalibratedRouter

METRICS = ("l2", "l1", "cosine")
COMBINES = ("mean", "confidence")
# L2 by measurement (benchmarks/bench_gate.py --metrics, a 4-CARD digits32 deck, corrupted
# validation data): nearest-domain mean accuracy L2 94.84, L1 94.84, cosine 94.25 (uniform 94.32).
# Cosine ignores the overall spectral level, which is what contrast loss and fog change.
DEFAULT_METRIC = "l2"
DEFAULT_POLICY = "nearest-domain"


def pairwise_distances(a: np.ndarray, b: np.ndarray, metric: str = DEFAULT_METRIC) -> np.ndarray:
    """Distances between rows of ``a`` [N, D] and rows of ``b`` [M, D] -> float32 [N, M]."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    if metric == "l2":  # in place: one [N, M, D] temporary, not three (the router's 456 points at every call)
        diff = a[:, None, :] - b[None, :, :]
        return np.sqrt(np.square(diff, out=diff).sum(-1))
    if metric == "l1":
        return np.abs(a[:, None, :] - b[None, :, :]).sum(-1).astype(np.float32)
    if metric == "cosine":
        an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return (1.0 - an @ bn.T).astype(np.float32)
    raise InvalidInput(f"unknown distance metric {shown(metric)}; valid choices: {', '.join(METRICS)}")


@dataclass(frozen=True)
class Routing:
    """Which cards ran for which images, with what weight, and why (distances to each domain)."""

    policy: str
    per_sample: bool
    card_names: tuple[str, ...]  # deck order
    weights: np.ndarray  # [N, K] float32, rows sum to 1, 0 = not run for that image
    domains: tuple[str, ...]
    distances: np.ndarray  # [N, M] distance of each image (or the batch) to each domain
    features: np.ndarray | None = None  # [N, FEATURE_DIM] per-image ``sample_features``, from ``Gate.route``

    @property
    def selected(self) -> tuple[str, ...]:
        """Cards with a nonzero weight for at least one image, in deck order."""
        used = np.asarray(np.any(self.weights > 0, axis=0))
        return tuple(n for k, n in enumerate(self.card_names) if bool(used[k]))

    @property
    def cards_per_image(self) -> float:
        return float((self.weights > 0).sum(axis=1).mean()) if len(self.weights) else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready explanation (per-image lists only when routing was per sample)."""
        rows = slice(None) if self.per_sample else slice(0, 1)
        return {
            "policy": self.policy,
            "per_sample": self.per_sample,
            "selected": list(self.selected),
            "cards_per_image": self.cards_per_image,
            "card_names": list(self.card_names),
            "domains": list(self.domains),
            "weights": np.round(self.weights[rows], 6).tolist(),
            "distances": np.round(self.distances[rows], 6).tolist(),
        }


@dataclass(frozen=True)
class GateParams:
    """Policy parameters (stored in the deck manifest under ``gate``)."""

    metric: str = DEFAULT_METRIC
    k: int = 2  # top-k: cards kept
    temperature: float = 0.5  # soft: in units of the nearest domain's distance
    min_weight: float = 0.1  # soft: domains below this weight are not run
    combine: str = "mean"  # how the chosen cards' probabilities mix: see combine_weights

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise InvalidInput(f"gate metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.k < 1:
            raise InvalidInput(f"gate parameter k must be >= 1, got {self.k}")
        if not self.temperature > 0:
            raise InvalidInput(f"gate parameter temperature must be > 0, got {self.temperature}")
        if not 0 <= self.min_weight < 1:
            raise InvalidInput(f"gate parameter min_weight must be in [0, 1), got {self.min_weight}")
        if self.combine not in COMBINES:
            raise InvalidInput(f"gate parameter combine {self.combine!r} is not one of {', '.join(COMBINES)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> GateParams:
        data = dict(data or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"unknown gate parameter {unknown[0]!r}; known: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class Gate:
    """The deck's routing state: cards (deck order), their domains and the domain references."""

    card_names: tuple[str, ...]
    card_domains: tuple[str, ...]
    domains: tuple[str, ...]  # domains with a reference signature, in first-card order
    references: np.ndarray  # [M, D] float32
    params: GateParams = field(default_factory=GateParams)
    router: CalibratedRouter | None = None
    card_keys: tuple[str, ...] = ()  # name/version, to match a calibrated router; defaults to names

    def __post_init__(self) -> None:
        if len(self.card_names) != len(self.card_domains):
            raise ValueError("one domain per card")
        unknown = sorted(set(self.card_domains) - set(self.domains))
        if unknown:
            raise InvalidInput(f"no reference signature for domain {unknown[0]!r}")

    @classmethod
    def from_cards(
        cls,
        cards: list[tuple[str, str, tuple[float, ...] | None]],
        *,
        params: GateParams | None = None,
        references: Mapping[str, tuple[float, ...]] | None = None,
        router: CalibratedRouter | None = None,
        card_keys: tuple[str, ...] = (),
    ) -> Gate:
        """From ``(name, domain, signature)`` per card. A domain's reference is ``references[domain]``
        when given (``carddeck calibrate``), else the mean of its cards' signatures."""
        references = dict(references or {})
        domains: list[str] = []
        for _, domain, _ in cards:
            if domain not in domains:
                domains.append(domain)
        rows = []
        for domain in domains:
            if domain in references:
                rows.append(np.asarray(references[domain], np.float32))
                continue
            sigs = [np.asarray(s, np.float32) for _, d, s in cards if d == domain and s is not None]
            if not sigs:
                raise InvalidInput(f"domain {domain!r} has no reference signature: no card of it carries one")
            rows.append(np.mean(sigs, axis=0))
        dims = {r.shape for r in rows}
        if len(dims) > 1:
            raise InvalidInput(f"reference signatures differ in length: {sorted(dims)}")
        refs = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
        return cls(
            card_names=tuple(n for n, _, _ in cards),
            card_domains=tuple(d for _, d, _ in cards),
            domains=tuple(domains),
            references=refs,
            params=params or GateParams(),
            router=router,
            card_keys=card_keys,
        )

    @property
    def keys(self) -> tuple[str, ...]:
        return self.card_keys or self.card_names

    def domain_matrix(self) -> np.ndarray:
        """[M, K] with 1/|cards of domain m| where card k belongs to domain m."""
        onehot = np.array([[d == dom for d in self.card_domains] for dom in self.domains], np.float32)
        return onehot / np.maximum(onehot.sum(axis=1, keepdims=True), 1.0)

    def route(self, images: np.ndarray, *, policy: str = DEFAULT_POLICY, per_sample: bool = False) -> Routing:
        """Signatures of ``images`` (per batch or per sample), then ``policy``."""
        return self.route_many(sample_features(images), [len(images)], policy=policy, per_sample=per_sample)[0]

    def route_many(
        self, features: np.ndarray, sizes: Sequence[int], *, policy: str = DEFAULT_POLICY, per_sample: bool = False
    ) -> list[Routing]:
        """Route several requests with one policy call: ``features`` [sum(sizes), FEATURE_DIM] are the
        ``sample_features`` of their images, request after request (one ``sample_features`` call over
        a merged batch). Each request is routed on its own rows only, exactly as :meth:`route` routes
        it alone (policies are row-wise), so merging never changes a request's routing."""
        features = np.asarray(features, np.float32)
        bounds = np.cumsum([0, *sizes])
        spans = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
        # per batch: each request's mean row (a request of one image is its row: no mean to take)
        one_each = len(spans) == len(features)
        sigs = features if per_sample or one_each else np.stack([features[a:b].mean(axis=0) for a, b in spans])
        weights, dist = self._weights(sigs, policy)
        out = []
        for i, (a, b) in enumerate(spans):
            if per_sample or one_each:
                w, d = weights[a:b], dist[a:b]
            else:
                w, d = weights[[i] * (b - a)], dist[[i] * (b - a)]
            out.append(Routing(policy, per_sample, self.card_names, w, self.domains, d, features[a:b]))
        return out

    def route_signatures(
        self, signatures: np.ndarray, *, policy: str = DEFAULT_POLICY, per_sample: bool, batch_size: int
    ) -> Routing:
        """Route from signatures [N, D]: ``sample_features`` rows (or their batch mean), or plain
        ``sample_signatures`` rows for decks and routers that know only those."""
        weights, dist = self._weights(np.asarray(signatures, np.float32), policy)
        if not per_sample:
            weights = np.repeat(weights, batch_size, axis=0)
            dist = np.repeat(dist, batch_size, axis=0)
        return Routing(policy, per_sample, self.card_names, weights, self.domains, dist)

    def _weights(self, sigs: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
        """``policy``'s weights [N, K] (rows sum to 1) and the distances [N, M] to the domains, row by row."""
        fn = POLICIES.get(policy)
        if not self.card_names:
            raise InvalidInput("the deck has no cards to route to")
        d = self.references.shape[1]
        # Features start with the signature the references are made of (sample_features).
        if sigs.shape[1] != d and not (d == SIGNATURE_DIM and sigs.shape[1] > d):
            raise InvalidInput(f"signature length {sigs.shape[1]} does not match the deck's references ({d})")
        dist = pairwise_distances(sigs[:, :d], self.references, self.params.metric)
        weights = np.asarray(fn(self, sigs, dist), np.float32)
        return weights / weights.sum(axis=1, keepdims=True), dist


def combine_weights(weights: np.ndarray, probabilities: np.ndarray, combine: str = "mean") -> np.ndarray:
    """Per-image card weights [N, K] for mixing ``probabilities`` [K, N, C] of the routed cards.

    ``mean``: the routing weights as they are. ``confidence``: each routed card's weight times its
    confidence on that image (its top probability), renormalized per image, so a card that is
    sure of itself outvotes one that is guessing (corruptions a card never saw tend to flatten its
    output). Cards with routing weight 0 stay at 0.
    """
    if combine == "mean":
        return weights
    if combine != "confidence":
        raise InvalidInput(f"unknown combine rule {combine!r}; valid choices: {', '.join(COMBINES)}")
    w = weights * probabilities.max(axis=2).T  # [N, K]
    return w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)


Policy = Callable[[Gate, np.ndarray, np.ndarray], np.ndarray]
POLICIES: Registry[Policy] = Registry("gate policy")


@POLICIES.register("nearest-domain")
def nearest_domain(gate: Gate, signatures: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """The paper's gate: every card of the nearest domain, equal weights."""
    return gate.domain_matrix()[np.argmin(distances, axis=1)]


@POLICIES.register("top-k")
def top_k(gate: Gate, signatures: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """The k cards whose domains are nearest (ties keep deck order), equal weights."""
    card_dist = distances[:, [gate.domains.index(d) for d in gate.card_domains]]
    k = min(gate.params.k, len(gate.card_names))
    order = np.argsort(card_dist, axis=1, kind="stable")[:, :k]
    weights = np.zeros(card_dist.shape, np.float32)
    np.put_along_axis(weights, order, 1.0, axis=1)
    return weights


@POLICIES.register("soft")
def soft(gate: Gate, signatures: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Domain weights ``exp(-(d/d_min - 1)/T)``: relative to the nearest domain's distance, so the
    temperature does not depend on the metric's scale; domains under ``min_weight`` do not run."""
    d_min = np.maximum(distances.min(axis=1, keepdims=True), 1e-12)
    logits = -(distances / d_min - 1.0) / gate.params.temperature
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    w[w < gate.params.min_weight] = 0.0  # the nearest domain has the largest weight, so rows stay nonzero
    return w @ gate.domain_matrix()


@POLICIES.register("uniform")
def uniform(gate: Gate, signatures: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Every card, equal weights: the RobustBench CARD-Deck, the baseline."""
    return np.ones((len(signatures), len(gate.card_names)), np.float32)


@POLICIES.register("calibrated")
def calibrated(gate: Gate, signatures: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """The router fitted by ``carddeck calibrate`` on corrupted validation data."""
    if gate.router is None:
        raise InvalidInput(
            "gate policy 'calibrated' needs a fitted router: run `carddeck calibrate --deck DIR --data NAME`"
        )
    return gate.router.weights(signatures, gate.keys)


# Where the router is unsure (a batch farther than UNSURE_AT kernel bandwidths from every calibration
# batch: no calibration batch votes, and the router's choice is its prior, the set best on average), the
# guarded policy hedges (FALLBACK): half the router's choice, a quarter the paper's nearest spectral
# domain, a quarter the uniform deck. Chosen on val of both development decks (benchmarks/bench_fallback.py,
# all five severities, routers fitted without each corruption and without each family), against the
# guarded policy without a fallback:
# - no single source is safe: nearest-domain wins held-out contrast (leaves32 +16 points on the batches it
#   takes, digits32 +11) but loses frost 26 and fog 20 on digits32 with the weather family held out;
#   the uniform deck never falls below itself but lost 0.4-0.7 points mean on digits32, where the router's
#   prior is good; the hedge was the only blend that lowered no held-out mean on either deck;
# - at 8 bandwidths: held-out mean +0.30 (leaves32) and +0.18 (digits32), family held out +0.02 and +0.10;
#   leaves32 contrast from -1.3 to above uniform, no corruption newly more than 0.5 below it; the same
#   within 0.1 at 10; at 6 the family rows dropped;
# - it never fired on familiar conditions or clean batches the router did not see (val, odd batches
#   routed by a router fitted on the even ones).
UNSURE_AT = 8.0
FALLBACK = "hedge"  # or "uniform", "clean-cards" (the uniform mix of the cards good on clean data), "nearest-domain"
FALLBACKS = ("hedge", "uniform", "clean-cards", "nearest-domain")
HEDGE = (0.5, 0.25, 0.25)  # router's choice, nearest domain, uniform deck


def fallback(
    gate: Gate, signatures: np.ndarray, distances: np.ndarray, kind: str = FALLBACK, routed: np.ndarray | None = None
) -> np.ndarray:
    """Weights [N, K] of the guarded policy's fallback for batches the router is unsure about (``routed``:
    the router's own guarded weights of those rows, when the caller has them)."""
    if kind not in FALLBACKS:
        raise InvalidInput(f"unknown fallback {shown(kind)}; valid choices: {', '.join(FALLBACKS)}")
    if kind == "nearest-domain":
        return nearest_domain(gate, signatures, distances)
    if kind == "hedge":
        if gate.router is None:
            raise InvalidInput("the 'hedge' fallback needs a fitted router: run `carddeck calibrate`")
        router, nearest, everyone = HEDGE
        uniform = np.full((len(signatures), len(gate.card_names)), 1.0 / len(gate.card_names), np.float32)
        if routed is None:
            routed = gate.router.weights(signatures, gate.keys, guard=True)
        mix = router * routed + nearest * nearest_domain(gate, signatures, distances) + everyone * uniform
        return mix.astype(np.float32)
    keep = np.ones(len(gate.card_names), np.float32)
    if kind == "clean-cards" and gate.router is not None:
        keep[:] = 0.0
        good = gate.router.clean_cards()
        keep[[gate.keys.index(k) for k, ok in zip(gate.router.card_keys, good) if ok]] = 1.0
    return np.repeat(keep[None], len(signatures), axis=0)


@POLICIES.register("guarded")
def guarded(gate: Gate, signatures: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """The calibrated router behind a clean guard: a batch near the clean data's signature runs the
    set that is best on clean validation data; one far from every calibration batch (UNSURE_AT) runs
    the FALLBACK (a hedge between the router, the spectral gate and the uniform deck); anything else goes
    to the router's vote."""
    if gate.router is None:
        raise InvalidInput(
            "gate policy 'guarded' needs a fitted router: run `carddeck calibrate --deck DIR --data NAME`"
        )
    # one distance to every calibration batch serves both the vote and the novelty
    near = gate.router.distances(signatures)
    weights = gate.router.weights(signatures, gate.keys, guard=True, distances=near)
    if np.isinf(UNSURE_AT):  # no fallback
        return weights
    unsure = (gate.router.novelty(signatures, near) > UNSURE_AT) & ~gate.router.near_clean(signatures)
    if unsure.any():
        w = fallback(gate, signatures[unsure], distances[unsure], routed=weights[unsure])
        weights[unsure] = w / w.sum(axis=1, keepdims=True)
    return weights


__all__ = [
    "COMBINES",
    "DEFAULT_METRIC",
    "DEFAULT_POLICY",
    "FALLBACK",
    "FALLBACKS",
    "METRICS",
    "POLICIES",
    "UNSURE_AT",
    "Gate",
    "GateParams",
    "Routing",
    "combine_weights",
    "fallback",
    "pairwise_distances",
]
