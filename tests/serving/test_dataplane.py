"""The data plane against real decks (ONNX Runtime sessions), no gRPC."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from carddeck.deck import Deck, DeckStore
from carddeck.errors import CardRejected, InvalidInput, NotReady
from carddeck.observability.metrics import Metrics
from carddeck.serving.dataplane import Dataplane, DataplaneConfig
from tests.servers import card, noisy_images, smooth_images, wait_for


class BatchSizes(Metrics):
    """The real metrics, also remembering each batch size the batcher ran."""

    def __init__(self) -> None:
        super().__init__(CollectorRegistry())
        self.sizes: list[int] = []

    def observe_batch(self, size, wait_seconds=()) -> None:
        super().observe_batch(size, wait_seconds)
        self.sizes.append(size)


def dataplane(deck_path, metrics=None, **kw) -> Dataplane:
    config = DataplaneConfig(deck_path=deck_path, poll_interval_s=kw.pop("poll_interval_s", 0), **kw)
    dp = Dataplane(config, metrics=metrics)
    dp.start()
    return dp


@pytest.mark.parametrize("batching", [True, False])
def test_predictions_equal_the_in_process_deck(deck_path, batching):
    dp = dataplane(deck_path, batching=batching)
    deck = Deck.open(deck_path)
    try:
        for images in (smooth_images(5), noisy_images(3), smooth_images(2).transpose(0, 3, 1, 2) / np.float32(255)):
            for policy, per_sample in (("nearest-domain", False), ("uniform", False), ("soft", True)):
                got, _ = dp.predict(images, policy=policy, per_sample=per_sample)
                want = deck.predict(images, policy=policy, per_sample=per_sample)
                np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-6)
                assert np.array_equal(got.labels, want.labels)
                np.testing.assert_array_equal(got.routing.weights, want.routing.weights)
    finally:
        dp.close()


def test_merged_requests_keep_their_own_routing(deck_path):
    """Smooth and noisy requests batched together: each is routed (and answered) as if alone."""
    sizes = BatchSizes()
    dp = dataplane(deck_path, sizes, max_batch_size=256, max_wait_s=0.02)
    deck = Deck.open(deck_path)
    requests = [smooth_images(2, seed=i) if i % 2 else noisy_images(2, seed=i) for i in range(24)]
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda im: dp.predict(im)[0], requests))
        for images, got in zip(requests, results):
            want = deck.predict(images)
            assert got.routing.selected == want.routing.selected
            np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-6)
        assert {r.routing.selected for r in results} == {("a1",), ("g1",)}
        assert max(sizes.sizes) > 2  # requests were merged (a request alone in the server runs directly)
    finally:
        dp.close()


def test_a_micro_batch_computes_features_once_and_routes_each_request_alone(deck_path, monkeypatch):
    """Per-request work moved to per-batch: one sample_features call and one on_predict call (routing
    metrics, shift signal) per batch, not per request,
    while requests of other policies and per-sample modes in the same batch keep their own routing."""
    import carddeck.gating.policies
    import carddeck.serving.microbatch
    from carddeck.gating.signature import sample_features

    calls = []

    def counted(x):
        calls.append(len(x))
        return sample_features(x)

    monkeypatch.setattr(carddeck.gating.policies, "sample_features", counted)
    monkeypatch.setattr(carddeck.serving.microbatch, "sample_features", counted)
    sizes = BatchSizes()
    dp = dataplane(deck_path, sizes, max_batch_size=256, max_wait_s=0.05)
    observed: list[int] = []  # requests per on_predict call
    dp.on_predict.append(lambda predicted: observed.append(len(predicted)))
    deck = Deck.open(deck_path)
    modes = [("nearest-domain", False), ("soft", True), ("uniform", False), ("top-k", True)]
    # every mode sees smooth and noisy requests (i // 4 alternates them), so a per-batch policy routed on a
    # merged batch's mean, not each request's own, sends someone to the wrong card
    requests = [(smooth_images(1 + i % 3, seed=i) if i // 4 % 2 else noisy_images(1 + i % 3, seed=i), modes[i % 4])
                for i in range(24)]  # fmt: skip
    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda r: dp.predict(r[0], policy=r[1][0], per_sample=r[1][1])[0], requests))
        served_calls = list(calls)
        for (images, (policy, per_sample)), got in zip(requests, results):
            want = deck.predict(images, policy=policy, per_sample=per_sample)
            assert (got.routing.policy, got.routing.per_sample) == (policy, per_sample)
            assert got.routing.selected == want.routing.selected
            np.testing.assert_allclose(got.routing.weights, want.routing.weights, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-6)
        assert max(sizes.sizes) > 3  # requests were merged
        assert len(served_calls) == len(sizes.sizes) < len(requests)  # one features call per batch run
        assert len(observed) == len(sizes.sizes) and sum(observed) == len(requests)  # listeners: once per batch
        assert sum(served_calls) == sum(len(images) for images, _ in requests)
    finally:
        dp.close()


def test_a_request_is_routed_and_answered_alike_whatever_shares_its_micro_batch(deck_path):
    """One micro-batch run (no threads: what is merged is chosen here): deck requests of both kinds, alone and
    among others, with card requests (no gate) between them, in either order. Each deck request gets its
    solo routing and answer, each card request its card's answer."""
    from carddeck.serving.microbatch import card_work, deck_work

    dp = dataplane(deck_path, batching=False)
    deck = Deck.open(deck_path)
    try:
        deck_model, card_model = dp.resolve(), dp.resolve("g1")
        requests = [("deck", smooth_images(2, seed=1)), ("card", smooth_images(1, seed=2)),
                    ("deck", noisy_images(1, seed=3)), ("deck", smooth_images(1, seed=4)),
                    ("card", noisy_images(3, seed=5)), ("deck", noisy_images(2, seed=6))]  # fmt: skip

        def work(kind, images):
            return deck_work(deck_model, images, None, False) if kind == "deck" else card_work(card_model, images)

        for order in (requests, requests[::-1], requests[2:3]):
            dones = dp.dispatch.run([work(kind, images) for kind, images in order])
            for (kind, images), done in zip(order, dones):
                if kind == "card":
                    np.testing.assert_allclose(done.probabilities, deck.run_card("g1", images), atol=1e-6)
                    assert done.routing is None
                    continue
                want = deck.predict(images)
                assert done.routing.selected == want.routing.selected
                np.testing.assert_allclose(done.routing.weights, want.routing.weights, rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(done.probabilities, want.probabilities, atol=1e-6)
        routed = {deck.predict(images).routing.selected for kind, images in requests if kind == "deck"}
        assert routed == {("a1",), ("g1",)}  # the deck requests really route differently
    finally:
        dp.close()


def test_merging_requests_rows_copies_them_as_concatenate_does():
    """merge_rows (the micro-batch's merge, copied under the GIL) gives np.concatenate's array: rows in order,
    parts of no rows, a part that is a strided view; parts of other dtypes go to numpy's own rules."""
    from carddeck.serving.microbatch import merge_rows

    rng = np.random.default_rng(0)
    parts = [rng.random((k, 3, 4, 4), dtype=np.float32) for k in (1, 2, 0, 3)]
    parts.append(rng.random((2, 3, 4, 8), dtype=np.float32)[..., ::2])  # not contiguous
    merged = merge_rows(parts)
    assert merged.dtype == np.float32 and merged.flags.c_contiguous and merged.flags.writeable
    np.testing.assert_array_equal(merged, np.concatenate(parts))
    assert merge_rows([np.zeros((0, 5), np.float32)] * 2).shape == (0, 5)
    mixed = merge_rows([np.ones((1, 2), np.float64), np.full((1, 2), 2, np.float32)])
    assert mixed.dtype == np.float64 and mixed.tolist() == [[1.0, 1.0], [2.0, 2.0]]


def test_a_bad_policy_name_fails_its_own_request_before_any_batch(deck_path):
    """Checked in the caller's thread: InvalidInput naming the choices, and no batch is run or counted
    for it (a merged batch would fail for everyone in it and be rerun one by one)."""
    sizes = BatchSizes()
    dp = dataplane(deck_path, sizes, max_batch_size=256)
    try:
        with pytest.raises(InvalidInput, match="unknown gate policy 'nearest-domian'; valid choices: .*nearest-domain"):
            dp.predict(smooth_images(2), policy="nearest-domian")
        assert sizes.sizes == []
        dp.predict(smooth_images(2), policy="nearest-domain")
        assert sizes.sizes == [2]
    finally:
        dp.close()


def test_hot_add_under_load_fails_no_request(deck_path):
    dp = dataplane(deck_path, max_batch_size=64)
    stop = threading.Event()
    errors: list[BaseException] = []
    done = [0]

    def load(i: int) -> None:
        while not stop.is_set():
            try:  # smooth images run on a1, which is removed under them
                dp.predict(smooth_images(2) if i % 2 else noisy_images(2))
                done[0] += 1
            except BaseException as exc:  # any failure is the test's finding
                errors.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: done[0] >= 8 or errors, "requests served before the change")
        before, served = dp.deck.version, done[0]
        dp.add_card(card("g2", "gaussian", seed=7))
        dp.remove_card("a1")
        wait_for(lambda: done[0] >= served + 8 or errors, "requests served after the change")
    finally:
        stop.set()
        for t in threads:
            t.join()
        dp.close()
    assert not errors, errors[:3]
    assert dp.deck.version == before + 2
    assert dp.deck.card_names == ("g1", "g2")


