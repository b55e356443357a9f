"""The shift detector: is a batch in-distribution, a shift the deck covers, or one it does not; and is
each image in the deck's scope? (The model; fitting is :mod:`carddeck.gating.shift_fit`, the live
monitor :mod:`carddeck.observability.shift`.)

**Features** (:func:`image_features`, per image, numpy only): the gate's own per-image features
(``sample_features``: radial log-spectrum, orientation wedges, per-channel mean and spread, local
contrast, gradient, clipping, saturation; routing has computed them already), photometric
statistics (dark and bright luminance percentiles, the spread of saturation), and what the deck said
(confidence and entropy of its combined probabilities).

**Batch statistic.** A kernel two-sample statistic, MMD^2 with a Gaussian kernel on standardized
features, between a batch and a reference condition, computed separately on three feature groups
(spectral, photometric, output) and reported as the largest, in units of each group's threshold. One
kernel over all features let the 21 spectral columns drown a brightness change in 8 photometric ones;
a group of its own sees it. Each group's kernel is approximated by random Fourier features, so a
reference is one mean embedding and a test costs one small matrix product.

**Thresholds** (per group and batch size): the (1 - alpha/G) quantile of the statistic between random
batches of a condition and the rest of it (Bonferroni over the G groups), so a clean batch raises a
false alarm with probability <= alpha: the expected run time between false alarms is 1/alpha batches.

**States**: *in_distribution* (under the clean threshold in every group), *covered* (consistent with a
reference condition on which the deck lost at most ``tolerance``; or a new shift whose own evidence says
the deck holds: most images in scope and the expected accuracy near clean, or most out of scope, near no
known condition, and either few foreign images with the deck's confidences within ``tolerance`` of clean's
(DoC), or the cards' agreement within ``tolerance`` of clean's (DoA) with the confidences within twice it),
*uncovered* (otherwise).

**Agreement** (:func:`carddeck.deck.deck.agreement_of`, per image: the share of its routing weight on cards
whose top label is the deck's; DoA: the clean accuracy minus its drop from clean). Cards trained on different
augmentation domains keep agreeing on a shift that leaves the images what they were (digits32 val: DoA
92-100 on impulse noise, glass blur, snow, frost/1-2, pixelate/5, clean 99), while on foreign images each
extrapolates its own way (the other development set, noise, black: DoA 30-68 on both decks), even where
every image is as far out of scope as a foreign one. So agreement, not the out-of-scope scores, tells such
a shift from foreign images; one card routed alone is no second opinion (NaN).

**Per-image scope** (:class:`Scope`): the Mahalanobis distance of an image's standardized features to
the nearest of the in-scope references (clean, the cards' augmentation domains and the corruptions the
deck stays accurate on, their severities pooled: one Gaussian each); the threshold is a conformal
quantile of out-of-fold clean scores (default fpr 5%). Scores are in threshold units: above 1 is out
of scope. It reads every feature, or only the coarse ones (low spectral rings, channel means and
spreads) where that passes a check on the fitting data with each corruption family held out
(``SCOPE_FEATURE_SETS``, :func:`carddeck.gating.shift_fit.select_scope`): coarse features let an
unseen family's benign images stay in scope, but on some decks a harmful shift looks coarse-alike too.

**Expected accuracy**: 0.6 x the deck's accuracy on the reference conditions, weighted by a Gaussian
kernel of the batch's statistic to each relative to the nearest; 0.3 x the clean accuracy minus the drop
of the mean confidence from clean (DoC); 0.1 x ATC (the share of confident images at the threshold that
clean accuracy implies). ATC alone collapses when a shift lowers every confidence but few answers
(contrast). It never claims more than the deck's clean accuracy on an uncovered batch (an upper bound
there) nor on a new shift covered on the confidences' word, and is ``unknown`` (NaN) when an uncovered
batch is mostly out of scope and like no known condition.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from carddeck.errors import InvalidInput
from carddeck.gating.signature import FEATURE_DIM, ORIENTATIONS, SIGNATURE_DIM, sample_features

# 5: the scope reads a subset of the features (4: mean confidence per condition; 3: grouped MMD, per-image scope;
# 2: one kernel). A format-4 reader would apply a format-5 scope to every column, hence the new number.
FORMAT = "carddeck-shift/5"
READABLE = ("carddeck-shift/3", "carddeck-shift/4", FORMAT)  # 3: ATC in place of DoC; 3 and 4: scope on every feature
STATES = ("in_distribution", "covered", "uncovered")
COVERED_BY = ("known", "in_scope", "confidence", "agreement")  # the paths to "covered" (Verdict.covered_by)
UNKNOWN = "unknown"  # no detector fitted to the deck's cards (yet): served, never silently off
ALPHA = 0.005  # false alarms per in-distribution batch: ERT 200 batches
TOLERANCE = 0.05  # accuracy a condition may lose against clean and still count as covered
SCOPE_FPR = 0.05  # clean images called out of scope
SCOPE_FOLDS = 5  # cross-fitting folds of the clean images for the scope threshold
SIZES = (4, 8, 16, 32, 64, 128)  # batch sizes with a calibrated threshold
EMBED_DIM = 128  # random Fourier features per group
BOOTSTRAP = 2000  # null batches per size for clean, at least (clean_draws); the other conditions draw a quarter
TAIL = 30  # clean null batches beyond the threshold's quantile (clean_draws)
CHUNK = 2000  # null batches of up to 16 images drawn at a time (calibrated_thresholds)
# Expected accuracy: the nearest known conditions' accuracy, the difference of confidences (DoC) from clean,
# ATC; chosen on validation data with each corruption family held out (README, "The shift signal")
EXPECTED_WEIGHTS = (0.6, 0.3, 0.1)
# An image this far out of scope is foreign (another kind of image), not a shifted one: shifted images the
# deck handles stay under 2.7 in 99.9% of cases on both development decks, foreign ones over 2.9. A batch
# with more than FOREIGN_SHARE of them is never covered, whatever the other images make the estimate.
FOREIGN = 3.0
FOREIGN_SHARE = 0.1
# The cards' agreement speaks for a batch only where at least this share of its images had a second card.
AGREEMENT_SHARE = 0.5
COLLAPSE_DRAWS = 4000  # clean batches simulated per size for the threshold of the answers' class mix

_STD_FLOOR = 0.02  # features constant on clean data (e.g. saturation of grey digits) still get a scale

GATE_NAMES = (
    *(f"spectrum_{i}" for i in range(SIGNATURE_DIM)),
    *(f"orientation_{i}" for i in range(ORIENTATIONS)),
    *(f"mean_{c}" for c in "rgb"),
    *(f"std_{c}" for c in "rgb"),
    "local_contrast",
    "gradient",
    "clipped",
    "saturation",
)
PHOTOMETRIC = ("luma_p05", "luma_p95", "saturation_std")  # photometric_features
FEATURE_NAMES = (*GATE_NAMES, *PHOTOMETRIC, "confidence", "entropy")
GROUPS: dict[str, tuple[str, ...]] = {
    "spectral": (*GATE_NAMES[: SIGNATURE_DIM + ORIENTATIONS], "local_contrast", "gradient"),
    "photometric": (
        *(f"{s}_{c}" for s in ("mean", "std") for c in "rgb"),
        *("clipped", "saturation", "luma_p05", "luma_p95", "saturation_std"),
    ),
    "output": ("confidence", "entropy"),
}
CONFIDENCE = FEATURE_NAMES.index("confidence")
# What the per-image scope may read, tried in this order when it is fitted (shift_fit.select_scope):
# "coarse": the coarse structure of an image (the lowest 5 rings of its spectrum: shapes at the scale of the
# objects) and its per-channel level and spread. Fine texture (higher rings, orientation, gradient,
# clipping, saturation) is what corruptions change and the cards are trained to ignore, so an image of a
# family no reference has seen stays in scope unless it changes what the image shows. But a harmful
# shift can look coarse-alike too (digits32: fog/5, 73% accurate, next to its lowfreq domain and to
# contrast/2, 98%), so the coarse set is kept only where the deck's own validation data, each family held
# out in turn, says it neither calls benign batches uncovered nor misjudges harmful ones; else "all".
SCOPE_FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "coarse": (*(f"spectrum_{i}" for i in range(5)), *(f"{s}_{c}" for s in ("mean", "std") for c in "rgb")),
    "all": FEATURE_NAMES,
}


def _mean(a: np.ndarray, axis: int) -> np.ndarray:
    """``a.mean(axis, keepdims=True)`` for float32 ``a``, by np.mean's own arithmetic (sum, then divide by the
    count as an intp) without its Python wrapper, which costs more than the arithmetic on one image."""
    s = np.add.reduce(a, axis=axis, keepdims=True)
    return np.true_divide(s, np.intp(a.shape[axis]), out=s, casting="unsafe")


def photometric_features(x: np.ndarray) -> np.ndarray:
    """Luminance 5th and 95th percentiles and the spread of saturation, float32 [N, 3]; ``x`` NCHW in [0, 1]."""
    n = len(x)
    luma = _mean(x, 1).reshape(n, -1)
    k = luma.shape[1]
    lo, hi = int(0.05 * (k - 1)), int(0.95 * (k - 1))
    part = np.partition(luma, (lo, hi), axis=1)
    sat = (np.maximum.reduce(x, axis=1) - np.minimum.reduce(x, axis=1)).reshape(n, -1)
    dev = sat - _mean(sat, 1)
    np.square(dev, out=dev)
    out = np.empty((n, 3), np.float32)
    out[:, 0], out[:, 1] = part[:, lo], part[:, hi]
    np.sqrt(_mean(dev, 1)[:, 0], out=out[:, 2])  # sat.std(axis=1), as np.std computes it
    return out


def image_features(
    x: np.ndarray, probabilities: np.ndarray, gate_features: np.ndarray | None = None, rows: np.ndarray | None = None
) -> np.ndarray:
    """Per-image features, float32 [N, len(FEATURE_NAMES)]. ``x``: float32 [N, 3, H, W] in [0, 1], as the
    cards see it; ``gate_features``: ``Routing.features`` when routing already computed them. ``rows``: the
    only images whose photometric statistics are read (the others' are NaN): their per-row percentiles
    are most of the features' cost, and the monitor tests a sample of a large request."""
    gate = sample_features(x) if gate_features is None else np.asarray(gate_features, np.float32)
    if gate.shape[1] != FEATURE_DIM:
        raise InvalidInput(f"gate features must have {FEATURE_DIM} columns, got {gate.shape[1]}")
    p = np.asarray(probabilities, np.float32)
    confidence = np.maximum.reduce(p, axis=1, keepdims=True)  # ufuncs, not the methods' Python wrappers
    entropy = -np.add.reduce(p * np.log(np.maximum(p, 1e-12)), axis=1, keepdims=True)
    if rows is None:
        photometric = photometric_features(x)
    else:
        photometric = np.full((len(x), len(PHOTOMETRIC)), np.nan, np.float32)
        photometric[rows] = photometric_features(x[rows])
    return np.concatenate([gate, photometric, confidence, entropy], axis=1)


# -- the statistic --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Embedding:
    """Random Fourier features of one Gaussian kernel per feature group, side by side: [n, G * D]."""

    center: np.ndarray  # [F]
    scale: np.ndarray  # [F]
    weights: np.ndarray  # [F, G*D]: group g's block N(0, 1/bandwidth_g^2) on its features, 0 elsewhere
    offsets: np.ndarray  # [G*D]: U(0, 2 pi)
    groups: int = 1

    @classmethod
    def fit(cls, features: np.ndarray, dim: int = EMBED_DIM, seed: int = 0) -> Embedding:
        center = features.mean(axis=0)
        scale = np.maximum(features.std(axis=0), _STD_FLOOR)
        z = (features - center) / scale
        rng = np.random.default_rng(seed)
        pick = z[rng.choice(len(z), size=min(len(z), 500), replace=False)]
        weights = np.zeros((features.shape[1], dim * len(GROUPS)))
        for g, names in enumerate(GROUPS.values()):
            cols = [FEATURE_NAMES.index(n) for n in names]
            p = pick[:, cols]
            d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
            bandwidth = float(np.median(d[np.triu_indices(len(p), 1)])) or 1.0  # the median heuristic
            weights[cols, g * dim : (g + 1) * dim] = rng.standard_normal((len(cols), dim)) / bandwidth
        offsets = rng.uniform(0, 2 * np.pi, dim * len(GROUPS))
        f32 = [np.asarray(a, np.float32) for a in (center, scale, weights, offsets)]
        return cls(f32[0], f32[1], f32[2], f32[3], len(GROUPS))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float32) - self.center) / self.scale
        d = self.weights.shape[1] // self.groups
        return np.float32(np.sqrt(2.0 / d)) * np.cos(z @ self.weights + self.offsets)


