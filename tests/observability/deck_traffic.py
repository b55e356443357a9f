"""A real deck (tiny ONNX cards on digits32) and the traffic that exercises every metric through it.

Used where the gRPC server is our tiny one: the same calls a wired server makes (route with the
real gate, run the real ONNX cards, time them, record batches, deck changes and RPCs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carddeck.data.datasets import load_dataset
from carddeck.deck import Deck, DeckStore
from carddeck.gating.shift_fit import deck_references, fit_detector
from carddeck.observability.metrics import Metrics
from carddeck.observability.shift import ShiftLoader, ShiftMonitor
from tests.cards import tiny_card_bytes, tiny_meta

DOMAINS = ("clean", "gaussian", "augmix")


@dataclass
class DeckRig:
    deck: Deck
    store: DeckStore
    clean: np.ndarray  # digits32 test images, uint8 NHWC
    shifted: np.ndarray  # the same at 15% contrast: far from every domain


def build_deck(root: Path, calibration_images: int = 256) -> DeckRig:
    train = load_dataset("digits32", "train").images
    store = DeckStore.create(root)
    store.set_calibration(train[:calibration_images])
    for i, domain in enumerate(DOMAINS):
        store.add_card(tiny_card_bytes(tiny_meta(f"card-{domain}", domain=domain), seed=i))
    # The shift detector, fitted as `carddeck shift --fit` does (clean and one corruption, to be quick).
    val = load_dataset("digits32", "val")
    deck = Deck.open(root, intra_op_threads=1)
    refs = deck_references(deck, val.images, val.labels, [("gaussian_noise", 3)])
    store.set_gate(shift=fit_detector(refs, draws=400, cards=[c.key for c in deck.cards]))
    test = load_dataset("digits32", "test").images
    shifted = ((test.astype(np.float32) - 128) * 0.15 + 128).astype(np.uint8)
    return DeckRig(Deck.open(root, intra_op_threads=1), store, test, shifted)


def serve_batch(
    metrics: Metrics,
    deck: Deck,
    images: np.ndarray,
    *,
    policy: str | None = None,
    per_sample: bool = False,
    shift: ShiftMonitor | None = None,
) -> None:
    """What the dataplane does for one batch: record it, route it, run each selected card timed,
    and hand the result to the shift monitor."""
    metrics.observe_batch(len(images), [0.0004] * 2)
    x = deck.prepare(images)
    routing = deck.route_prepared(x, policy=policy, per_sample=per_sample)
    metrics.observe_routing(routing)
    probabilities = deck.run_routed(x, routing.weights, on_card=metrics.observe_card)
    if shift is not None:
        shift([("carddeck", x, routing, probabilities)])


def announce_deck(metrics: Metrics, deck: Deck) -> ShiftMonitor:
    """What the server does with a new snapshot: its metrics, and a shift monitor with its detector."""
    metrics.set_deck(deck.version, deck.cards)
    monitor = ShiftMonitor(metrics)
    ShiftLoader(monitor)(deck)
    assert monitor.detector is not None, "build_deck stores a shift detector"
    return monitor
