"""Distribution-shift threshold: how far from every domain a batch may sit before it is "out of domain".

Calibrated from the domains' own spread. For each domain, clean images are augmented the way that
domain's CARDs were trained, random batches of them are signed with the gate's own signature
(``carddeck.gating.sample_signatures``; a batch signature is the mean of its images' signatures),
and their distance to the domain's reference signature is measured. That spread shrinks as batches
grow (a mean of B signatures), so there is one threshold per batch size:

    threshold(B) = FACTOR * max over domains of the QUANTILE-quantile of those distances

with if TYPE_CHECKING:
    from carddeck.deck import Deck
    from carddeck.gating import Gate
    from carddeck.server.metrics import Metrics

log = logging.getLogger(__name__)

QUANTILE = 0.99 and FACTOR = 1.5 by default: a batch from any trained domain exceeds it well
under 1% of the time, and the 1.5 margin absorbs the gap between calibration and serving images
(e.g. a different split). A batch of B images uses the threshold of the largest calibrated size
<= B (smaller batches spread more, so this errs towards fewer false alarms); per-sample routing
uses B = 1.

The server calibrates at start-up with :func:`thresholds_for_deck` when the deck store holds clean
calibration images (``DeckStore.set_calibration``), against the gate's own references and metric.
Offline, ``python -m carddeck.server.shift --data digits32 --out shift.json`` writes thresholds as
JSON; :meth:`ShiftThresholds.load` reads them.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from carddeck.errors import InvalidInput

if TYPE_CHECKING:
    from carddeck.deck import Deck
    from carddeck.gating import Gate
    from carddeck.server.metrics import Metrics

log = logging.getLogger(__name__)

QUANTILE = 0.99
FACTOR = 1.5
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
CALIBRATION_LIMIT = 512  # images: enough for a stable 99th percentile, ~1 s on one core at 32x32
FORMAT = "carddeck-shift/1"


@dataclass(frozen=True)
class ShiftThresholds:
    """Out-of-domain distance thresholds by batch size, and the per-domain spread they came from."""

    thresholds: dict[int, float]
    metric: str = "l2"  # the gate's distance metric (GateParams.metric) the thresholds are measured in
    quantile: float = QUANTILE
    factor: float = FACTOR
    spread: dict[str, dict[int, float]] = field(default_factory=dict)  # domain -> batch size -> quantile

    def __post_init__(self) -> None:
        if not self.thresholds:
            raise InvalidInput("shift thresholds: need at least one batch size")
        bad = {b: t for b, t in self.thresholds.items() if b < 1 or not np.isfinite(t) or t <= 0}
        if bad:
            raise InvalidInput(f"shift thresholds: batch sizes must be >= 1 and thresholds positive, got {bad}")

    def threshold_for(self, batch_size: int) -> float:
        """Threshold of the largest calibrated batch size <= ``batch_size`` (the smallest one below all)."""
        sizes = sorted(self.thresholds)
        i = max(bisect.bisect_right(sizes, batch_size) - 1, 0)
        return self.thresholds[sizes[i]]

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "metric": self.metric,
            "quantile": self.quantile,
            "factor": self.factor,
            "thresholds": {str(b): t for b, t in sorted(self.thresholds.items())},
            "spread": {d: {str(b): q for b, q in sorted(s.items())} for d, s in sorted(self.spread.items())},
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "shift thresholds") -> ShiftThresholds:
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise InvalidInput(f"{source}: format must be {FORMAT!r}, got {data.get('format')!r}")
            return cls(
                thresholds={int(b): float(t) for b, t in data["thresholds"].items()},
                metric=str(data["metric"]),
                quantile=float(data["quantile"]),
                factor=float(data["factor"]),
                spread={d: {int(b): float(q) for b, q in s.items()} for d, s in data.get("spread", {}).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidInput(f"{source}: not a shift-threshold file ({type(exc).__name__}: {exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> ShiftThresholds:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidInput(f"shift thresholds {path}: cannot read ({exc.strerror})") from None
        return cls.from_json(text, source=str(path))


def calibrate_shift(
    images: np.ndarray,
    domains: Sequence[str],
    *,
    references: Mapping[str, Sequence[float]] | None = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    batches: int = 256,
    rounds: int = 2,
    quantile: float = QUANTILE,
    factor: float = FACTOR,
    seed: int = 0,
    metric: str = "l2",
) -> ShiftThresholds:
    """Thresholds from ``images`` (clean uint8 [N,H,W,3]) augmented under each of ``domains``.

    ``references``: each domain's reference signature (e.g. the deck's cards' ``signature``); by
    default ``carddeck.gating.domain_signature(domain, images, seed=0)``, as the exporter computes it.
    Each image is augmented ``rounds`` times with fresh randomness; ``batches`` random batches per
    batch size are drawn from those augmented images. ``metric``: the deck's gate metric.
    """
    from carddeck.data.domains import augment
    from carddeck.gating import domain_signature, pairwise_distances, sample_signatures

    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidInput(f"calibration images must be uint8 [N,H,W,3], got {images.dtype} {list(images.shape)}")
    if not domains:
        raise InvalidInput("calibration needs at least one domain")
    if not 0.5 <= quantile < 1.0 or factor < 1.0:
        raise InvalidInput(f"quantile must be in [0.5, 1) and factor >= 1, got {quantile}, {factor}")
    sizes = sorted({int(b) for b in batch_sizes if 1 <= b <= len(images)})
    if not sizes:
        raise InvalidInput(f"no batch size in {list(batch_sizes)} fits {len(images)} calibration images")
    rng = np.random.default_rng(seed)
    spread: dict[str, dict[int, float]] = {}
    for domain in domains:
        ref = references[domain] if references is not None else domain_signature(domain, images, seed=0)
        reference = np.asarray(ref, dtype=np.float32)[None, :]
        signed = []
        for _ in range(rounds):
            augmented = np.asarray(augment(images, domain, rng), dtype=np.float32)
            signed.append(sample_signatures(np.ascontiguousarray(augmented.transpose(0, 3, 1, 2))))
        signatures = np.concatenate(signed)
        spread[domain] = {}
        for b in sizes:
            picks = np.stack([rng.choice(len(signatures), size=b, replace=False) for _ in range(batches)])
            batch_signatures = signatures[picks].mean(axis=1)
            distances = pairwise_distances(batch_signatures, reference, metric)[:, 0]
            spread[domain][b] = float(np.quantile(distances, quantile))
    # Spread can only shrink as batches grow; a sampling wobble must not make a small batch stricter.
    thresholds: dict[int, float] = {}
    running = 0.0
    for b in reversed(sizes):
        running = max(running, factor * max(spread[d][b] for d in domains))
        thresholds[b] = running
    return ShiftThresholds(thresholds=thresholds, metric=metric, quantile=quantile, factor=factor, spread=spread)


def calibrate_for_gate(gate: Gate, images: np.ndarray, **options: Any) -> ShiftThresholds:
    """Thresholds against ``gate``'s own domain references and distance metric."""
    references = {d: tuple(float(v) for v in r) for d, r in zip(gate.domains, gate.references)}
    return calibrate_shift(images, gate.domains, references=references, metric=gate.params.metric, **options)


