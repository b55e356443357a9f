"""Batch formation: Triton-like policies per model, one batch in flight, batches that fill under load.

Event-driven: a gate holds the batch in flight while the next requests queue, so what the batcher
forms does not depend on timing.
"""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from carddeck.deck import Deck, DeckStore
from carddeck.errors import InvalidInput
from carddeck.observability.metrics import Metrics
from carddeck.serving.batching import BatchPolicy, MicroBatcher
from carddeck.serving.dataplane import Dataplane, DataplaneConfig
from tests.servers import noisy_images, smooth_images


class Gated:
    """``run`` for a MicroBatcher: records each batch; the first one waits until ``release``."""

    def __init__(self) -> None:
        self.batches: list[list[object]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, items):
        self.batches.append(list(items))
        if len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(30), "test never released the gate"
        return [f"done-{i}" for i in items]


@pytest.mark.parametrize(
    ("policy", "sizes", "want"),
    [
        (BatchPolicy(8, 0.001), [1, 1, 1], (3, False)),  # room left, no preferred size: wait for more
        (BatchPolicy(8, 0.001), [4, 4, 1], (2, True)),  # full: the next one does not fit
        (BatchPolicy(8, 0.001), [3, 5], (2, True)),  # exactly full
        (BatchPolicy(8, 0.001), [12], (1, True)),  # a request over the limit runs alone, unsplit
        (BatchPolicy(8, 0.001, (2, 4)), [1, 1, 1, 1, 1], (4, True)),  # cut at the largest preferred size
        (BatchPolicy(8, 0.001, (4,)), [1, 2, 2], (3, False)),  # 1, 3, 5: never exactly 4
        (BatchPolicy(8, 0.001, (4,)), [1, 2, 2, 4], (3, True)),  # full at 9 > 8: takes what fits
    ],
)
def test_policy_plans_like_tritons_dynamic_batcher(policy, sizes, want):
    assert policy.plan(sizes) == want


def test_policy_rejects_preferred_sizes_it_cannot_form():
    with pytest.raises(ValueError, match="preferred"):
        BatchPolicy(8, 0.001, (16,))


def test_one_batch_in_flight_and_the_queue_forms_the_next_batch():
    run = Gated()
    b = MicroBatcher(run, max_batch_size=64, max_wait_s=5.0, workers=1)
    try:
        first = b.submit("first", 1)
        assert run.entered.wait(30)
        futures = [b.submit(i, 1) for i in range(10)]
        assert b.queue_depth == 10  # no second batch while one is in flight
        run.release.set()
        assert [f.result(30) for f in futures] == [f"done-{i}" for i in range(10)]
        assert first.result(30) == "done-first"
        assert run.batches == [["first"], list(range(10))]  # nobody announced: no wait for max_wait
    finally:
        b.close()


def test_the_oldest_requests_policy_decides_the_cut():
    run = Gated()
    b = MicroBatcher(run, max_batch_size=64, max_wait_s=5.0, workers=1)
    small = BatchPolicy(4, 5.0, (2,))  # e.g. a card served as its own model, with its own settings
    try:
        b.submit("blocker", 1)
        assert run.entered.wait(30)
        futures = [b.submit(f"s{i}", 1, policy=small) for i in range(2)]
        futures += [b.submit(f"d{i}", 1) for i in range(2)] + [b.submit("s2", 2, policy=small), b.submit("d2", 1)]
        run.release.set()
        for f in futures:
            f.result(30)
        # s0 heads: full at 4 (a full batch beats the preferred 2); s2 heads: 2 is preferred, cut
        # there (d2 would make 3); d2 heads (max 64, nobody announced): runs alone
        assert run.batches[1:] == [["s0", "s1", "d0", "d1"], ["s2"], ["d2"]]
    finally:
        b.close()


# -- the data plane ------------------------------------------------------------------------------------
def _dataplane(deck_path, **kw) -> tuple[Dataplane, Metrics]:
    metrics = Metrics(CollectorRegistry())
    dp = Dataplane(DataplaneConfig(deck_path=deck_path, poll_interval_s=0, **kw), metrics=metrics)
    dp.start()
    return dp, metrics


