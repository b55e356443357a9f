"""``carddeck deck batching DIR``: a deck's batching per model in its manifest, checked, merged, cleared."""

import json

from carddeck.deck import DeckStore
from tests.servers import make_deck
from tests.test_cli import run_cli


def test_deck_batching_sets_deck_and_card_settings_and_names_bad_input(tmp_path):
    deck = make_deck(tmp_path / "deck")
    out = run_cli("deck", "batching", str(deck), "--max-queue-delay-us", "500", "--preferred-batch-sizes", "8,16")
    assert out.returncode == 0, out.stderr
    out = run_cli("deck", "batching", str(deck), "--card", "a1", "--max-batch-size", "4")
    assert out.returncode == 0, out.stderr
    want = {
        "max_queue_delay_microseconds": 500,
        "preferred_batch_size": [8, 16],
        "cards": {"a1": {"max_batch_size": 4}},
    }
    assert json.loads(out.stdout) == want
    assert dict(DeckStore(deck).manifest().batching) == want  # stored, for every replica of the store

    bad = run_cli("deck", "batching", str(deck), "--card", "nope", "--max-batch-size", "4")
    assert bad.returncode != 0 and "nope" in bad.stderr and "a1" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("deck", "batching", str(deck), "--preferred-batch-sizes", "x")
    assert bad.returncode != 0 and "list of integers" in bad.stderr and "Traceback" not in bad.stderr
    assert dict(DeckStore(deck).manifest().batching) == want  # nothing stored by the refused changes

    out = run_cli("deck", "batching", str(deck), "--card", "a1", "--clear")
    assert json.loads(out.stdout) == {"max_queue_delay_microseconds": 500, "preferred_batch_size": [8, 16]}
