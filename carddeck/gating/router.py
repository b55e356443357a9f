"""The calibrated router: signatures of held-out corrupted batches vote for the card sets that did best.

Fitting (``carddeck calibrate``, validation data only): for each calibration batch (a corruption
and severity applied to validation images, plus clean ones) record its signature and the accuracy
of every candidate card set (every subset of at most ``max_cards`` cards, predictions averaged).

Routing: each calibration batch votes with a Gaussian kernel of its distance to the query
signature; a prior vote of weight ``prior`` goes to every set's mean accuracy over all calibration
batches. Near familiar conditions the local votes dominate; for a batch unlike anything seen in
calibration the kernel weights vanish and the router falls back to the set that is best overall
(measured on digits32: this lifted corruptions left out of calibration from 95.8 to 96.5 mean
accuracy, where plain nearest-neighbour votes had picked the sets of unrelated corruptions). The
best set wins, minus ``cost`` per extra card so that a larger set must earn its compute. The
kernel bandwidth is the median distance from a calibration batch to its ``neighbours``-th nearest
one. Saved as a small ``.npz`` (no pickle).

Signatures here are :func:`~carddeck.gating.signature.sample_features` batch means (the radial
signature plus orientation, per-channel and local statistics), each feature divided by its spread
over the calibration batches so that no unit dominates the distance. A router fitted on plain
signatures (format 2) uses the first columns it knows.

The clean guard (policy ``guarded``): a batch whose features lie as near the clean calibration
batches' centre as the clean batches themselves do (see ``clean_radius``) runs the *clean set*, the set best on clean
validation batches (among those within ``CLEAN_TOLERANCE`` of the best, the one best over all
batches, then the smallest). Users serve mostly clean images, and the corrupted-data vote must not
cost them accuracy.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

import numpy as np

from carddeck.errors import InvalidInput
from carddeck.gating.policies import DEFAULT_METRIC, pairwise_distances

ROUTER_FORMAT = "carddeck-router/3"  # 3: scaled features and the clean guard; 2: kernel votes with a prior
READABLE_FORMATS = ("carddeck-router/2", ROUTER_FORMAT)
CLEAN_TAG = "clean/0"
CLEAN_TOLERANCE = 0.005  # clean-set candidates: within half a point of the best clean accuracy
CLEAN_MARGIN = 1.25  # guard radius: the farthest clean calibration batch's distance x this


@dataclass(frozen=True)
class CalibrationPoint:
    """One calibration batch: its signature, every card's probabilities [K, n, C] and the labels [n]."""

    signature: np.ndarray
    probabilities: np.ndarray
    labels: np.ndarray
    tag: str = ""  # e.g. "fog/3", for reports


