"""The snapshot holder on a real store: one store object, swaps, listeners, polling."""

import time

from carddeck.deck import DeckStore
from carddeck.serving.snapshot import Snapshots
from carddeck.serving.stats import Statistics
from tests.servers import card


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
    got = stats.get("m")
    assert (got.inference_count, got.execution_count, got.success_count, got.fail_count) == (8, 2, 2, 1)
    assert got.batch_sizes == {4: [2, 3_000_000]} and got.queue_ns == 1_000_000
    got.batch_sizes[4][0] = 99  # a copy: the counters stay
    assert stats.get("m").batch_sizes[4][0] == 2 and stats.get("other").inference_count == 0
