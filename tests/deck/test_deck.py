import numpy as np
import pytest

from carddeck.deck import Deck, DeckStore
from carddeck.deck.runtime import CardSession, cpu_cores
from carddeck.errors import CardNotFound, InvalidInput, NotReady
from tests.deck.conftest import add_noise, card


def test_predict_combines_the_routed_cards(store, images):
    deck = Deck.open(store.root)
    assert deck.version == 2 and deck.card_names == ("g1", "a1") and deck.default_policy == "nearest-domain"
    assert deck.input.height == 32 and len(deck.class_names) == 10
    smooth = deck.predict(images)
    assert smooth.routing.selected == ("a1",)
    np.testing.assert_allclose(smooth.probabilities, deck.run_card("a1", images), rtol=1e-6)
    noisy = deck.predict(add_noise(images))
    assert noisy.routing.selected == ("g1",)
    uni = deck.predict(images, policy="uniform")
    want = (deck.run_card("g1", images) + deck.run_card("a1", images)) / 2
    np.testing.assert_allclose(uni.probabilities, want, rtol=1e-5)
    assert uni.labels.dtype == np.int64 and (uni.labels == want.argmax(1)).all()
    assert uni.probabilities.dtype == np.float32 and np.allclose(uni.probabilities.sum(1), 1, atol=1e-5)


def test_uint8_and_float32_inputs_agree(store, images):
    deck = Deck.open(store.root)
    as_float = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / 255
    a, b = deck.predict(images, policy="uniform"), deck.predict(as_float, policy="uniform")
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)


def test_per_sample_routing_runs_each_card_once_on_its_rows(store, images, monkeypatch):
    deck = Deck.open(store.root)
    mixed = np.concatenate([images, add_noise(images)])
    calls = []
    real = CardSession.logits

    def counting(self, x):
        calls.append((self.key, len(x)))
        return real(self, x)

    monkeypatch.setattr(CardSession, "logits", counting)
    pred = deck.predict(mixed, per_sample=True)
    assert sorted(calls) == [("a1/1", 6), ("g1/1", 6)]
    assert (pred.routing.weights[:6, 1] == 1).all() and (pred.routing.weights[6:, 0] == 1).all()
    monkeypatch.undo()
    np.testing.assert_allclose(pred.probabilities[:6], deck.run_card("a1", images), rtol=1e-5)
    np.testing.assert_allclose(pred.probabilities[6:], deck.run_card("g1", add_noise(images)), rtol=1e-5)
    assert pred.routing.cards_per_image == 1.0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((0, 32, 32, 3), np.uint8), "empty batch"),
        (np.zeros((2, 28, 28, 3), np.uint8), r"\[N, 32, 32, 3\]"),
        (np.zeros((2, 32, 32, 3), np.float32), r"\[N, 3, 32, 32\]"),
        (np.zeros((2, 3, 32, 32), np.float64), "images.dtype: 'float64' is not accepted"),
        (np.full((2, 3, 32, 32), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((2, 3, 32, 32), np.nan, np.float32), "NaN"),
        (np.zeros((32, 32, 3), np.uint8), "expected 4 dimensions"),
        ([[0]], "numpy array"),
    ],
)
def test_invalid_input_names_what_is_accepted(store, bad, message):
    deck = Deck.open(store.root)
    with pytest.raises(InvalidInput, match=message):
        deck.predict(bad)


def test_unknown_card_and_policy(store, images):
    deck = Deck.open(store.root)
    with pytest.raises(CardNotFound, match="g1, a1"):
        deck.run_card("zz", images)
    with pytest.raises(InvalidInput, match="valid choices"):
        deck.predict(images, policy="best")


def test_empty_deck_is_not_ready(tmp_path, images):
    deck = Deck.open(DeckStore.create(tmp_path / "empty").root)
    assert deck.version == 0 and deck.cards == ()
    with pytest.raises(NotReady):
        deck.predict(images)


