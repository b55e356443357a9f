"""The shift signal: is live traffic in-distribution, a shift the deck covers, or one it does not?

**Features** (:func:`image_features`, per image, numpy/scipy only): the gate's own per-image
features (``carddeck.gating.sample_features``: radial log-spectrum, orientation wedges, per-channel
mean and spread, local contrast, gradient, clipping, saturation; routing has computed them already)
and what the deck said about the image (its confidence and the entropy of its combined probabilities).

**Statistic.** A kernel two-sample statistic, MMD^2 with a Gaussian kernel on standardized features,
between a batch and a reference condition. The kernel is approximated by random Fourier features,
so a reference condition is one mean embedding and the test costs one small matrix product; the
within-batch term is unbiased, so the statistic is centred at 0 for a batch of the condition.

**Calibration** (:func:`fit_detector`, offline, on held-out data with labels: the validation split
the calibrated router also uses). Reference conditions: the clean images, each augmentation domain
the deck's cards were trained on, and every benchmark corruption x severity. For each, the deck's
accuracy (default policy) and a null distribution of the statistic from random batches of that
condition (bootstrap, with the embedding estimated on the other half so batch and reference are
independent, as at serving time) give a threshold per batch size at false-alarm rate ``alpha``.

**States** of a batch (or window) of n images:

- *in-distribution*: the statistic against clean stays under the clean threshold. A clean batch
  crosses it with probability ``alpha``: the expected run time (ERT) between false alarms on
  in-distribution traffic is 1/alpha batches (or windows).
- *covered*: far from clean, but consistent with a reference condition (statistic under that
  condition's threshold) on which the deck lost at most ``tolerance`` against clean.
- *uncovered*: consistent with no reference condition, or the nearest one is where the deck is
  inaccurate.

**Expected accuracy** (:meth:`ShiftDetector.expected_accuracy`): the deck's accuracy on the reference
conditions, weighted by a Gaussian kernel of the batch's statistic to each (in threshold units), and
average thresholded confidence (ATC: the share of images whose confidence clears the threshold that
clean validation accuracy implies), averaged.

Batch-1 traffic goes through a sliding window per model (:class:`ShiftMonitor`). The detector is
saved beside the router in the deck store (``gate/shift-N.npz``, manifest ``gate.shift``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from carddeck.errors import InvalidInput
from carddeck.gating.signature import FEATURE_DIM, ORIENTATIONS, SIGNATURE_DIM, sample_features

if TYPE_CHECKING:
    from carddeck.deck import Deck
    from carddeck.observability.metrics import Metrics

log = logging.getLogger(__name__)

FORMAT = "carddeck-shift/2"  # 2: calibrated MMD detector with three states (1 was distance thresholds)
STATES = ("in_distribution", "covered", "uncovered")
ALPHA = 0.005  # false alarms per in-distribution batch: ERT 200 batches
TOLERANCE = 0.05  # accuracy a condition may lose against clean and still count as covered
SIZES = (4, 8, 16, 32, 64, 128)  # batch sizes with a calibrated threshold
EMBED_DIM = 256  # random Fourier features
BOOTSTRAP = 2000  # null batches per size (clean); conditions use a quarter
_STD_FLOOR = 0.02  # features constant on clean data (e.g. saturation of grey digits) still get a scale

FEATURE_NAMES = (
    *(f"spectrum_{i}" for i in range(SIGNATURE_DIM)),  # the gate's features (sample_features) ...
    *(f"orientation_{i}" for i in range(ORIENTATIONS)),
    *(f"mean_{c}" for c in "rgb"),
    *(f"std_{c}" for c in "rgb"),
    "local_contrast",
    "gradient",
    "clipped",
    "saturation",
    "confidence",  # ... and what the deck said about the image
    "entropy",
)


def image_features(x: np.ndarray, probabilities: np.ndarray, gate_features: np.ndarray | None = None) -> np.ndarray:
    """Per-image features, float32 [N, F]: the gate's per-image features (``sample_features``:
    radial spectrum, orientation, colour, local statistics; pass ``Routing.features`` when routing
    already computed them) and the confidence and entropy of the deck's combined ``probabilities``.
    ``x``: float32 [N, 3, H, W] in [0, 1], as the cards see it."""
    gate = sample_features(x) if gate_features is None else np.asarray(gate_features, np.float32)
    if gate.shape[1] != FEATURE_DIM:
        raise InvalidInput(f"gate features must have {FEATURE_DIM} columns, got {gate.shape[1]}")
    p = np.asarray(probabilities, np.float32)
    confidence = p.max(axis=1, keepdims=True)
    entropy = -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1, keepdims=True)
    return np.concatenate([gate, confidence, entropy], axis=1)


# -- the statistic --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Embedding:
    """Random Fourier features of a Gaussian kernel on standardized image features."""

    center: np.ndarray  # [F]
    scale: np.ndarray  # [F]
    weights: np.ndarray  # [F, D]: N(0, 1/bandwidth^2)
    offsets: np.ndarray  # [D]: U(0, 2 pi)

    @classmethod
    def fit(cls, features: np.ndarray, dim: int = EMBED_DIM, seed: int = 0) -> Embedding:
        center = features.mean(axis=0)
        scale = np.maximum(features.std(axis=0), _STD_FLOOR)
        z = (features - center) / scale
        rng = np.random.default_rng(seed)
        pick = z[rng.choice(len(z), size=min(len(z), 500), replace=False)]
        d = np.sqrt(((pick[:, None] - pick[None]) ** 2).sum(-1))
        bandwidth = float(np.median(d[np.triu_indices(len(pick), 1)])) or 1.0  # the median heuristic
        weights = rng.standard_normal((features.shape[1], dim)) / bandwidth
        offsets = rng.uniform(0, 2 * np.pi, dim)
        return cls(*(np.asarray(a, np.float32) for a in (center, scale, weights, offsets)))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float32) - self.center) / self.scale
        return np.float32(np.sqrt(2.0 / self.weights.shape[1])) * np.cos(z @ self.weights + self.offsets)


def mean_embedding(phi: np.ndarray) -> tuple[np.ndarray, float]:
    """Mean embedding [D] of a reference and its unbiased squared norm (mean kernel over distinct pairs)."""
    m = len(phi)
    s = phi.sum(axis=0, dtype=np.float64)
    return (s / m).astype(np.float32), float((s @ s - np.square(phi, dtype=np.float64).sum()) / (m * (m - 1)))


def mmd2(phi: np.ndarray, means: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 between one batch's embeddings [n, D] and each reference [R, D] -> [R]."""
    n = len(phi)
    s = phi.sum(axis=0, dtype=np.float64)
    within = (s @ s - np.square(phi, dtype=np.float64).sum()) / (n * (n - 1))
    return (within - 2.0 * (means @ s) / n + norms).astype(np.float64)