def thresholds_for_deck(deck: Deck, images: np.ndarray | None = None) -> ShiftThresholds | None:
    """Thresholds for a deck snapshot, from ``images`` or the store's calibration images (None if neither)."""
    from carddeck.deck import DeckStore

    if deck.gate is None:
        return None
    if images is None:
        images = DeckStore(deck.root).calibration_images()
        if images is None:
            return None
    return calibrate_for_gate(deck.gate, np.asarray(images)[:CALIBRATION_LIMIT])


class ShiftCalibrator:
    """Deck-swap listener (``dataplane.on_swap``): recalibrates ``metrics``' thresholds when the gate's
    domains, references or metric change, in a background thread so a swap is never slowed down."""

    def __init__(self, metrics: Metrics, images: np.ndarray | None = None) -> None:
        self.metrics = metrics
        self.images = images  # default: the deck store's calibration images
        self._key: object = None
        self._lock = threading.Lock()

    def __call__(self, deck: Deck) -> None:
        gate = deck.gate
        key = None if gate is None else (gate.domains, gate.references.tobytes(), gate.params.metric)
        with self._lock:
            if key == self._key:
                return
            self._key = key
        threading.Thread(target=self._calibrate, args=(deck, key), name="carddeck-shift", daemon=True).start()

    def _calibrate(self, deck: Deck, key: object) -> None:
        try:
            shift = thresholds_for_deck(deck, self.images)
        except Exception as exc:  # a deck without usable calibration still serves; it just has no shift alarm
            log.warning("deck version %d: no out-of-domain thresholds (%s)", deck.version, exc)
            shift = None
        with self._lock:
            if key != self._key:  # a newer deck arrived meanwhile: its own calibration wins
                return
            self.metrics.set_shift(shift)
        if shift is None:
            log.info("deck version %d: no calibration images, out-of-domain counting is off", deck.version)
        else:
            log.info("deck version %d: out-of-domain thresholds %s", deck.version, shift.thresholds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m carddeck.server.shift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits32", help="clean dataset spec (digits32, cifar10:PATH, npz:PATH)")
    parser.add_argument("--split", default="train", help="split the cards were trained on (train)")
    parser.add_argument("--domains", default="clean,gaussian,augmix", help="comma-separated augmentation domains")
    parser.add_argument("--limit", type=int, default=2000, help="calibrate on at most this many images")
    parser.add_argument("--quantile", type=float, default=QUANTILE)
    parser.add_argument("--factor", type=float, default=FACTOR)
    parser.add_argument("--metric", default="l2", help="the deck's gate distance metric (l2, l1, cosine)")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON thresholds")
    args = parser.parse_args(argv)
    from carddeck.data.datasets import load_dataset

    dataset = load_dataset(args.data, args.split)
    images = dataset.images[: args.limit]
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    shift = calibrate_shift(images, domains, quantile=args.quantile, factor=args.factor, metric=args.metric)
    args.out.write_text(shift.to_json())
    print(shift.to_json(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "FACTOR",
    "QUANTILE",
    "ShiftCalibrator",
    "ShiftThresholds",
    "calibrate_for_gate",
    "calibrate_shift",
    "thresholds_for_deck",
]
