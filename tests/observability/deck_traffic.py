"""A real deck (tiny ONNX cards on digits32) and the traffic that exercises every metric through it.

Used where the gRPC server is our tiny one: the same calls a wired server makes (route with the
real gate, run the real ONNX cards, time them, record batches, deck changes and RPCs).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carddeck.data.datasets import load_dataset
from carddeck.deck import Deck, DeckStore
from carddeck.server.metrics import Metrics
from carddeck.server.shift import thresholds_for_deck
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
    test = load_dataset("digits32", "test").images
    shifted = ((test.astype(np.float32) - 128) * 0.15 + 128).astype(np.uint8)
    return DeckRig(Deck.open(root, intra_op_threads=1), store, test, shifted)


def serve_batch(
    metrics: Metrics, deck: Deck, images: np.ndarray, *, policy: str | None = None, per_sample: bool = False
) -> None:
    """What the dataplane does for one batch: record it, route it, run each selected card timed."""
    metrics.observe_batch(len(images), [0.0004] * 2)
    routing = deck.route(images, policy=policy, per_sample=per_sample)
    metrics.observe_routing(routing)
    for card in routing.selected:
        start = time.perf_counter()
        deck.run_card(card, images)
        metrics.observe_card(card, time.perf_counter() - start)


def announce_deck(metrics: Metrics, deck: Deck) -> None:
    metrics.set_deck(deck.version, deck.cards)
    metrics.set_shift(thresholds_for_deck(deck))