def _gate(dp: Dataplane) -> Gated:
    """Hold the data plane's first micro-batch until released: in its first stage (the gate) when the batcher
    is pipelined, so that nothing is formed behind it either; else in ``_run``."""
    gated = Gated()
    batcher = dp.dispatch.batcher
    stages = batcher._stages  # type: ignore[union-attr]
    run = stages[0] if stages else batcher._run  # type: ignore[union-attr]

    def held(works):
        gated(works)
        return run(works)

    if stages:
        batcher._stages = (held, stages[1])  # type: ignore[union-attr]
    else:
        batcher._run = held  # type: ignore[union-attr]
    return gated


def test_concurrent_requests_fill_one_batch_and_keep_their_own_answers(deck_path):
    """Unary requests from 12 threads while a batch is in flight: they form the next batch together (one
    execution of 12 requests in the statistics and the metrics), each answered and routed as if alone."""
    dp, metrics = _dataplane(deck_path, max_batch_size=64, max_wait_s=5.0, batch_workers=1)
    deck = Deck.open(deck_path)
    gated = _gate(dp)
    requests = [smooth_images(1 + i % 3, seed=i) if i % 2 else noisy_images(1 + i % 3, seed=i) for i in range(12)]
    try:
        blocker = dp.submit(dp.resolve(), smooth_images(1, seed=99))  # a stream's request: straight to the batcher
        assert gated.entered.wait(30)
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(lambda im: dp.predict(im)[0], im) for im in requests]
            while dp.dispatch.batcher.queue_depth < len(requests):  # type: ignore[union-attr]
                threading.Event().wait(0.01)  # every request queued behind the batch in flight
            gated.release.set()
            results = [f.result(60) for f in futures]
        blocker.result(60)
        for images, got in zip(requests, results):
            want = deck.predict(images)
            assert got.routing.selected == want.routing.selected
            np.testing.assert_allclose(got.probabilities, want.probabilities, atol=1e-6)
        assert {r.routing.selected for r in results} == {("a1",), ("g1",)}
        stats = dp.stats("carddeck")
        n = sum(len(im) for im in requests)
        assert stats.execution_count == 2 and stats.inference_count == n + 1
        assert sorted(stats.batch_sizes) == [1, n]  # the blocker, then every request in one batch
        sample = metrics.registry.get_sample_value
        assert sample("carddeck_model_executions_total", {"model": "carddeck"}) == 2
        assert sample("carddeck_model_inferences_total", {"model": "carddeck"}) == n + 1
    finally:
        gated.release.set()
        dp.close()


def test_submit_answers_each_request_and_fails_only_the_bad_one(deck_path):
    dp, _ = _dataplane(deck_path, max_batch_size=64, max_wait_s=5.0, batch_workers=1)
    deck = Deck.open(deck_path)
    gated = _gate(dp)
    model = dp.resolve()
    try:
        blocker = dp.submit(model, noisy_images(2))
        assert gated.entered.wait(30)
        good = [dp.submit(model, smooth_images(2, seed=i)) for i in range(3)]
        with pytest.raises(InvalidInput, match="policy"):  # raises at submit: nothing queued for it
            dp.submit(model, smooth_images(2), policy="no-such-policy")
        card = dp.resolve("a1")
        card_future = dp.submit(card, noisy_images(2))
        gated.release.set()
        for i, future in enumerate(good):
            prediction, snapshot = future.result(30)
            assert snapshot is model.deck
            np.testing.assert_allclose(prediction.probabilities, deck.predict(smooth_images(2, seed=i)).probabilities,
                                       atol=1e-6)  # fmt: skip
        np.testing.assert_allclose(card_future.result(30), deck.run_card("a1", noisy_images(2)), atol=1e-6)
        blocker.result(30)
        assert dp.stats("a1").execution_count == 1 and dp.stats("carddeck").fail_count == 1
    finally:
        gated.release.set()
        dp.close()