def test_a_rejected_card_leaves_the_deck_untouched(deck_path):
    dp = dataplane(deck_path)
    try:
        before = (dp.deck.version, dp.deck.card_names)
        with pytest.raises(CardRejected):
            dp.add_card(b"not an onnx file")
        with pytest.raises(CardRejected):  # a signature of the wrong length
            dp.add_card(card("short", "gaussian", signature=(1.0, 2.0, 3.0)))
        assert (dp.deck.version, dp.deck.card_names) == before
        assert DeckStore(deck_path).manifest().version == before[0]
    finally:
        dp.close()


def test_a_manifest_written_by_another_replica_is_picked_up(deck_path):
    dp = dataplane(deck_path, poll_interval_s=0.05)
    try:
        old = dp.deck
        DeckStore(deck_path).add_card(card("g3", "gaussian", seed=3))  # "another replica"
        wait_for(lambda: dp.deck is not old, "the new manifest to be picked up", timeout=30)
        assert "g3" in dp.deck.card_names
        assert old.card_names == ("g1", "a1")  # the old snapshot is untouched
        assert old.predict(noisy_images(1)).probabilities.shape == (1, 10)
    finally:
        dp.close()


def test_drain_refuses_new_work_and_waits_for_in_flight(deck_path):
    dp = dataplane(deck_path)
    try:
        entered = threading.Event()
        release = threading.Event()

        def slow() -> None:
            with dp.request():
                entered.set()
                release.wait(5)

        t = threading.Thread(target=slow)
        t.start()
        entered.wait(5)
        assert dp.drain(0.05) is False  # still in flight
        with pytest.raises(NotReady), dp.request():
            pass
        release.set()
        t.join()
        assert dp.drain(1.0) is True
        assert not dp.ready
    finally:
        dp.close()