def test_reopen_reuses_unchanged_sessions_and_snapshots_are_immutable(store, images):
    old = Deck.open(store.root)
    store.add_card(card("g2", "gaussian", seed=5))
    new = Deck.open(store.root, previous=old)
    assert new.version == 3 and new.card_names == ("g1", "a1", "g2")
    assert new._sessions["g1"] is old._sessions["g1"] and new._sessions["a1"] is old._sessions["a1"]
    assert old.card_names == ("g1", "a1") and old.predict(add_noise(images)).routing.selected == ("g1",)
    assert new.predict(add_noise(images)).routing.selected == ("g1", "g2")
    store.remove_card("g2")
    store.add_card(card("g2", "gaussian", version=2, seed=6))
    newer = Deck.open(store.root, previous=new)
    assert newer._sessions["g2"] is not new._sessions["g2"] and newer._sessions["g2"].key == "g2/2"


def test_providers_and_threads(store):
    deck = Deck.open(store.root, intra_op_threads=2)  # an explicit count: that many threads, slices run whole
    assert deck.providers() == {"g1": ["CPUExecutionProvider"], "a1": ["CPUExecutionProvider"]}
    assert {(s.intra_op_threads, s.row_chunks) for s in deck._sessions.values()} == {(2, 1)}
    default = Deck.open(store.root)  # one thread per card; a card's larger runs in chunks across the cores
    assert {(s.intra_op_threads, s.row_chunks) for s in default._sessions.values()} == {(1, cpu_cores())}
    with pytest.raises(InvalidInput, match="not available"):
        Deck.open(store.root, providers=["NoSuchExecutionProvider"])


def test_gate_settings_from_the_manifest(store, images):
    store.set_gate(policy="uniform", params={"metric": "l1"})
    deck = Deck.open(store.root)
    assert deck.default_policy == "uniform" and deck.gate.params.metric == "l1"
    assert deck.predict(images).routing.selected == ("g1", "a1")
    store.set_gate(policy="calibrated")  # no router fitted: falls back to nearest-domain
    assert Deck.open(store.root).default_policy == "nearest-domain"


def test_a_stale_or_broken_router_does_not_stop_the_deck(store, images):
    from carddeck.gating import CalibrationPoint, fit_router

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=(2, 8)).astype(np.float32)
    point = CalibrationPoint(np.zeros(17, np.float32), probs, np.arange(8) % 10)
    store.set_gate(policy="calibrated", router=fit_router([point], ["g1/1", "a1/1"]))
    deck = Deck.open(store.root)
    assert deck.default_policy == "calibrated" and deck.predict(images).routing.policy == "calibrated"
    (store.root / store.manifest().gate["router"]).write_bytes(b"not a router")
    deck = Deck.open(store.root)
    assert deck.default_policy == "nearest-domain" and deck.gate.router is None
    with pytest.raises(InvalidInput, match="carddeck calibrate"):
        deck.predict(images, policy="calibrated")
    store.set_gate(router=fit_router([point], ["g1/1", "gone/1"]))  # fitted for a card the deck lacks
    assert Deck.open(store.root).gate.router is None


def test_mixing_one_card_on_every_row_equals_the_scatter_of_many():
    """routed_rows and mix's shortcuts (every card on every row; one card on every row) give what the
    general per-row scatter gives."""
    import numpy as np

    from carddeck.deck.deck import mix, routed_rows

    rng = np.random.default_rng(0)
    probs = [rng.random((5, 4)).astype(np.float32) for _ in range(3)]
    names = ["a", "b", "c"]
    one = np.zeros((5, 3), np.float32)
    one[:, 1] = 0.5
    jobs = [(k, rows) for k, _, rows in routed_rows(one, names)]
    assert [(k, list(rows)) for k, rows in jobs] == [(1, [0, 1, 2, 3, 4])]
    np.testing.assert_allclose(mix(one, jobs, [probs[1]], 4), 0.5 * probs[1], rtol=1e-6)
    every = np.full((5, 3), 1 / 3, np.float32)
    routed = routed_rows(every, names)
    assert [(k, name, list(rows)) for k, name, rows in routed] == [(k, names[k], list(range(5))) for k in range(3)]
    np.testing.assert_allclose(mix(every, [(k, r) for k, _, r in routed], probs, 4), sum(probs) / 3, rtol=1e-6)
    sparse = np.zeros((5, 3), np.float32)
    sparse[[0, 3], 0], sparse[[1, 2, 4], 2] = 1.0, 1.0
    routed = routed_rows(sparse, names)
    assert [(k, list(rows)) for k, _, rows in routed] == [(0, [0, 3]), (2, [1, 2, 4])]
    out = mix(sparse, [(k, r) for k, _, r in routed], [probs[0][[0, 3]], probs[2][[1, 2, 4]]], 4)
    np.testing.assert_allclose(out[[0, 3]], probs[0][[0, 3]])
    np.testing.assert_allclose(out[[1, 2, 4]], probs[2][[1, 2, 4]])


