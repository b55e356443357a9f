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


class TwoStages:
    """A batch function in two stages, ``second(first(items)) == run(items)``: ``first`` records the batch and
    the thread it ran on; ``second`` blocks until :meth:`release` (``judging`` is set once it holds one), so a
    test knows a batch is in the second stage; ``poison`` fails the stage it names."""

    def __init__(self, poison: tuple[str, object] | None = None) -> None:
        self.firsts: list[list[object]] = []
        self.seconds: list[list[object]] = []
        self.threads: set[str] = set()
        self.poison = poison
        self.judging = threading.Event()
        self.released = threading.Event()
        self.first_free = threading.Event()  # "a" waits in the first stage until the test sets it
        self.first_free.set()
        self.in_first = threading.Event()  # "a" entered its first stage
        self.where: dict[object, tuple[str, str]] = {}  # item -> threads of its first and second stage

    def run(self, items):  # a request run alone after its merged batch failed
        return [f"alone-{i}" for i in items]

    def first(self, items):
        if self.poison and self.poison[0] == "first" and self.poison[1] in items:
            raise ValueError("poisoned first")
        if "a" in items:
            self.in_first.set()
            assert self.first_free.wait(30), "the test never let the first stage go on"
        self.firsts.append(list(items))
        self.threads.add(threading.current_thread().name)
        for i in items:
            self.where[i] = (threading.current_thread().name, "")
        return list(items)

    def second(self, items):
        if self.poison and self.poison[0] == "second" and self.poison[1] in items:
            raise ValueError("poisoned second")
        self.judging.set()
        assert self.released.wait(30), "the test never released the second stage"
        self.seconds.append(list(items))
        self.threads.add(threading.current_thread().name)
        for i in items:
            self.where[i] = (self.where[i][0], threading.current_thread().name)
        return [f"done-{i}" for i in items]

    def batcher(self) -> MicroBatcher:
        return MicroBatcher(self.run, max_batch_size=64, max_wait_s=0.001, stages=(self.first, self.second))


def test_a_pipelined_batcher_runs_the_next_batch_while_one_is_judged():
    """With two stages, the worker forms and runs the next batch while its finisher judges this one (on another
    thread), at most one batch waiting between them; answers and order are those of one-stage runs."""
    st = TwoStages()
    st.first_free.clear()
    b = st.batcher()
    try:
        first = b.submit("a", 1)  # held in its first stage until "b" waits behind it: "a" is then handed over
        assert st.in_first.wait(30)
        second = b.submit("b", 1)
        st.first_free.set()
        assert st.judging.wait(30)  # "a" is held in the second stage
        deadline = time.monotonic() + 30
        while len(st.firsts) < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert st.firsts == [["a"], ["b"]]  # "b" ran its first stage while "a" was judged
        queued = [b.submit(i, 1) for i in range(3)]  # the worker is handing "b" over: these wait together
        time.sleep(0.05)
        assert len(st.firsts) == 2, st.firsts  # never a third batch in flight
        st.released.set()
        assert first.result(30) == "done-a" and second.result(30) == "done-b"
        assert [f.result(30) for f in queued] == ["done-0", "done-1", "done-2"]
        assert st.seconds == [["a"], ["b"], [0, 1, 2]]  # judged in the order formed, the three as one batch
        assert len(st.threads) == 2  # two threads: the worker and its finisher
    finally:
        b.close()


@pytest.mark.parametrize("stage", ["first", "second"])
def test_a_pipelined_stage_that_fails_reruns_its_requests_one_at_a_time(stage):
    st = TwoStages(poison=(stage, "bad"))
    st.released.set()
    b = st.batcher()
    try:
        blocker = b.submit("blocker", 1)
        assert blocker.result(30) == "done-blocker"
        st.released.clear()
        st.judging.clear()
        held = b.submit("held", 1)
        assert st.judging.wait(30)
        st.judging.clear()
        good, bad = b.submit("good", 1), b.submit("bad", 1)  # merged behind the held batch
        st.released.set()
        assert held.result(30) == "done-held"
        assert good.result(30) == "alone-good"  # its merged batch failed: run alone, and answered
        assert bad.result(30) == "alone-bad"  # the stub's plain run does not poison: the request itself is fine
    finally:
        b.close()


def test_a_pipelined_batcher_closes_with_a_batch_in_each_stage():
    st = TwoStages()
    st.first_free.clear()
    b = st.batcher()
    first = b.submit("a", 1)
    assert st.in_first.wait(30)
    second = b.submit("b", 1)
    st.first_free.set()
    assert st.judging.wait(30)
    deadline = time.monotonic() + 30
    while len(st.firsts) < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    closer = threading.Thread(target=b.close)
    closer.start()
    st.released.set()
    closer.join(30)
    assert not closer.is_alive()  # close waited for both stages, then ended both threads
    assert first.result(0) == "done-a" and second.result(0) == "done-b"


def test_a_lone_batch_is_finished_by_its_worker():
    """With no request waiting and the finisher idle there is nothing to overlap: the worker runs both stages
    itself (a hand-off to the finisher cost batch 64 from one client 5% of its throughput); a batch with
    another waiting behind it is handed over."""
    st = TwoStages()
    st.released.set()
    b = st.batcher()
    try:
        assert b.submit("x", 1).result(30) == "done-x"
        worker, finisher = st.where["x"]
        assert worker == finisher
        st.first_free.clear()
        first = b.submit("a", 1)
        assert st.in_first.wait(30)
        second = b.submit("b", 1)
        st.first_free.set()
        assert first.result(30) == "done-a" and second.result(30) == "done-b"
        assert st.where["a"][0] != st.where["a"][1]  # "b" was waiting: "a" was judged by the finisher
    finally:
        b.close()
