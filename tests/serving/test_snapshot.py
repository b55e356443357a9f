"""The snapshot holder when its store fails: keep the snapshot, report it, catch up (real decks on disk).

Tests run as root here, so a directory cannot be made unreadable by permissions: the deck directory
is moved away instead (the store then answers "not a deck"), and moved back with a change made meanwhile.
S3 endpoints that go down: tests/http/test_store_outage.py.
"""

from __future__ import annotations

import logging
import shutil

import pytest
from prometheus_client import CollectorRegistry

from carddeck.deck import DeckStore
from carddeck.observability.metrics import Metrics
from carddeck.serving.snapshot import Snapshots, StoreState
from tests.observability.scrape import value
from tests.servers import card, smooth_images


def samples(metrics: Metrics) -> dict:
    return {(s.name, frozenset(s.labels.items())): s.value for m in metrics.registry.collect() for s in m.samples}


@pytest.fixture
def held(deck_path):
    metrics = Metrics(CollectorRegistry())
    snapshots = Snapshots(deck_path, poll_interval_s=0, metrics=metrics)  # polled by hand: deterministic
    snapshots.start()
    told: list[StoreState] = []
    snapshots.store_listeners.append(told.append)
    yield snapshots, metrics, told
    snapshots.close()


def test_a_store_that_goes_away_costs_freshness_only(held, deck_path, tmp_path, caplog):
    snapshots, metrics, told = held
    s = samples(metrics)
    assert value(s, "carddeck_store_up") == 1 and value(s, "carddeck_store_last_sync_timestamp_seconds") > 0
    synced = snapshots.store_state.last_sync
    away = tmp_path / "away"
    shutil.move(deck_path, away)  # the store is gone
    with caplog.at_level(logging.INFO, logger="carddeck.serving.snapshot"):
        for _ in range(3):
            snapshots.poll()
        state = snapshots.store_state
        assert not state.reachable and state.failures == 3 and state.last_sync == synced
        assert "not a deck" in state.error and state.describe().startswith("unreachable; serving the snapshot")
        assert snapshots.deck.version == 3 and snapshots.deck.predict(smooth_images(2)).labels.shape == (2,)
        s = samples(metrics)
        assert value(s, "carddeck_store_up") == 0 and value(s, "carddeck_store_poll_errors_total") == 3
        assert value(s, "carddeck_store_last_sync_timestamp_seconds") == synced

        DeckStore(away).add_card(card("n1", "gaussian", seed=5))  # a change made while it was away
        shutil.move(away, deck_path)
        snapshots.poll()
    assert snapshots.deck.version == 4 and "n1" in snapshots.deck.card_names
    assert snapshots.store_state.in_sync and snapshots.store_state.describe() == "reachable"
    assert snapshots.store_state.last_sync > synced and value(samples(metrics), "carddeck_store_up") == 1
    assert [t.in_sync for t in told] == [False, True]  # listeners (health) told twice, not once per poll
    lines = [r.getMessage() for r in caplog.records]
    assert sum("cannot reach the deck store" in m for m in lines) == 1, lines
    assert sum("deck store reachable again" in m and "after 3 failed polls" in m for m in lines) == 1, lines


def test_a_new_deck_that_cannot_be_loaded_is_reported_but_the_store_is_up(held, deck_path):
    snapshots, metrics, told = held
    store = DeckStore(deck_path)
    store.add_card(card("n2", "gaussian", seed=6))
    entry = store.manifest().find("n2")
    (deck_path / entry.path / "model.onnx").write_bytes(b"torn")  # named by the manifest, unreadable
    snapshots.poll()
    state = snapshots.store_state
    assert state.reachable and not state.in_sync and "does not match the manifest sha256" in state.error
    assert state.describe().startswith("reachable, but its deck cannot be loaded")
    assert snapshots.deck.version == 3  # still the last good snapshot
    s = samples(metrics)
    assert value(s, "carddeck_store_up") == 1 and value(s, "carddeck_store_poll_errors_total") == 1
    store.remove_card("n2")
    snapshots.poll()
    assert snapshots.store_state.in_sync and snapshots.deck.version == 5
    assert [t.in_sync for t in told] == [False, True]