def test_manifest_batching_settings_apply_per_model(deck_path):
    store = DeckStore(deck_path)
    store.set_batching({"max_queue_delay_microseconds": 500, "preferred_batch_size": [8, 16],
                        "cards": {"a1": {"max_batch_size": 4}}})  # fmt: skip
    dp, _ = _dataplane(deck_path, max_batch_size=32, max_wait_s=0.002, preferred_batch_sizes=(4,))
    try:
        assert dp.batch_policy(dp.resolve()) == BatchPolicy(32, 0.0005, (8, 16))  # the deck's over the flags
        assert dp.batch_policy(dp.resolve("a1")) == BatchPolicy(4, 0.002, (4,))  # the card's own over the flags
        assert dp.batch_policy(dp.resolve("g1")) == BatchPolicy(32, 0.002, (4,))  # the server's flags
    finally:
        dp.close()
    for bad, named in (({"max_queue_delay_ms": 1}, "unknown key"), ({"preferred_batch_size": "8"}, "list"),
                       ({"cards": {"a1": {"max_batch_size": 0}}}, "a1")):  # fmt: skip
        with pytest.raises(InvalidInput, match=named):
            store.set_batching(bad)


def test_a_stream_announces_each_next_request_and_settles_every_announcement(deck_path):
    """The stream's reader announces its next request before reading it (so batches wait for it), and
    every announcement is settled: by the request's submit, by its failure, or by the stream's end."""
    from carddeck.server.streams import answer_in_order

    class Live:
        def is_active(self) -> bool:
            return True

    dp, _ = _dataplane(deck_path, max_batch_size=64, max_wait_s=5.0, batch_workers=1)
    model = dp.resolve()
    seen: list[int] = []  # expected arrivals when each request is started

    def start(item):
        seen.append(dp.dispatch.batcher._expected)  # type: ignore[union-attr]
        if item == "bad":
            dp.withdraw()  # what the servicers do when decoding fails before submit
            raise InvalidInput("bad request")
        return dp.submit(model, smooth_images(1, seed=item), policy=None if item != 3 else "nope", announced=True)

    def respond(item, future):
        return item, future.exception(30)

    try:
        items = [0, 1, "bad", 3, 4]
        answers = list(answer_in_order(iter(items), Live(), start, respond, coming=(dp.announce, dp.withdraw)))
        assert [a[0] for a in answers] == items
        assert [type(a[1]).__name__ for a in answers] == ["NoneType", "NoneType", "InvalidInput", "InvalidInput",
                                                          "NoneType"]  # fmt: skip
        assert seen == [1] * len(items)  # announced before each read
        assert dp.dispatch.batcher._expected == 0  # type: ignore[union-attr]  # all settled, the end's included
    finally:
        dp.close()


def test_server_settings_for_batching_are_checked():
    from carddeck.serving.settings import Settings

    assert Settings(preferred_batch_sizes="16, 32").preferred_batch_size_list() == (16, 32)
    assert Settings().batch_workers == 1  # one batch in flight unless asked
    for bad in ("8,x", "128", "0"):  # not integers, above max_batch_size (64), below 1
        with pytest.raises(InvalidInput, match="preferred_batch_sizes"):
            Settings(preferred_batch_sizes=bad)


def test_streamed_requests_hold_the_image_budget_until_answered(deck_path):
    from carddeck.errors import Overloaded

    dp, _ = _dataplane(deck_path, max_batch_size=64, max_wait_s=5.0, batch_workers=1, max_inflight_images=4)
    gated = _gate(dp)
    model = dp.resolve()
    try:
        first = dp.submit(model, smooth_images(3))
        assert gated.entered.wait(30)
        assert dp.budget.used == 3  # held while the request is queued and running
        with pytest.raises(Overloaded, match="max-inflight-images"):
            dp.submit(model, smooth_images(2))
        gated.release.set()
        first.result(30)
        assert dp.budget.used == 0  # given back with the answer
        assert dp.submit(model, smooth_images(2)).result(30)[0].probabilities.shape == (2, 10)
    finally:
        gated.release.set()
        dp.close()