@dataclass(frozen=True)
class CalibratedRouter:
    card_keys: tuple[str, ...]  # name/version of the cards it was fitted for, in fit order
    subsets: np.ndarray  # [S, K] bool: candidate card sets
    signatures: np.ndarray  # [P, D] calibration batch signatures (features)
    scores: np.ndarray  # [P, S] accuracy of each set on each calibration batch
    metric: str = DEFAULT_METRIC
    bandwidth: float = 1.0
    prior: float = 1.0
    cost: float = 0.0
    scale: np.ndarray | None = None  # [D] divisor per feature; None: unscaled (format 2)
    clean: np.ndarray | None = None  # [P] bool: the clean calibration batches; None: no guard

    def _scaled(self, signatures: np.ndarray) -> np.ndarray:
        d = self.signatures.shape[1]
        sigs = np.asarray(signatures, np.float32)
        if sigs.shape[1] < d:
            raise InvalidInput(f"the router needs {d} signature features, got {sigs.shape[1]}")
        sigs = sigs[:, :d]
        return sigs / self.scale if self.scale is not None else sigs

    # The router is immutable, so what routing derives from its fitted arrays is computed once: a
    # one-image request paid ~0.1 ms re-deriving them (the guard radius loops over the clean batches).
    @cached_property
    def _points(self) -> np.ndarray:
        return self._scaled(self.signatures)

    @cached_property
    def _overall(self) -> np.ndarray:
        return self.scores.mean(axis=0)

    @cached_property
    def _extra_card_cost(self) -> np.ndarray:
        return self.cost * (self.subsets.sum(axis=1) - 1)

    def distances(self, signatures: np.ndarray) -> np.ndarray:
        """[N, P] distances of the rows to the calibration batches: what :meth:`choose` and :meth:`novelty`
        both read, so the guarded policy computes them once per call."""
        return pairwise_distances(self._scaled(signatures), self._points, self.metric)

    def choose(self, signatures: np.ndarray, distances: np.ndarray | None = None) -> np.ndarray:
        """Index of the winning card set for each signature row -> int64 [N]."""
        dist = self.distances(signatures) if distances is None else distances
        votes = np.exp(-0.5 * (dist / self.bandwidth) ** 2)  # [N, P]
        overall = self._overall  # [S]
        expected = (votes @ self.scores + self.prior * overall) / (votes.sum(axis=1, keepdims=True) + self.prior)
        expected = expected - self._extra_card_cost
        return np.argmax(expected, axis=1)  # subsets are ordered by size: ties go to fewer cards

    @property
    def has_guard(self) -> bool:
        return self.clean is not None and bool(self.clean.any())

    def clean_set(self) -> int:
        """Index of the clean set: best on the clean calibration batches (see the module doc)."""
        if not self.has_guard:
            raise InvalidInput("this router has no clean calibration batches: run `carddeck calibrate` again")
        return self._clean_set

    @cached_property
    def _clean_set(self) -> int:
        clean_score = self.scores[self.clean].mean(axis=0)
        near_best = np.flatnonzero(clean_score >= clean_score.max() - CLEAN_TOLERANCE)
        overall = self.scores.mean(axis=0)[near_best]
        return int(near_best[np.argmax(overall)])  # argmax keeps the first (smallest) set on ties

    def near_clean(self, signatures: np.ndarray) -> np.ndarray:
        """bool [N]: rows within the guard radius of the clean calibration batches' centre."""
        if not self.has_guard:
            return np.zeros(len(signatures), bool)
        return pairwise_distances(self._scaled(signatures), self._clean_centre, self.metric)[:, 0] <= self.clean_radius

    @cached_property
    def _clean_centre(self) -> np.ndarray:
        return self._points[self.clean].mean(axis=0, keepdims=True)

    @cached_property
    def clean_radius(self) -> float:
        """``CLEAN_MARGIN`` x the farthest clean calibration batch from the centre of the *other*
        clean batches (leave one out: that is how far a new clean batch lands; the centre of all of
        them sits closer to each point than it would to a fresh one)."""
        points = self._points[self.clean] if self.clean is not None else self._points[:0]
        n = len(points)
        if n < 2:
            return CLEAN_MARGIN * self.bandwidth
        others = (points.sum(axis=0, keepdims=True) - points) / (n - 1)
        loo = np.array([pairwise_distances(points[i : i + 1], others[i : i + 1], self.metric)[0, 0] for i in range(n)])
        return CLEAN_MARGIN * float(loo.max())

    def novelty(self, signatures: np.ndarray, distances: np.ndarray | None = None) -> np.ndarray:
        """Distance of each row to the nearest calibration batch, in kernel bandwidths -> float [N]: far
        past a few bandwidths no calibration batch votes, and the router only extrapolates."""
        dist = self.distances(signatures) if distances is None else distances
        return dist.min(axis=1) / self.bandwidth

    def clean_cards(self, tolerance: float = CLEAN_TOLERANCE) -> np.ndarray:
        """bool [K_router]: the cards that are good on clean data alone (clean calibration accuracy within
        ``tolerance`` of the best single card's)."""
        if not self.has_guard:
            return np.ones(len(self.card_keys), bool)
        single = np.flatnonzero(self.subsets.sum(axis=1) == 1)
        clean = self.scores[self.clean][:, single].mean(axis=0)
        keep = np.zeros(len(self.card_keys), bool)
        keep[self.subsets[single[clean >= clean.max() - tolerance]].any(axis=0)] = True
        return keep

    def choose_guarded(self, signatures: np.ndarray, distances: np.ndarray | None = None) -> np.ndarray:
        """:meth:`choose`, except that batches near clean data run the clean set."""
        chosen = self.choose(signatures, distances)
        if self.has_guard:
            chosen = np.where(self.near_clean(signatures), self.clean_set(), chosen)
        return chosen

    def weights(
        self,
        signatures: np.ndarray,
        deck_keys: Sequence[str],
        *,
        guard: bool = False,
        distances: np.ndarray | None = None,
    ) -> np.ndarray:
        """[N, K_deck] equal weights over the chosen set (with the clean guard if asked), in deck order;
        ``distances``: :meth:`distances` of the rows, when the caller already has them."""
        missing = [k for k in self.card_keys if k not in deck_keys]
        if missing:
            raise InvalidInput(
                f"the calibrated router was fitted for cards {', '.join(self.card_keys)} but the deck lacks "
                f"{', '.join(missing)}; run `carddeck calibrate` again"
            )
        column = [list(deck_keys).index(k) for k in self.card_keys]
        index = self.choose_guarded(signatures, distances) if guard else self.choose(signatures, distances)
        chosen = self.subsets[index].astype(np.float32)  # [N, K_router]
        out = np.zeros((len(chosen), len(deck_keys)), np.float32)
        out[:, column] = chosen / chosen.sum(axis=1, keepdims=True)
        return out

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: Path | str | BinaryIO) -> None:
        header = {
            "format": ROUTER_FORMAT,
            "card_keys": list(self.card_keys),
            "metric": self.metric,
            "bandwidth": self.bandwidth,
            "prior": self.prior,
            "cost": self.cost,
        }
        if isinstance(path, str | Path):
            with open(path, "wb") as f:
                self.save(f)
            return
        arrays = {
            "header": np.array(json.dumps(header)),
            "subsets": self.subsets,
            "signatures": self.signatures,
            "scores": self.scores,
        }
        if self.scale is not None:
            arrays["scale"] = self.scale
        if self.clean is not None:
            arrays["clean"] = self.clean
        np.savez(path, allow_pickle=False, **arrays)

    @classmethod
    def load(cls, path: Path | str | BinaryIO) -> CalibratedRouter:
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                subsets, signatures, scores = z["subsets"], z["signatures"], z["scores"]
                scale = z["scale"].astype(np.float32) if "scale" in z.files else None
                clean = z["clean"].astype(bool) if "clean" in z.files else None
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidInput(f"{path}: not a calibrated router file ({exc})") from None
        if header.get("format") not in READABLE_FORMATS:
            raise InvalidInput(
                f"{path}: router format {header.get('format')!r}, expected one of {', '.join(READABLE_FORMATS)}; "
                "run `carddeck calibrate`"
            )
        try:
            return cls(
                card_keys=tuple(header["card_keys"]),
                subsets=subsets.astype(bool),
                signatures=signatures.astype(np.float32),
                scores=scores.astype(np.float32),
                metric=header["metric"],
                bandwidth=float(header["bandwidth"]),
                prior=float(header["prior"]),
                cost=float(header["cost"]),
                scale=scale,
                clean=clean,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{path}: malformed router header ({type(exc).__name__}: {exc})") from None


def candidate_subsets(num_cards: int, max_cards: int) -> np.ndarray:
    """Every non-empty set of at most ``max_cards`` cards, smallest first -> bool [S, K]."""
    rows = []
    for size in range(1, min(max_cards, num_cards) + 1):
        for combo in itertools.combinations(range(num_cards), size):
            row = np.zeros(num_cards, bool)
            row[list(combo)] = True
            rows.append(row)
    return np.stack(rows)


def fit_router(
    points: Sequence[CalibrationPoint],
    card_keys: Sequence[str],
    *,
    max_cards: int | None = None,
    metric: str = DEFAULT_METRIC,
    neighbours: int = 10,
    prior: float = 1.0,
    cost: float = 0.0,
) -> CalibratedRouter:
    """Score every candidate card set on every calibration batch and keep the table."""
    if not points:
        raise InvalidInput("fit_router needs at least one calibration batch")
    num_cards = len(card_keys)
    max_cards = max(1, num_cards // 2) if max_cards is None else max_cards
    subsets = candidate_subsets(num_cards, max_cards)
    weights = subsets.astype(np.float32) / subsets.sum(axis=1, keepdims=True)  # [S, K]
    scores = np.zeros((len(points), len(subsets)), np.float32)
    for i, p in enumerate(points):
        if p.probabilities.shape[0] != num_cards:
            raise InvalidInput(f"calibration batch {i}: {p.probabilities.shape[0]} cards, expected {num_cards}")
        mixed = np.einsum("sk,knc->snc", weights, p.probabilities)  # [S, n, C]
        scores[i] = (mixed.argmax(axis=2) == p.labels[None, :]).mean(axis=1)
    signatures = np.stack([np.asarray(p.signature, np.float32) for p in points])
    spread = signatures.std(axis=0)
    scale = np.where(spread > 1e-6, spread, 1.0).astype(np.float32)
    clean = np.array([p.tag == CLEAN_TAG for p in points], bool)
    return CalibratedRouter(
        tuple(card_keys),
        subsets,
        signatures,
        scores,
        metric,
        kernel_bandwidth(signatures / scale, metric, neighbours),
        prior,
        cost,
        scale,
        clean,
    )


def kernel_bandwidth(signatures: np.ndarray, metric: str, neighbours: int, max_points: int = 2000) -> float:
    """Median distance from a calibration signature to its ``neighbours``-th nearest other one
    (on a seeded subsample of at most ``max_points``, so the cost stays bounded)."""
    if len(signatures) < 2:
        return 1.0
    if len(signatures) > max_points:
        signatures = signatures[np.random.default_rng(0).choice(len(signatures), max_points, replace=False)]
    d = np.sort(pairwise_distances(signatures, signatures, metric), axis=1)
    k = min(neighbours, len(signatures) - 1)  # column 0 is the point itself
    bandwidth = float(np.median(d[:, k]))
    return bandwidth if bandwidth > 0 else float(d[:, 1:].mean()) or 1.0


__all__ = ["CLEAN_TAG", "CalibratedRouter", "CalibrationPoint", "candidate_subsets", "fit_router"]
