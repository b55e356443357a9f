import threading
import time

import pytest

from carddeck.errors import Cancelled
from carddeck.serving.batching import MicroBatcher


class Recorder:
    def __init__(self, delay: float = 0.0, poison: object = None) -> None:
        self.batches: list[list[object]] = []
        self.delay = delay
        self.poison = poison
        self.lock = threading.Lock()

    def __call__(self, items):
        if self.poison is not None and self.poison in items:
            raise ValueError("poisoned")
        with self.lock:
            self.batches.append(list(items))
        time.sleep(self.delay)
        return [f"done-{i}" for i in items]


def test_concurrent_requests_merge_while_the_worker_is_busy():
    run = Recorder(delay=0.05)
    b = MicroBatcher(run, max_batch_size=64, max_wait_s=0.001)
    try:
        first = b.submit("first", 1)  # occupies the worker
        time.sleep(0.01)
        futures = [b.submit(i, 1) for i in range(10)]
        assert first.result(5) == "done-first"
        assert [f.result(5) for f in futures] == [f"done-{i}" for i in range(10)]
        assert run.batches[1] == list(range(10))  # all ten ran as one batch, in order
    finally:
        b.close()


def test_batches_never_exceed_max_batch_size_and_requests_are_not_split():
    run = Recorder(delay=0.02)
    b = MicroBatcher(run, max_batch_size=8, max_wait_s=0.001)
    sizes = {}
    try:
        blocker = b.submit("blocker", 1)
        time.sleep(0.005)
        futures = []
        for i in range(12):
            sizes[i] = 3
            futures.append(b.submit(i, 3))
        blocker.result(5)
        for f in futures:
            f.result(5)
        for batch in run.batches:
            assert sum(sizes.get(i, 1) for i in batch) <= 8
    finally:
        b.close()


def test_a_lone_request_does_not_wait_for_max_wait():
    b = MicroBatcher(Recorder(), max_batch_size=64, max_wait_s=2.0)
    try:
        t0 = time.monotonic()
        assert b.submit("x", 1).result(5) == "done-x"
        assert time.monotonic() - t0 < 0.5
    finally:
        b.close()


def test_announced_requests_are_waited_for_up_to_max_wait():
    run = Recorder()
    b = MicroBatcher(run, max_batch_size=64, max_wait_s=0.5)
    try:
        b.announce()
        first = b.submit("a", 1)
        time.sleep(0.05)
        second = b.submit("b", 1, announced=True)
        first.result(5), second.result(5)
        assert run.batches == [["a", "b"]]
    finally:
        b.close()


def test_a_poisoned_request_fails_alone():
    run = Recorder(delay=0.02, poison="bad")
    b = MicroBatcher(run, max_batch_size=64, max_wait_s=0.001)
    try:
        blocker = b.submit("blocker", 1)
        time.sleep(0.005)
        good, bad = b.submit("good", 1), b.submit("bad", 1)
        blocker.result(5)
        assert good.result(5) == "done-good"
        with pytest.raises(ValueError, match="poisoned"):
            bad.result(5)
    finally:
        b.close()


def test_cancelled_requests_are_skipped():
    run = Recorder(delay=0.05)
    b = MicroBatcher(run, max_batch_size=64, max_wait_s=0.001)
    try:
        blocker = b.submit("blocker", 1)
        time.sleep(0.005)
        gone = b.submit("gone", 1, is_cancelled=lambda: True)
        blocker.result(5)
        with pytest.raises(Cancelled):
            gone.result(5)
        assert all("gone" not in batch for batch in run.batches)
    finally:
        b.close()