def _blocks(phi: np.ndarray, groups: int) -> np.ndarray:
    return phi.reshape(*phi.shape[:-1], groups, -1)


def mean_embedding(phi: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean embedding [G*D] of a reference and its unbiased squared norm per group [G]."""
    m = len(phi)
    s = _blocks(phi.sum(axis=0, dtype=np.float64), groups)
    sq = _blocks(np.square(phi, dtype=np.float64).sum(axis=0), groups).sum(-1)
    return (s.reshape(-1) / m).astype(np.float32), ((s * s).sum(-1) - sq) / (m * (m - 1))


def mmd2(phi: np.ndarray, means: np.ndarray, norms: np.ndarray, groups: int) -> np.ndarray:
    """Unbiased MMD^2 per group between one batch's embeddings [n, G*D] and each reference -> [R, G]
    (``means`` [R, G*D], float64 spares a conversion per call)."""
    n = len(phi)
    s = _blocks(phi.sum(axis=0, dtype=np.float64), groups)  # [G, D]
    within = ((s * s).sum(-1) - _blocks(np.square(phi, dtype=np.float64).sum(axis=0), groups).sum(-1)) / (n * (n - 1))
    by_group = _blocks(np.asarray(means, np.float64), groups).transpose(1, 0, 2)  # [G, R, D]
    cross = np.matmul(by_group, s[:, :, None])[..., 0].T / n  # one small product per group, not an einsum
    return within[None] - 2.0 * cross + norms


def calibrated_thresholds(
    phi: np.ndarray, groups: int, sizes: tuple[int, ...], alpha: float, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """[G, len(sizes)]: the (1 - alpha) quantile of the null statistic per group and batch size: random
    batches of the condition against the mean embedding of its other images (batch and reference
    independent, as at serving time). NaN where too few images. Drawn in chunks (CHUNK batches of up to 16
    images, fewer of larger ones): memory stays near 100 MB whatever ``draws`` (5,000 images, 384 features)."""
    m = len(phi)
    blocks = _blocks(phi.astype(np.float64), groups)  # [m, G, D]
    total = blocks.sum(axis=0)
    sq = np.square(blocks).sum(-1)  # [m, G]
    out = np.full((groups, len(sizes)), np.nan)
    for j, size in enumerate(sizes):
        rest = m - size
        if size < 2 or rest < max(2 * size, 16):
            continue
        null = np.empty((draws, groups))
        step = max(1, min(CHUNK, CHUNK * 16 // size))  # the gather holds step x size rows of [G, D]
        for lo in range(0, draws, step):
            b = min(step, draws - lo)
            picks = np.argpartition(rng.random((b, m)), size - 1, axis=1)[:, :size]  # a random subset per row
            s_batch = blocks[picks].sum(axis=1)  # [b, G, D]
            q_batch = sq[picks].sum(axis=1)  # [b, G]
            s_rest, q_rest = total[None] - s_batch, sq.sum(0)[None] - q_batch
            within = ((s_batch * s_batch).sum(-1) - q_batch) / (size * (size - 1))
            norm = ((s_rest * s_rest).sum(-1) - q_rest) / (rest * (rest - 1))
            null[lo : lo + b] = within - 2.0 * (s_batch * s_rest).sum(-1) / (size * rest) + norm
        out[:, j] = np.quantile(null, 1.0 - alpha, axis=0)
    return out


def clean_draws(alpha: float, groups: int) -> int:
    """Null batches per size for the clean thresholds: at least TAIL of them beyond each group's (1 - alpha/G)
    quantile. With 2,000 (3 beyond it at alpha 0.005) the threshold was a lottery: the default deck fitted with
    seeds 0, 1, 2 raised 0.50-1.55% false alarms per clean 16-image test batch; with 18,000, 0.65-0.70%."""
    return max(BOOTSTRAP, int(np.ceil(TAIL * groups / alpha)))


# -- per-image scope ------------------------------------------------------------------------------
def _standardized(features: np.ndarray, embedding: Embedding, columns: np.ndarray | slice) -> np.ndarray:
    return (np.asarray(features, np.float32)[:, columns] - embedding.center[columns]) / embedding.scale[columns]


def _gaussian(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision of standardized features, covariance shrunk towards the identity (small sets)."""
    z = np.asarray(z, np.float64)
    return z.mean(axis=0), np.linalg.inv(np.cov(z, rowvar=False) + 0.25 * np.eye(z.shape[1]))


@dataclass(frozen=True)
class Scope:
    """Per-image out-of-scope score: Mahalanobis distance^2 over ``features`` to the nearest in-scope
    reference, in units of the threshold calibrated on held-out clean images (> 1: out of scope)."""

    names: tuple[str, ...]  # in-scope references: "clean", "domain:<name>", "<corruption>"
    means: np.ndarray  # [S, len(features)] in standardized units
    precisions: np.ndarray  # [S, len(features), len(features)]
    threshold: float
    fpr: float = SCOPE_FPR
    features: tuple[str, ...] = FEATURE_NAMES  # the columns it reads (format 3 and 4 files: all of them)
    _columns: np.ndarray | slice = field(init=False, repr=False, compare=False)
    reads_photometric: bool = field(init=False, repr=False, compare=False)  # any of PHOTOMETRIC
    _means64: np.ndarray = field(init=False, repr=False, compare=False)
    _precisions64: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in FEATURE_NAMES]
        if unknown or self.means.shape[1:] != (len(self.features),):
            raise InvalidInput(f"shift scope: features {unknown or list(self.features)} do not match its references")
        every = self.features == FEATURE_NAMES  # a view, not a copy, on the serving path
        columns = slice(None) if every else np.array([FEATURE_NAMES.index(f) for f in self.features])
        object.__setattr__(self, "_columns", columns)
        object.__setattr__(self, "reads_photometric", not set(PHOTOMETRIC).isdisjoint(self.features))
        object.__setattr__(self, "_means64", np.asarray(self.means, np.float64))
        object.__setattr__(self, "_precisions64", np.asarray(self.precisions, np.float64))

    @classmethod
    def fit(
        cls, references: Mapping[str, Sequence[np.ndarray] | np.ndarray], embedding: Embedding, fpr: float = SCOPE_FPR,
        seed: int = 0, folds: int = SCOPE_FOLDS, features: Sequence[str] = FEATURE_NAMES,
    ) -> Scope:  # fmt: skip
        """``references``: name -> feature arrays [n_i, F] pooled into one Gaussian, clean first. The threshold
        is a conformal quantile of out-of-fold clean scores: a new clean image is out of scope with
        probability <= ``fpr``. An array with one row per clean image is taken as those images under a
        condition (a corruption of them): its rows leave with their fold, since a clean image whose own
        corrupted copy fitted a reference is nearer to it than a new image would be."""
        arrays: list[list[np.ndarray]] = [[a] if isinstance(a, np.ndarray) else list(a) for a in references.values()]
        clean = arrays[0][0]
        n = len(clean)
        names, features = tuple(references), tuple(features)
        columns = np.array([FEATURE_NAMES.index(f) for f in features])

        def fitted(keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
            stats = [_gaussian(_standardized(np.concatenate([a if keep is None or len(a) != n else a[keep]
                                                             for a in parts]), embedding, columns))
                     for parts in arrays]  # fmt: skip
            return tuple(np.stack(x).astype(np.float32) for x in zip(*stats))  # type: ignore[return-value]

        held = []
        for part in np.array_split(np.random.default_rng(seed).permutation(n), folds):
            keep = np.ones(n, bool)
            keep[part] = False
            held.append(cls(names, *fitted(keep), 1.0, fpr, features).raw(clean[part], embedding))
        raw = np.sort(np.concatenate(held))
        rank = min(int(np.ceil((n + 1) * (1.0 - fpr))), n)  # finite-sample (conformal) correction
        return cls(names, *fitted(None), float(raw[rank - 1]), fpr, features)

    def raw(self, features: np.ndarray, embedding: Embedding) -> np.ndarray:
        z = _standardized(features, embedding, self._columns).astype(np.float64)
        zc = z[None] - self._means64[:, None]  # [S, n, F]
        # one small gemm per reference (a stacked matmul): a single wide product would make BLAS spread
        # threads over a machine the ONNX sessions already keep busy (measured 20x slower under load).
        # In float64: an image's float32 score must not depend on the other rows of its micro-batch, and
        # float32 gemm kernels round a row differently by the matrix's height (OpenBLAS 0.3.31, this CPU)
        return (np.matmul(zc, self._precisions64) * zc).sum(-1).min(axis=0)

    def scores(self, features: np.ndarray, embedding: Embedding) -> np.ndarray:
        return (self.raw(features, embedding) / self.threshold).astype(np.float32)


# -- the detector ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """What the detector says about one batch or window."""

    state: str  # one of STATES
    statistic: float  # MMD^2 against clean, in units of the clean threshold (> 1: not in-distribution)
    distance: float  # to the nearest known shifted condition, in units of its threshold (<= 1: near it)
    nearest: str  # that condition's name, e.g. "fog/5" or "domain:gaussian"
    expected_accuracy: float  # NaN: unknown
    size: int
    expected_kind: str = "estimate"  # "estimate", "upper_bound" (uncovered) or "unknown"
    out_of_scope: float = 0.0  # share of the batch's images out of scope
    # why a covered batch is covered: "known" (near a condition the deck handles), "in_scope" (a new shift,
    # images in scope, estimate near clean), "confidence" (out of scope, DoC near clean) or "agreement" (DoA)
    covered_by: str = ""  # one of COVERED_BY; "" when not covered


@dataclass(frozen=True)
class ShiftDetector:
    """A calibrated three-state shift detector with a per-image scope (module docstring). Condition 0 is clean."""

    embedding: Embedding
    conditions: tuple[str, ...]  # "clean", "domain:<name>", "<corruption>/<severity>"
    means: np.ndarray  # [R, G*D] mean embeddings
    norms: np.ndarray  # [R, G] unbiased squared norms
    thresholds: np.ndarray  # [R, G, len(sizes)] (NaN: too few images to calibrate)
    accuracy: np.ndarray  # [R] the deck's accuracy (default policy) on each condition
    scope: Scope
    sizes: tuple[int, ...] = SIZES
    alpha: float = ALPHA
    tolerance: float = TOLERANCE
    confidence_threshold: float = 0.5  # ATC: clean validation accuracy = share of confidences above it
    notes: dict[str, Any] = field(default_factory=dict)
    confidence: np.ndarray | None = None  # [R] the deck's mean confidence on each condition (None: format 3)
    agreement: np.ndarray | None = None  # [R] the cards' mean agreement on each condition (None: fitted before it)
    label_share: np.ndarray | None = None  # [C] each class's share of the deck's clean answers (None: fitted before)
    _collapse: dict[int, float] = field(init=False, repr=False, compare=False)  # threshold per size, computed once
    _means64: np.ndarray = field(init=False, repr=False, compare=False)  # what every test reads

    def __post_init__(self) -> None:
        r, g = len(self.conditions), self.embedding.groups
        if not r or self.conditions[0] != "clean":
            raise InvalidInput("shift detector: the first reference condition must be 'clean'")
        if (self.means.shape[0], self.norms.shape, self.thresholds.shape, self.accuracy.shape) != (
            r, (r, g), (r, g, len(self.sizes)), (r,)
        ):  # fmt: skip
            raise InvalidInput("shift detector: conditions, embeddings, thresholds and accuracies disagree in size")
        if self.confidence is not None and self.confidence.shape != (r,):
            raise InvalidInput("shift detector: conditions and mean confidences disagree in size")
        if self.agreement is not None and self.agreement.shape != (r,):
            raise InvalidInput("shift detector: conditions and mean agreements disagree in size")
        if not 0 < self.alpha < 1:
            raise InvalidInput(f"shift detector: alpha must be in (0, 1), got {self.alpha}")
        if self.label_share is not None and (self.label_share.ndim != 1 or not np.isclose(self.label_share.sum(), 1)):
            raise InvalidInput("shift detector: the clean answers' class shares must be one vector summing to 1")
        object.__setattr__(self, "_means64", self.means.astype(np.float64))
        object.__setattr__(self, "_collapse", {})

    @property
    def ert(self) -> float:
        """Expected run time between false alarms on in-distribution traffic, in batches (or windows)."""
        return 1.0 / self.alpha

    @property
    def clean_accuracy(self) -> float:
        return float(self.accuracy[0])

    def _column(self, n: int) -> int:
        """The largest calibrated size <= n (a bigger batch is less noisy: its threshold errs high) that clean
        data had enough images to calibrate."""
        if n < self.sizes[0]:
            raise InvalidInput(f"shift test needs at least {self.sizes[0]} images, got {n}")
        col = int(np.searchsorted(np.asarray(self.sizes), n, side="right") - 1)
        while col > 0 and not np.isfinite(self.thresholds[0, :, col]).all():  # too few images to calibrate it
            col -= 1
        return col

    def statistics(self, features: np.ndarray) -> np.ndarray:
        """MMD^2 of the batch against every condition, in units of its threshold, largest group -> [R]."""
        t = self.thresholds[:, :, self._column(len(features))]
        raw = mmd2(self.embedding(features), self._means64, self.norms, self.embedding.groups)
        ok = np.isfinite(t).all(axis=1)
        ratio = (raw / np.where(np.isfinite(t), t, 1.0)).max(axis=1)
        return np.where(ok, ratio, np.inf)

    def image_scores(self, features: np.ndarray) -> np.ndarray:
        """Per-image out-of-scope scores [n] in threshold units (> 1: out of scope)."""
        return self.scope.scores(features, self.embedding)

    def test(
        self,
        features: np.ndarray,
        scores: np.ndarray | None = None,
        agreement: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> Verdict:
        """The batch's verdict. ``scores``: its images' out-of-scope scores (computed when None); ``agreement``:
        its images' card agreement (:func:`carddeck.deck.deck.agreement_of`; None or NaN: unknown); ``labels``:
        the deck's answers to the request (all its images, or the window's; None: unknown)."""
        ratio = self.statistics(features)
        shifted = ratio[1:]
        k = int(np.argmin(shifted)) + 1 if len(shifted) else 0
        distance = float(shifted[k - 1]) if k else float("inf")
        scores = self.image_scores(features) if scores is None else scores
        outside = float((scores > 1.0).mean())
        doc = self._doc(features)
        expected, kind = self._expected(ratio, features, doc), "estimate"
        clean = self.clean_accuracy
        near_known = k and distance <= 1.0 and self.accuracy[k] >= clean - self.tolerance
        # covered: like a condition the deck handles, or a shift no reference matches (a new corruption
        # family) whose own evidence says the deck holds: most images in scope and the estimate within
        # tolerance of clean (the estimate of a batch of n is noisy: ATC moves in steps of 1/n, so the margin
        # widens as 1/sqrt(n)); or most images out of scope, few foreign, near no known condition, and the
        # confidences alone (DoC) within tolerance of clean: the nearest conditions' accuracies say nothing
        # about images unlike them (digits32 val, weather held out: fog/5, 68% true, blend 90, DoC 73; shot
        # noise 99%, DoC 103). Foreign images stay uncovered whatever the confidences: a deck can be confident
        # on black images; near a harmful condition is evidence of harm, whatever the confidences. Or the cards
        # agree on it as on clean images (DoA), the confidences within twice the tolerance: images as far out
        # of scope as foreign ones are then a shift the cards read alike, not another kind of image (foreign
        # sets: DoA 30-68 on both decks; digits32 val, each family held out: 15 of the 23 benign conditions
        # over 10% uncovered come under 10%; fog/4, 88% true, stays 83% uncovered).
        in_scope = outside <= 0.5
        foreign = float((scores > FOREIGN).mean()) > FOREIGN_SHARE  # no estimate can vouch for those images
        doa = self._doa(agreement)
        agree = doa >= clean - self.tolerance and doc >= clean - 2 * self.tolerance
        if in_scope:
            holds = expected >= clean - self.tolerance - 0.25 / np.sqrt(len(features)) and not foreign
            path = "in_scope"
        else:
            # the cards' own outputs vouch for images unlike every reference, unless their answers pile onto
            # a few classes as no clean request's do: confidently wrong the same way (leaves32 val, colour
            # cast/4: 11% true, DoC near clean in every batch, answers a different class mix from clean's).
            # Not in scope, where a request of one class (label shift, not harm) is an ordinary thing.
            confident = doc >= clean - self.tolerance and not foreign
            holds = distance > 1.0 and (confident or agree) and not self.collapsed(labels)
            path = "confidence" if confident else "agreement"
        covered_by = ""
        if ratio[0] <= 1.0:
            state = "in_distribution"
        elif (near_known and not foreign) or holds:
            state, covered_by = "covered", "known" if near_known and not foreign else path
        else:
            state = "uncovered"
        if state == "uncovered" and outside > 0.5 and not ratio.min() <= 3.0:  # mostly foreign, far from all
            expected, kind = float("nan"), "unknown"
        elif state == "uncovered":  # never more confident than on the data the deck was made for
            expected, kind = min(expected, clean), "upper_bound"
        elif state == "covered" and not (near_known or in_scope):  # vouched for by confidences: no more than clean
            expected = min(expected, clean)
        name = self.conditions[k] if k else ""
        return Verdict(state, float(ratio[0]), distance, name, expected, len(features), kind, outside, covered_by)

    def collapsed(self, labels: np.ndarray | None) -> bool:
        """Whether the answers' class mix is farther from clean's (total variation) than a clean request of
        that size is with probability 1 - alpha (False when either is unknown)."""
        q = self.label_share
        if q is None or labels is None or len(labels) < self.sizes[0]:
            return False
        counts = np.bincount(np.asarray(labels, np.int64), minlength=len(q))
        mix = np.zeros(len(counts))
        mix[: len(q)] = q  # a class the clean answers never gave counts wholly against the batch
        size = self.sizes[int(np.searchsorted(np.asarray(self.sizes), len(labels), side="right") - 1)]
        threshold = self._collapse.get(size)
        if threshold is None:  # a smaller size's threshold errs high for a bigger request: never more alarms
            draws = np.random.default_rng(0).multinomial(size, q, size=COLLAPSE_DRAWS) / size
            threshold = float(np.quantile(0.5 * np.abs(draws - q).sum(axis=1), 1.0 - self.alpha))
            self._collapse[size] = threshold
        return bool(0.5 * np.abs(counts / len(labels) - mix).sum() > threshold)

    def _doc(self, features: np.ndarray) -> float:
        """DoC: the clean accuracy minus the drop of the batch's mean confidence from clean (ATC for format 3)."""
        if self.confidence is None:
            return self._atc(features)
        return float(self.accuracy[0] - self.confidence[0] + features[:, CONFIDENCE].mean())

    def _doa(self, agreement: np.ndarray | None) -> float:
        """DoA: the clean accuracy minus the drop of the cards' mean agreement from clean; -inf when unknown (a
        detector fitted before agreement, or fewer than AGREEMENT_SHARE of the images with a second card)."""
        if self.agreement is None or agreement is None:
            return float("-inf")
        known = agreement[np.isfinite(agreement)]
        if not len(known) or len(known) < AGREEMENT_SHARE * len(agreement):
            return float("-inf")
        return float(self.accuracy[0] - self.agreement[0] + known.mean())

    def _atc(self, features: np.ndarray) -> float:
        return float((features[:, CONFIDENCE] > self.confidence_threshold).mean())

    def _expected(self, ratio: np.ndarray, features: np.ndarray, doc: float | None = None) -> float:
        atc = self._atc(features)
        doc = self._doc(features) if doc is None else doc
        near, by_doc, by_atc = EXPECTED_WEIGHTS
        finite = np.isfinite(ratio)
        if not finite.any():  # no condition calibrated at this size: only the confidences speak
            return (by_doc * doc + by_atc * atc) / (by_doc + by_atc)
        r2 = np.where(finite, np.square(np.where(finite, ratio, 0.0)), np.inf)
        # relative to the nearest condition: far from all of them (a new family), the nearest still speak
        # (an absolute kernel let every weight vanish and left ATC alone: contrast 72% true, 37% estimated)
        votes = np.exp(-0.5 * (r2 - r2.min()))
        return near * float(votes @ self.accuracy / votes.sum()) + by_doc * doc + by_atc * atc

    def without(self, corruptions: str | tuple[str, ...], *, scope: bool = True) -> ShiftDetector:
        """The detector without these corruptions' conditions (to score on corruptions it has not seen);
        ``scope=False`` keeps them in the per-image scope."""
        drop = {corruptions} if isinstance(corruptions, str) else set(corruptions)
        keep = [i for i, c in enumerate(self.conditions) if c.rsplit("/", 1)[0] not in drop or i == 0]
        sc = self.scope
        inside = [i for i, c in enumerate(sc.names) if not scope or c.rsplit("/", 1)[0] not in drop or i == 0]
        return replace(
            self,
            scope=replace(
                sc, names=tuple(sc.names[i] for i in inside), means=sc.means[inside], precisions=sc.precisions[inside]
            ),
            conditions=tuple(self.conditions[i] for i in keep),
            means=self.means[keep],
            norms=self.norms[keep],
            thresholds=self.thresholds[keep],
            accuracy=self.accuracy[keep],
            confidence=None if self.confidence is None else self.confidence[keep],
            agreement=None if self.agreement is None else self.agreement[keep],
        )

    def expected_accuracy(self, features: np.ndarray) -> float:
        """The batch's expected accuracy (NaN: unknown), as :meth:`test` reports it."""
        return self.test(features).expected_accuracy

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: Path | str | BinaryIO) -> None:
        if isinstance(path, str | Path):
            with open(path, "wb") as f:
                self.save(f)
            return
        header = {
            "format": FORMAT,
            "conditions": list(self.conditions),
            "sizes": list(self.sizes),
            "alpha": self.alpha,
            "tolerance": self.tolerance,
            "confidence_threshold": self.confidence_threshold,
            "features": list(FEATURE_NAMES),
            "groups": self.embedding.groups,
            "scope": {
                "names": list(self.scope.names),
                "threshold": self.scope.threshold,
                "fpr": self.scope.fpr,
                "features": list(self.scope.features),
            },
            "notes": self.notes,
        }
        e, s = self.embedding, self.scope
        arrays = {"means": self.means, "norms": self.norms, "thresholds": self.thresholds, "accuracy": self.accuracy,
                  "center": e.center, "scale": e.scale, "weights": e.weights, "offsets": e.offsets,
                  "scope_means": s.means, "scope_precisions": s.precisions,
                  **({} if self.confidence is None else {"confidence": self.confidence}),
                  **({} if self.agreement is None else {"agreement": self.agreement}),
                  **({} if self.label_share is None else {"label_share": self.label_share})}  # fmt: skip
        np.savez(path, header=np.array(json.dumps(header)), **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path | str | BinaryIO, name: str | None = None) -> ShiftDetector:
        """Read a detector from a path or file object (``name``: what to call it in errors)."""
        name = name or str(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                a = {k: z[k] for k in z.files if k != "header"}
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidInput(f"{name}: not a shift detector file ({exc})") from None
        if header.get("format") not in READABLE:
            raise InvalidInput(
                f"{name}: shift format {header.get('format')!r}, readable: {', '.join(READABLE)}; refit it "
                "(carddeck shift --fit)"
            )
        if tuple(header.get("features", ())) != FEATURE_NAMES:
            raise InvalidInput(f"{name}: fitted on other image features; refit it")
        try:
            sc = header["scope"]
            return cls(
                Embedding(a["center"], a["scale"], a["weights"], a["offsets"], int(header["groups"])),
                tuple(header["conditions"]), a["means"], a["norms"], a["thresholds"], a["accuracy"],
                Scope(tuple(sc["names"]), a["scope_means"], a["scope_precisions"], float(sc["threshold"]),
                      float(sc["fpr"]), tuple(sc.get("features", FEATURE_NAMES))),
                tuple(int(s) for s in header["sizes"]), float(header["alpha"]), float(header["tolerance"]),
                float(header["confidence_threshold"]), dict(header.get("notes", {})), a.get("confidence"),
                a.get("agreement"), a.get("label_share"),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{name}: malformed shift detector ({type(exc).__name__}: {exc})") from None


# -- what one request is told ----------------------------------------------------------------------
@dataclass(frozen=True)
class Trust:
    """The verdict one request gets back (computed once per micro-batch; see ShiftMonitor.judge).

    ``state``: the shift state of the request's batch (``scope`` "batch"), or of the latest window of
    small requests to its model ("window"), or ``unknown`` (no detector fitted to the deck's cards yet,
    or no window full yet: "none"). ``shifted`` is the one question adaptation asks."""

    state: str
    scope: str  # "batch", "window" or "none"
    expected_accuracy: float  # NaN: unknown
    expected_kind: str  # "estimate", "upper_bound" or "unknown"
    out_of_scope: np.ndarray  # [n] float32 per-image scores in threshold units (NaN: no detector)
    risk: np.ndarray  # [n] float32 estimated error probability per image
    covered_by: str = ""  # Verdict.covered_by of the batch or window: why "covered" (one of COVERED_BY)

    @property
    def in_scope(self) -> np.ndarray:
        """[n] bool; an unscored image (no detector) counts as in scope."""
        return ~(self.out_of_scope > 1.0)

    @property
    def shifted(self) -> bool | None:
        """True: the request's batch or window is shifted away from clean; None: unknown."""
        return None if self.state == UNKNOWN else self.state != "in_distribution"

    def abstained(self, above_risk: float | None) -> np.ndarray:
        """[n] bool: images whose estimated risk exceeds the caller's bound (none when no bound)."""
        if above_risk is None:
            return np.zeros(len(self.risk), bool)
        return self.risk > above_risk

    @classmethod
    def unknown(cls, n: int, probabilities: np.ndarray | None = None) -> Trust:
        nan = np.full(n, np.nan, np.float32)
        risk = nan if probabilities is None else image_risk(probabilities, nan)
        return cls(UNKNOWN, "none", float("nan"), "unknown", nan, risk)


def image_risk(probabilities: np.ndarray, out_of_scope: np.ndarray) -> np.ndarray:
    """Estimated error probability per image: 1 - the deck's confidence, and 1 for an image out of scope
    (no confidence of a model means anything on an image unlike any it was made for)."""
    risk = 1.0 - np.maximum.reduce(np.asarray(probabilities, np.float32), axis=1)  # ufuncs: no Python wrappers
    risk[out_of_scope > 1.0] = 1.0
    return risk


__all__ = [
    "ALPHA",
    "COVERED_BY",
    "FEATURE_NAMES",
    "GROUPS",
    "SCOPE_FEATURE_SETS",
    "SCOPE_FPR",
    "STATES",
    "UNKNOWN",
    "Embedding",
    "Scope",
    "ShiftDetector",
    "Trust",
    "Verdict",
    "image_features",
    "image_risk",
]