def test_rows_of_every_card_reach_past_the_cached_range_and_cannot_be_written():
    """routed_rows gives each card of an every-row routing the rows 0..n-1, for batches larger than its cache too
    (a 4,096-image request), as a read-only array that no caller can change for the next batch."""
    import numpy as np

    from carddeck.deck.deck import routed_rows

    for n in (1, 64, 65, 300):
        routed = routed_rows(np.ones((n, 2), np.float32), ["a", "b"])
        for _, _, rows in routed:
            np.testing.assert_array_equal(rows, np.arange(n))
            assert not rows.flags.writeable


def test_one_card_gives_no_agreement_on_any_row():
    """One card on every row of a batch: each image had one voice, so its agreement is NaN (as for a lone image)."""
    import numpy as np

    from carddeck.deck.deck import agreement_of, mix

    probs = np.random.default_rng(0).random((5, 4)).astype(np.float32)
    w = np.zeros((5, 3), np.float32)
    w[:, 1] = 1.0
    filled = np.zeros(5, np.float32)
    mixed = mix(w, [(1, np.arange(5))], [probs], 4, agreement=filled)
    assert np.isnan(filled).all()
    assert np.isnan(agreement_of(w, [(1, np.arange(5))], [probs], mixed)).all()


def test_agreement_is_the_routing_weight_of_the_cards_that_side_with_the_mix():
    """Per image: the weight of the cards whose top label is the mixed one's over the image's routed weight;
    NaN where one card answered alone (it always agrees with itself). ``mix`` fills it when asked."""
    import numpy as np

    from carddeck.deck.deck import agreement_of, mix, routed_rows

    def onehot(labels, p=0.9):
        out = np.full((len(labels), 3), (1 - p) / 2, np.float32)
        out[np.arange(len(labels)), labels] = p
        return out

    w = np.array([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0], [0.2, 0.0, 0.6], [0.1, 0.1, 0.1]], np.float32)
    jobs = [(k, rows) for k, _, rows in routed_rows(w, ["a", "b", "c"])]
    per_card = {0: onehot([0, 0, 1, 2]), 1: onehot([0, 2, 0, 2]), 2: onehot([1, 1, 2, 1])}
    probs = [per_card[k][rows] for k, rows in jobs]
    filled = np.empty(4, np.float32)
    mixed = mix(w, jobs, probs, 3, agreement=filled)
    assert mixed.argmax(1).tolist() == [0, 2, 2, 2]
    want = [0.75, np.nan, 0.6 / 0.8, 0.2 / 0.3]  # row 1: card b alone
    np.testing.assert_allclose(filled, want, rtol=1e-6)
    np.testing.assert_allclose(agreement_of(w, jobs, probs, mixed), want, rtol=1e-6)
    for i in range(4):  # one image alone (its own path) says what it says in the batch
        alone = [(k, np.array([0])) for k, rows in jobs if i in rows]
        mine = [per_card[k][[i]] for k, _ in alone]
        np.testing.assert_allclose(agreement_of(w[[i]], alone, mine, mixed[[i]]), want[i : i + 1], rtol=1e-6)
