"""The snapshot holder on a real store: one store object, swaps, listeners, polling; and when its store fails:
keep the snapshot, report it, catch up.

Tests run as root here, so a directory cannot be made unreadable by permissions: the deck directory
is moved away instead (the store then answers "not a deck"), and moved back with a change made meanwhile.
S3 endpoints that go down: tests/http/test_store_outage.py.
"""

import logging
import shutil
import time

import pytest
from prometheus_client import CollectorRegistry

from carddeck.deck import DeckStore
from carddeck.observability.metrics import Metrics
from carddeck.serving.snapshot import Snapshots, StoreState
from carddeck.serving.stats import Statistics
from tests.observability.scrape import value
from tests.servers import card, smooth_images


def test_swaps_tell_listeners_and_keep_the_old_snapshot_intact(deck_path):
    snaps = Snapshots(deck_path, poll_interval_s=0)
    seen = []
    snaps.listeners.append(lambda deck: seen.append(deck.version))
    first = snaps.start()
    meta, new = snaps.add_card(card("g2", "gaussian", seed=7))
    assert new and meta.name == "g2" and snaps.swaps == 1
    assert seen == [first.version, first.version + 1]
    assert first.card_names == ("g1", "a1") and snaps.deck.card_names == ("g1", "a1", "g2")
    assert snaps.add_card(card("g2", "gaussian", seed=7)) == (meta, False)  # the same bytes: nothing changes
    assert snaps.swaps == 1
    removed, _ = snaps.remove_card("g2")
    assert removed == ["g2/1"] and snaps.deck.card_names == ("g1", "a1") and seen[-1] == first.version + 2
    snaps.close()


def test_another_writer_is_noticed_by_polling_the_one_store_object(deck_path):
    snaps = Snapshots(deck_path, poll_interval_s=0.05)
    first = snaps.start()
    store = snaps.store
    try:
        DeckStore(deck_path).add_card(card("g3", "gaussian", seed=3))  # another replica's write
        deadline = time.monotonic() + 10
        while snaps.deck.version == first.version and time.monotonic() < deadline:
            time.sleep(0.02)
        assert snaps.deck.card_names == ("g1", "a1", "g3")
        assert snaps.store is store  # polled through the same object (its cache and connection live on)
        assert not snaps.reload_if_changed()  # nothing new since
    finally:
        snaps.close()


def test_statistics_count_per_model_and_hand_out_copies():
    stats = Statistics()
    stats.record("m", 4, 0.002, ok=True, queued_s=0.001, compute_s=0.001)
    stats.record("m", 4, 0.003, ok=True, compute_s=0.002)
    stats.record("m", 1, 0.001, ok=False)
    stats.record_execution("m", 8, 0.003)  # both requests ran as one batch: one execution of 8
    got = stats.get("m")
    assert (got.inference_count, got.execution_count, got.success_count, got.fail_count) == (8, 1, 2, 1)
    assert got.batch_sizes == {8: [1, 3_000_000]} and got.queue_ns == 1_000_000
    got.batch_sizes[8][0] = 99  # a copy: the counters stay
    assert stats.get("m").batch_sizes[8][0] == 1 and stats.get("other").inference_count == 0


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
