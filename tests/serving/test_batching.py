import threading
import time
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout

import pytest

from carddeck.errors import Cancelled
from carddeck.serving.batching import MicroBatcher


class Recorder:
    """The batch function: records each batch; with ``hold``, a batch blocks until :meth:`release`, so
    tests know the worker is busy (``busy`` is set) instead of guessing how long a sleep takes."""

    def __init__(self, hold: bool = False, poison: object = None) -> None:
        self.batches: list[list[object]] = []
        self.poison = poison
        self.lock = threading.Lock()
        self.busy = threading.Event()
        self.released = threading.Event()
        if not hold:
            self.released.set()

    def __call__(self, items):
        if self.poison is not None and self.poison in items:
            raise ValueError("poisoned")
        with self.lock:
            self.batches.append(list(items))
        self.busy.set()
        assert self.released.wait(30), "the test never released the worker"
        return [f"done-{i}" for i in items]

    def release(self) -> None:
        self.released.set()

    def occupy(self, b: MicroBatcher):
        """Submit a request that keeps the worker busy until :meth:`release`; returns its future."""
        future = b.submit("blocker", 1)
        assert self.busy.wait(30), "the worker never started the blocker"
        return future


def test_concurrent_requests_merge_while_the_worker_is_busy():
    run = Recorder(hold=True)
    b = MicroBatcher(run, max_batch_size=64, max_wait_s=0.001)
    try:
        first = run.occupy(b)
        futures = [b.submit(i, 1) for i in range(10)]
        run.release()
        assert first.result(30) == "done-blocker"
        assert [f.result(30) for f in futures] == [f"done-{i}" for i in range(10)]
        assert run.batches[1] == list(range(10))  # all ten ran as one batch, in order
    finally:
        b.close()


def test_batches_never_exceed_max_batch_size_and_requests_are_not_split():
    run = Recorder(hold=True)
    b = MicroBatcher(run, max_batch_size=8, max_wait_s=0.001)
    sizes = {}
    try:
        blocker = run.occupy(b)
        futures = []
        for i in range(12):
            sizes[i] = 3
            futures.append(b.submit(i, 3))
        run.release()
        blocker.result(30)
        for f in futures:
            f.result(30)
        assert sorted(i for batch in run.batches[1:] for i in batch) == list(range(12))  # each ran once, whole
        for batch in run.batches:
            assert sum(sizes.get(i, 1) for i in batch) <= 8
    finally:
        b.close()


def test_a_lone_request_does_not_wait_for_max_wait():
    b = MicroBatcher(Recorder(), max_batch_size=64, max_wait_s=3600.0)
    try:
        assert b.submit("x", 1).result(60) == "done-x"  # an hour's max_wait: only not waiting answers in time
    finally:
        b.close()


def test_announced_requests_are_waited_for_up_to_max_wait():
    run = Recorder()
    b = MicroBatcher(run, max_batch_size=64, max_wait_s=60.0)  # generous: the announced one arrives well before
    try:
        b.announce()
        first = b.submit("a", 1)
        time.sleep(0.05)  # "a" alone in the queue a while: without the announcement it would run alone
        second = b.submit("b", 1, announced=True)
        first.result(60), second.result(60)
        assert run.batches == [["a", "b"]]
    finally:
        b.close()


def test_a_poisoned_request_fails_alone():
    run = Recorder(hold=True, poison="bad")
    b = MicroBatcher(run, max_batch_size=64, max_wait_s=0.001)
    try:
        blocker = run.occupy(b)
        good, bad = b.submit("good", 1), b.submit("bad", 1)  # queued together behind the blocker
        run.release()
        blocker.result(30)
        assert good.result(30) == "done-good"
        with pytest.raises(ValueError, match="poisoned"):
            bad.result(30)
    finally:
        b.close()


def test_cancelled_requests_are_skipped():
    run = Recorder(hold=True)
    b = MicroBatcher(run, max_batch_size=64, max_wait_s=0.001)
    try:
        blocker = run.occupy(b)
        gone = b.submit("gone", 1, is_cancelled=lambda: True)
        run.release()
        blocker.result(30)
        with pytest.raises(Cancelled):
            gone.result(30)
        assert all("gone" not in batch for batch in run.batches)
    finally:
        b.close()


def test_a_batch_failing_outside_its_run_fails_its_requests_and_the_worker_goes_on():
    """A batch's own worker runs it: an error before the run (here a cancellation check that raises) must
    answer the batch's requests and leave the worker serving the queue, not end the thread."""
    run = Recorder()

    def broken() -> bool:
        raise RuntimeError("the transport is gone")

    b = MicroBatcher(run, max_batch_size=64, max_wait_s=0.001)
    try:
        with pytest.raises(RuntimeError, match="transport is gone"):
            b.submit("orphan", 1, is_cancelled=broken).result(30)
        assert b.submit("next", 1).result(30) == "done-next"
    finally:
        b.close()


def test_a_request_whose_waiter_gave_up_never_runs():
    """A deadline passing in the queue cancels the request (Dispatch does it): it must not run, nor be set."""
    run = Recorder(hold=True)
    b = MicroBatcher(run, max_batch_size=64, max_wait_s=0.001)
    try:
        blocker = run.occupy(b)
        gone, kept = b.submit("gone", 1), b.submit("kept", 1)
        with pytest.raises(FutureTimeout):
            gone.result(timeout=0.01)  # still queued behind the blocker
        assert gone.cancel() and gone.cancelled() and gone.done()
        run.release()
        blocker.result(30)
        assert kept.result(30) == "done-kept"
        with pytest.raises(CancelledError):
            gone.result(30)
        assert all("gone" not in batch for batch in run.batches)
        assert not kept.cancel()  # too late: it ran
    finally:
        b.close()


def test_a_result_wakes_every_reader_and_every_callback_once():
    run = Recorder(hold=True, poison="bad")
    b = MicroBatcher(run, max_batch_size=64, max_wait_s=0.001)
    try:
        blocker = run.occupy(b)
        good, bad = b.submit("good", 1), b.submit("bad", 1)
        seen: list[object] = []
        called = threading.Semaphore(0)  # callbacks run in the batch thread, after the readers are woken
        good.add_done_callback(lambda f: (seen.append(f.result()), called.release()))
        bad.add_done_callback(lambda f: (seen.append(type(f.exception())), called.release()))
        readers = [threading.Thread(target=lambda: seen.append(good.result(30))) for _ in range(3)]
        for t in readers:
            t.start()
        run.release()
        for t in readers:
            t.join(30)
        blocker.result(30)
        assert called.acquire(timeout=30) and called.acquire(timeout=30)
        assert sorted(map(str, seen)) == sorted(["done-good"] * 4 + [str(ValueError)])
        good.add_done_callback(lambda f: seen.append("late"))  # settled: called at once
        assert seen[-1] == "late" and good.result(0) == "done-good"
    finally:
        b.close()
