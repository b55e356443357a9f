"""Memory a request may cost is bounded: cards run large batches in slices, and images in flight have a budget."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from carddeck.errors import Overloaded
from carddeck.serving.budget import ImageBudget
from carddeck.serving.dataplane import Dataplane, DataplaneConfig
from tests.servers import noisy_images


def test_cards_run_large_batches_in_slices_of_the_micro_batch_size(deck_path):
    """ORT's arena keeps what its largest run needed: no card may see more rows at once than max_batch_size."""
    dp = Dataplane(DataplaneConfig(deck_path, batching=False, max_batch_size=16, poll_interval_s=0))
    sliced = Dataplane(DataplaneConfig(deck_path, batching=False, max_batch_size=4096, poll_interval_s=0))
    try:
        deck = dp.start()
        sliced.start()
        rows: list[int] = []
        for session in deck._sessions.values():
            run = session.session.run

            def counting(names, feeds, run=run):
                rows.append(len(feeds["images"]))
                return run(names, feeds)

            session.session.run = counting  # type: ignore[method-assign]
        x = noisy_images(100)
        got, _ = dp.predict(x)
        # each card: slices 16+16+...+4, each maybe cut into chunks run at once (carddeck.deck.runtime)
        assert rows and max(rows) <= 16 and sum(rows) % 100 == 0, rows
        want, _ = sliced.predict(x)
        np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-5, atol=1e-6)
    finally:
        dp.close()
        sliced.close()


def test_images_in_flight_past_the_budget_are_refused_and_given_back():
    budget = ImageBudget(100)
    with budget.hold(60):
        with pytest.raises(Overloaded, match="at most 100 at once"), budget.hold(41):
            pass
        with budget.hold(40):
            assert budget.used == 100
    assert budget.used == 0
    with pytest.raises(Overloaded), budget.hold(101):  # a failed hold takes nothing
        pass
    assert budget.used == 0


def test_the_dataplane_refuses_a_request_that_does_not_fit_while_others_run(deck_path):
    dp = Dataplane(DataplaneConfig(deck_path, batching=False, max_inflight_images=10, poll_interval_s=0))
    try:
        dp.start()
        entered, release = threading.Event(), threading.Event()
        holder = dp.budget.hold(8)

        def hold() -> None:
            with holder:
                entered.set()
                release.wait(30)

        t = threading.Thread(target=hold)
        t.start()
        entered.wait(30)
        with pytest.raises(Overloaded):
            dp.predict(noisy_images(3))
        assert dp.predict(noisy_images(2))[0].probabilities.shape[0] == 2  # what fits still runs
        release.set()
        t.join()
        assert dp.budget.used == 0 and dp.predict(noisy_images(10))[0].probabilities.shape[0] == 10
    finally:
        dp.close()