def calibrated_thresholds(
    phi: np.ndarray, sizes: Sequence[int], alpha: float, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """The (1 - alpha) quantile of the null statistic per batch size: random batches of the condition
    against the mean embedding of the condition's other images (leave the batch out, so batch and
    reference are independent as they are at serving time). NaN where too few images."""
    m = len(phi)
    total = phi.sum(axis=0, dtype=np.float64)
    sq = np.square(phi, dtype=np.float64).sum(axis=1)
    out = []
    for size in sizes:
        rest = m - size
        if size < 2 or rest < max(2 * size, 16):
            out.append(np.nan)
            continue
        picks = np.argsort(rng.random((draws, m)), axis=1)[:, :size]
        counts = np.zeros((draws, m))
        np.put_along_axis(counts, picks, 1.0, axis=1)
        s_batch, q_batch = counts @ phi, counts @ sq
        s_rest, q_rest = total - s_batch, sq.sum() - q_batch
        within = ((s_batch * s_batch).sum(axis=1) - q_batch) / (size * (size - 1))
        norm = ((s_rest * s_rest).sum(axis=1) - q_rest) / (rest * (rest - 1))
        null = within - 2.0 * (s_batch * s_rest).sum(axis=1) / (size * rest) + norm
        out.append(float(np.quantile(null, 1.0 - alpha)))
    return np.asarray(out, np.float64)


# -- the detector ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """What the detector says about one batch or window."""

    state: str  # one of STATES
    statistic: float  # MMD^2 against clean, in units of the clean threshold (> 1: not in-distribution)
    distance: float  # to the nearest known shifted condition, in units of its threshold (<= 1: near it)
    nearest: str  # that condition's name, e.g. "fog/5" or "domain:gaussian"
    expected_accuracy: float
    size: int


@dataclass(frozen=True)
class ShiftDetector:
    """A calibrated three-state shift detector (see the module docstring). Index 0 of the conditions is clean."""

    embedding: Embedding
    conditions: tuple[str, ...]  # "clean", "domain:<name>", "<corruption>/<severity>"
    means: np.ndarray  # [R, D] mean embeddings
    norms: np.ndarray  # [R] unbiased squared norms
    thresholds: np.ndarray  # [R, len(sizes)] at false-alarm rate alpha (NaN: too few images to calibrate)
    accuracy: np.ndarray  # [R] the deck's accuracy (default policy) on each condition
    sizes: tuple[int, ...] = SIZES
    alpha: float = ALPHA
    tolerance: float = TOLERANCE
    confidence_threshold: float = 0.5  # ATC: clean validation accuracy = share of confidences above it
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        r = len(self.conditions)
        if not r or self.conditions[0] != "clean":
            raise InvalidInput("shift detector: the first reference condition must be 'clean'")
        if self.means.shape[0] != r or self.thresholds.shape != (r, len(self.sizes)) or self.accuracy.shape != (r,):
            raise InvalidInput("shift detector: conditions, embeddings, thresholds and accuracies disagree in size")
        if not 0 < self.alpha < 1:
            raise InvalidInput(f"shift detector: alpha must be in (0, 1), got {self.alpha}")

    @property
    def ert(self) -> float:
        """Expected run time between false alarms on in-distribution traffic, in batches (or windows)."""
        return 1.0 / self.alpha

    def _column(self, n: int) -> int:
        """The largest calibrated size <= n (a bigger batch is less noisy: its threshold errs high)."""
        if n < self.sizes[0]:
            raise InvalidInput(f"shift test needs at least {self.sizes[0]} images, got {n}")
        return int(np.searchsorted(np.asarray(self.sizes), n, side="right") - 1)

    def statistics(self, features: np.ndarray) -> np.ndarray:
        """MMD^2 of the batch against every condition, in units of that condition's threshold -> [R]."""
        t = self.thresholds[:, self._column(len(features))]
        raw = mmd2(self.embedding(features), self.means, self.norms)
        return np.where(np.isfinite(t), raw / np.where(np.isfinite(t), t, 1.0), np.inf)

    def test(self, features: np.ndarray) -> Verdict:
        ratio = self.statistics(features)
        expected = self._expected(ratio, features)
        shifted = ratio[1:]
        k = int(np.argmin(shifted)) + 1 if len(shifted) else 0
        distance = float(shifted[k - 1]) if k else float("inf")
        if ratio[0] <= 1.0:
            state = "in_distribution"
        elif k and distance <= 1.0 and self.accuracy[k] >= self.accuracy[0] - self.tolerance:
            state = "covered"
        else:
            state = "uncovered"
        name = self.conditions[k] if k else ""
        return Verdict(state, float(ratio[0]), distance, name, expected, len(features))

    def _expected(self, ratio: np.ndarray, features: np.ndarray) -> float:
        finite = np.isfinite(ratio)
        votes = np.where(finite, np.exp(-0.5 * np.square(np.where(finite, ratio, 0.0))), 0.0)
        atc = float((features[:, FEATURE_NAMES.index("confidence")] > self.confidence_threshold).mean())
        if votes.sum() < 1e-6:  # far from every condition: only the confidences speak
            return atc
        return 0.5 * float(votes @ self.accuracy / votes.sum()) + 0.5 * atc

    def without(self, corruption: str) -> ShiftDetector:
        """The detector without ``corruption``'s conditions (to score estimates on unseen corruptions)."""
        keep = [i for i, c in enumerate(self.conditions) if c.rsplit("/", 1)[0] != corruption or i == 0]
        return replace(
            self,
            conditions=tuple(self.conditions[i] for i in keep),
            means=self.means[keep],
            norms=self.norms[keep],
            thresholds=self.thresholds[keep],
            accuracy=self.accuracy[keep],
        )

    def expected_accuracy(self, features: np.ndarray) -> float:
        return self._expected(self.statistics(features), features)

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: Path | str | BinaryIO) -> None:
        header = {
            "format": FORMAT,
            "conditions": list(self.conditions),
            "sizes": list(self.sizes),
            "alpha": self.alpha,
            "tolerance": self.tolerance,
            "confidence_threshold": self.confidence_threshold,
            "features": list(FEATURE_NAMES),
            "notes": self.notes,
        }
        if isinstance(path, str | Path):
            with open(path, "wb") as f:
                self.save(f)
            return
        e = self.embedding
        np.savez(
            path,
            header=np.array(json.dumps(header)),
            means=self.means,
            norms=self.norms,
            thresholds=self.thresholds,
            accuracy=self.accuracy,
            center=e.center,
            scale=e.scale,
            weights=e.weights,
            offsets=e.offsets,
        )

    @classmethod
    def load(cls, path: Path | str | BinaryIO) -> ShiftDetector:
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                arrays = {k: z[k] for k in z.files if k != "header"}
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidInput(f"{path}: not a shift detector file ({exc})") from None
        if header.get("format") != FORMAT:
            raise InvalidInput(
                f"{path}: shift format {header.get('format')!r}, expected {FORMAT!r}; run carddeck shift"
            )
        if tuple(header.get("features", ())) != FEATURE_NAMES:
            raise InvalidInput(f"{path}: fitted on other image features; run `carddeck shift --fit` again")
        try:
            return cls(
                Embedding(arrays["center"], arrays["scale"], arrays["weights"], arrays["offsets"]),
                tuple(header["conditions"]),
                arrays["means"],
                arrays["norms"],
                arrays["thresholds"],
                arrays["accuracy"],
                tuple(int(s) for s in header["sizes"]),
                float(header["alpha"]),
                float(header["tolerance"]),
                float(header["confidence_threshold"]),
                dict(header.get("notes", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{path}: malformed shift detector ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Reference:
    """One reference condition for :func:`fit_detector`: per-image features and the deck's hits."""

    name: str
    features: np.ndarray  # [n, F]
    correct: np.ndarray  # [n] bool


def fit_detector(
    references: Sequence[Reference],
    *,
    alpha: float = ALPHA,
    tolerance: float = TOLERANCE,
    sizes: Sequence[int] = SIZES,
    draws: int = BOOTSTRAP,
    seed: int = 0,
    dim: int = EMBED_DIM,
    cards: Sequence[str] = (),
) -> ShiftDetector:
    """Calibrate on reference conditions (the first must be clean). ``cards``: the keys of the cards
    whose predictions the features hold; a deck with other cards does not use the detector."""
    if not references or references[0].name != "clean":
        raise InvalidInput("fit_detector: the first reference condition must be 'clean'")
    if not 0 < alpha < 0.5:
        raise InvalidInput(f"alpha must be in (0, 0.5), got {alpha}")
    rng = np.random.default_rng(seed)
    clean = references[0]
    embedding = Embedding.fit(clean.features, dim=dim, seed=seed)
    means, norms, thresholds = [], [], []
    for i, ref in enumerate(references):
        phi = embedding(ref.features)
        mean, norm = mean_embedding(phi)
        means.append(mean)
        norms.append(norm)
        thresholds.append(calibrated_thresholds(phi, sizes, alpha, draws if i == 0 else draws // 4, rng))
    accuracy = np.array([r.correct.mean() for r in references], np.float32)
    # ATC: the confidence above which the share of clean images equals the clean accuracy.
    conf = clean.features[:, FEATURE_NAMES.index("confidence")]
    atc = float(np.quantile(conf, 1.0 - accuracy[0]))
    return ShiftDetector(
        embedding,
        tuple(r.name for r in references),
        np.stack(means),
        np.asarray(norms, np.float64),
        np.stack(thresholds),
        accuracy,
        tuple(int(s) for s in sizes),
        alpha,
        tolerance,
        atc,
        {
            "clean_images": len(clean.features),
            "conditions": len(references),
            **({"cards": list(cards)} if cards else {}),
        },
    )


def deck_references(
    deck: Deck,
    images: np.ndarray,
    labels: np.ndarray,
    conditions: Iterable[tuple[str, int]],
    *,
    domains: Sequence[str] = (),
    seed: int = 1,
    batch_size: int = 16,
    progress: Callable[[Iterable[Any]], Iterable[Any]] = lambda it: it,
) -> list[Reference]:
    """Features and hits of the deck (default policy, ``batch_size`` requests) on clean ``images``,
    each augmentation domain in ``domains``, and each (corruption, severity) in ``conditions``."""
    from carddeck.data.corruptions import corrupt
    from carddeck.data.domains import augment

    def images_of(name: str) -> np.ndarray:
        if name == "clean":
            return images
        if name.startswith("domain:"):
            augmented = augment(images, name.split(":", 1)[1], np.random.default_rng(seed))
            return (augmented * 255 + 0.5).astype(np.uint8)
        corruption, severity = name.rsplit("/", 1)
        return corrupt(images, corruption, int(severity), seed=seed)

    names = ["clean", *(f"domain:{d}" for d in domains), *(f"{c}/{s}" for c, s in conditions)]
    references = []
    for name in progress(names):
        features, hits = deck_features(deck, images_of(name), batch_size=batch_size, labels=labels)
        references.append(Reference(name, features, hits))
    return references


def deck_features(
    deck: Deck, images: np.ndarray, *, batch_size: int = 16, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Features of ``images`` as the server sees them (requests of ``batch_size``, default policy),
    and which predictions were right (all False without ``labels``)."""
    feats, hits = [], []
    for i in range(0, len(images), batch_size):
        part = images[i : i + batch_size]
        prediction = deck.predict(part)
        feats.append(image_features(deck.prepare(part), prediction.probabilities, prediction.routing.features))
        if labels is not None:
            hits.append(prediction.labels == labels[i : i + batch_size])
    return np.concatenate(feats), np.concatenate(hits) if hits else np.zeros(len(images), bool)


# -- serving --------------------------------------------------------------------------------------
class ShiftMonitor:
    """Runs the detector on live traffic, per model, and reports to ``metrics``.

    A request of at least ``min_batch`` images is tested as a batch (on ``min_batch`` evenly spaced
    images of it, which bounds the cost). Smaller requests feed a sliding window of the model's last
    ``window`` images, tested every ``stride`` new images. The expected accuracy gauge follows
    every test. Never raises into the request path.
    """

    def __init__(
        self, metrics: Metrics | None = None, *, window: int = 32, stride: int = 8, min_batch: int = 16
    ) -> None:
        if window < SIZES[0] or stride < 1 or min_batch < SIZES[0]:
            raise InvalidInput(
                f"shift window and min batch must be >= {SIZES[0]} and stride >= 1; got {window}, {min_batch}, {stride}"
            )
        self.metrics = metrics
        self.window, self.stride, self.min_batch = window, stride, min_batch
        self.detector: ShiftDetector | None = None
        self._windows: dict[str, deque[np.ndarray]] = {}
        self._pending: dict[str, int] = {}
        self._lock = threading.Lock()

    def set_detector(self, detector: ShiftDetector | None) -> None:
        with self._lock:
            self.detector = detector
            self._windows.clear()
            self._pending.clear()
        if self.metrics is not None:
            self.metrics.set_shift_detector(detector)

    def __call__(self, predicted: Sequence[tuple[str, np.ndarray, Any, np.ndarray]]) -> None:
        """``Dataplane.on_predict`` listener: the (model, prepared images, routing, probabilities) of
        each request of one micro-batch."""
        by_model: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = {}
        for model, x, routing, probabilities in predicted:
            by_model.setdefault(model, []).append((x, probabilities, getattr(routing, "features", None)))
        for model, requests in by_model.items():
            try:
                self.observe_many(model, requests)
            except Exception:  # the shift signal must never fail a prediction
                log.exception("shift monitor failed on %d requests of %s", len(requests), model)

    def observe(
        self, model: str, x: np.ndarray, probabilities: np.ndarray, gate_features: np.ndarray | None = None
    ) -> list[Verdict]:
        """One request's prepared images and combined probabilities; returns the verdicts it caused."""
        return self.observe_many(model, [(x, probabilities, gate_features)])

    def observe_many(
        self, model: str, requests: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    ) -> list[Verdict]:
        """:meth:`observe` for several requests of ``model`` in order (a micro-batch): the same tests, with
        the small requests' features computed in one call and the window updated under one lock."""
        detector = self.detector
        if detector is None:
            return []
        verdicts: list[tuple[str, Verdict]] = []
        small = []
        for x, probabilities, gate_features in requests:
            n = len(x)
            if n < self.min_batch:
                small.append((x, probabilities, gate_features))
                continue
            rows = np.linspace(0, n - 1, self.min_batch).round().astype(np.int64) if n > self.min_batch else slice(None)
            sigs = None if gate_features is None else gate_features[rows]
            verdicts.append(("batch", detector.test(image_features(x[rows], probabilities[rows], sigs))))
        if small:
            gates = [g for _, _, g in small]
            features = image_features(
                np.concatenate([x for x, _, _ in small]),
                np.concatenate([p for _, p, _ in small]),
                None if any(g is None for g in gates) else np.concatenate(gates),  # type: ignore[arg-type]
            )
            due: list[np.ndarray] = []
            with self._lock:
                window = self._windows.setdefault(model, deque(maxlen=self.window))
                offset = 0
                for x, _, _ in small:
                    window.extend(features[offset : offset + len(x)])
                    offset += len(x)
                    self._pending[model] = self._pending.get(model, 0) + len(x)
                    if len(window) == self.window and self._pending[model] >= self.stride:
                        self._pending[model] = 0
                        due.append(np.stack(window))
            verdicts.extend(("window", detector.test(rows_now)) for rows_now in due)
        if self.metrics is not None:
            for unit, v in verdicts:
                self.metrics.observe_shift(model, unit, v)
        return [v for _, v in verdicts]


class ShiftLoader:
    """Deck-swap listener (``dataplane.on_swap``): loads the deck's shift detector into ``monitor``
    when the manifest points at a new one, and drops it when the deck's cards are no longer the ones
    it was fitted for (their confidences are part of the features)."""

    def __init__(self, monitor: ShiftMonitor) -> None:
        self.monitor = monitor
        self._key: object = None

    def __call__(self, deck: Deck) -> None:
        rel = dict(deck.manifest.gate).get("shift")
        path = Path(deck.root) / rel if rel else None
        cards = sorted(c.key for c in deck.cards)
        if (path, cards) == self._key:
            return
        self._key = (path, cards)
        detector = None
        if path is None:
            log.info("deck version %d has no shift detector (run `carddeck shift --fit`)", deck.version)
        else:
            try:
                detector = ShiftDetector.load(path)
            except InvalidInput as exc:  # serve on without a shift signal rather than refuse the deck
                log.warning("deck version %d: no shift signal: %s", deck.version, exc)
            fitted = detector.notes.get("cards") if detector is not None else None
            if fitted is not None and sorted(fitted) != cards:
                log.warning(
                    "deck version %d: the shift detector was fitted for cards %s, the deck has %s; "
                    "no shift signal until `carddeck shift --deck DIR --fit` runs again",
                    deck.version, ", ".join(sorted(fitted)), ", ".join(cards),
                )  # fmt: skip
                detector = None
        self.monitor.set_detector(detector)


__all__ = [
    "ALPHA",
    "FEATURE_NAMES",
    "STATES",
    "Reference",
    "ShiftDetector",
    "ShiftLoader",
    "ShiftMonitor",
    "Verdict",
    "deck_features",
    "deck_references",
    "fit_detector",
    "image_features",
]
