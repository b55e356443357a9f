"""Dynamic batching: concurrent small requests merge into one batch per model run.

Like Triton's dynamic batcher, a batch is formed only when a worker (a "batch in flight") is free,
from the queue in arrival order. Each request carries the :class:`BatchPolicy` of its model (per
deck and per card, like Triton's per-model ``dynamic_batching``); the oldest request's policy
decides: take queued requests up to its ``max_batch_size``; run at once when the batch is full, or
(cut there) when the queue reaches one of its ``preferred_batch_sizes``; otherwise wait for more,
up to ``max_queue_delay`` after the oldest arrived. The wait adapts to load: it only waits while
other requests have *announced* themselves (entered the server and are still being decoded or
routed); with nobody else coming it runs what it has, so a lone client pays no batching delay.

With one batch in flight (the default; bench_server measured more of them splitting the same
queue into smaller batches on 2 cores) requests pile up while a batch runs and form the next one
by themselves: under closed-loop load the batch grows with the number of clients.

Requests are never split: a batch's requests all finish together. A failing merged batch is
retried one request at a time, so one poisoned request cannot fail the others.

Pipelined (``stages=(first, second)``, ``run(items) == second(first(items))``): each worker forms a batch
and runs ``first`` on it (the deck's gate and cards), then hands it to a finisher thread of its own that runs
``second`` (the verdict) and sets the answers; the worker forms and runs the next batch meanwhile. At most two
batches per worker are in flight, one in each stage, finished in the order they were formed, and each is still
run as one batch, exactly as ``run`` would. A failing stage reruns its batch's requests one at a time. With no
request waiting and the finisher idle, the worker finishes the batch itself: there is nothing to overlap.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from carddeck.errors import Cancelled

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchPolicy:
    """How one model's requests form batches (Triton's ``max_batch_size`` and ``dynamic_batching``)."""

    max_batch_size: int = 64
    max_queue_delay_s: float = 0.002
    preferred_batch_sizes: tuple[int, ...] = ()  # a queue holding exactly one of these runs at once

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue_delay_s < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue_delay_s >= 0")
        if any(not 1 <= p <= self.max_batch_size for p in self.preferred_batch_sizes):
            raise ValueError(f"preferred batch sizes must lie in 1..max_batch_size ({self.max_batch_size})")

    def plan(self, sizes: Sequence[int]) -> tuple[int, bool]:
        """Of queued request ``sizes`` (arrival order): how many to take, and whether to run them now."""
        total, count, cut = 0, 0, 0
        for size in sizes:
            if count and total + size > self.max_batch_size:
                return count, True  # full (the next one does not fit): a full batch is always worth running
            total += size
            count += 1
            if total in self.preferred_batch_sizes:
                cut = count
        if total >= self.max_batch_size:
            return count, True
        return (cut, True) if cut else (count, False)


_PENDING, _RUNNING, _CANCELLED, _DONE = range(4)
_transitions = threading.Lock()  # guards every Pending's state: each change is a few bytecodes


class Pending(Generic[R]):
    """A batched request's result, waited for by one thread: what a ``Future`` does for the batcher, at a
    fraction of its cost. A ``Future`` builds a Condition (an RLock and a waiters list) per request and
    wakes its waiter through ``notify_all``; under load that was 30% of the GIL's time (profile_server.py).
    Here the result is a lock taken at birth and released once when set: one C call wakes the waiter."""

    __slots__ = ("_callbacks", "_error", "_latch", "_result", "_state")

    def __init__(self) -> None:
        self._latch = threading.Lock()
        self._latch.acquire()
        self._state = _PENDING
        self._result: R | None = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Pending[R]], object]] | None = None

    def set_running_or_notify_cancel(self) -> bool:
        """False when it was cancelled (then it never runs), else it runs and can no longer be cancelled."""
        with _transitions:
            if self._state == _CANCELLED:
                return False
            self._state = _RUNNING
            return True

    def cancel(self) -> bool:
        with _transitions:
            if self._state != _PENDING:
                return self._state == _CANCELLED
            self._state = _CANCELLED
        self._settled()
        return True

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def done(self) -> bool:
        return self._state >= _CANCELLED

    def set_result(self, result: R) -> None:
        self._settle(result, None)

    def set_exception(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, result: R | None, error: BaseException | None) -> None:
        with _transitions:
            if self._state == _CANCELLED:  # its waiter gave up (deadline): nobody reads it
                return
            if self._state == _DONE:  # a second answer must not overwrite the first one's reader's view
                raise InvalidStateError("result already set")
            self._result, self._error, self._state = result, error, _DONE
        self._settled()

    def _settled(self) -> None:
        with _transitions:
            callbacks, self._callbacks = self._callbacks, None
        self._latch.release()
        for fn in callbacks or ():
            try:
                fn(self)
            except Exception:
                log.exception("callback of a batched request failed")

    def add_done_callback(self, fn: Callable[[Pending[R]], object]) -> None:
        with _transitions:
            if self._state < _CANCELLED:
                self._callbacks = [*(self._callbacks or ()), fn]
                return
        fn(self)

    def result(self, timeout: float | None = None) -> R:
        if not self._latch.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            raise FutureTimeout()
        self._latch.release()  # settled for good: later calls pass too
        if self._state == _CANCELLED:
            raise CancelledError()
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self.result(timeout)
        except (CancelledError, FutureTimeout):
            raise
        except BaseException as exc:
            return exc
        return None


@dataclass
class _Entry(Generic[T, R]):
    item: T
    size: int
    future: Pending[R]
    policy: BatchPolicy
    enqueued: float = field(default_factory=time.monotonic)
    is_cancelled: Callable[[], bool] | None = None


_FAILED = object()  # a stage whose requests were answered otherwise (MicroBatcher._attempt)


class _Handoff(Generic[T]):
    """A rendezvous between a worker and its finisher: ``put`` returns once the finisher has taken the item,
    so the worker forms its next batch only while the finisher runs this one (two in flight, not three)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._item: T | None = None
        self._closed = False
        self.idle = True  # the finisher holds no item (only the worker puts: when idle, it stays so until a put)

    def put(self, item: T) -> None:
        with self._cond:
            self._item = item
            self.idle = False
            self._cond.notify_all()
            while self._item is item:
                self._cond.wait()

    def take(self) -> T | None:
        """The next item; None once closed and empty."""
        with self._cond:
            while self._item is None and not self._closed:
                self._cond.wait()
            item, self._item = self._item, None
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class MicroBatcher(Generic[T, R]):
    """Merge submitted items into batches and run ``run(items) -> results`` (one result per item)."""

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        preferred_batch_sizes: Sequence[int] = (),
        workers: int = 1,
        on_batch: Callable[[int, list[float]], None] | None = None,
        name: str = "batcher",
        stages: tuple[Callable[[list[T]], object], Callable[[object], Sequence[R]]] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._run = run
        self._stages = stages
        # the policy of requests submitted without one of their own
        self.policy = BatchPolicy(max_batch_size, max_wait_s, tuple(preferred_batch_sizes))
        self.max_batch_size = max_batch_size
        self._on_batch = on_batch
        self._queue: deque[_Entry[T, R]] = deque()
        self._cond = threading.Condition()
        self._expected = 0
        self._closed = False
        # each worker forms a batch when it is free and runs it itself: handing the batch from a collector
        # to a pool thread cost two thread wake-ups per micro-batch and bought no parallelism
        self._workers: list[threading.Thread] = []
        self._pairs: list[tuple[threading.Thread, ...]] = []  # a worker, and its finisher when pipelined
        for i in range(workers):
            if stages is None:
                pair: tuple[threading.Thread, ...] = (
                    threading.Thread(target=self._work, name=f"{name}-run_{i}", daemon=True),
                )
            else:
                handoff: _Handoff[tuple[list[_Entry[T, R]], object]] = _Handoff()
                pair = (
                    threading.Thread(target=self._work_pipelined, args=(handoff,), name=f"{name}-run_{i}", daemon=True),
                    threading.Thread(target=self._finish_all, args=(handoff,), name=f"{name}-verdict_{i}", daemon=True),
                )
            self._pairs.append(pair)
            self._workers.extend(pair)
        for worker in self._workers:
            worker.start()

    # -- producers ----------------------------------------------------------------------------
    def announce(self) -> None:
        """A request entered the server and will submit soon: worth waiting for (up to max_wait)."""
        with self._cond:
            self._expected += 1

    def withdraw(self) -> None:
        """An announced request will not submit (it failed validation, or it runs on its own)."""
        with self._cond:
            self._expected = max(0, self._expected - 1)
            self._cond.notify_all()

    def submit(
        self,
        item: T,
        size: int,
        *,
        announced: bool = False,
        is_cancelled: Callable[[], bool] | None = None,
        policy: BatchPolicy | None = None,
    ) -> Pending[R]:
        future: Pending[R] = Pending()
        entry = _Entry(item, size, future, policy or self.policy, is_cancelled=is_cancelled)
        with self._cond:
            if announced:
                self._expected = max(0, self._expected - 1)
            if self._closed:
                raise RuntimeError("batcher is closed")
            self._queue.append(entry)
            self._cond.notify_all()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def close(self, *, wait: bool = True) -> None:
        """Stop taking requests (the queued ones still run); ``wait=False`` does not wait for the batches
        running now (shutdown past its drain)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        me = threading.current_thread()
        for pair in self._pairs:
            if me in pair:  # closed from a batch's own callback: its pair's worker may be handing it the next
                continue
            for worker in pair:
                worker.join(timeout=None if wait else 0.1 / len(self._workers))

    # -- the workers --------------------------------------------------------------------------
    def _next_batch(self) -> list[_Entry[T, R]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            while True:
                head = self._queue[0]  # the oldest request's model decides (Triton: per model)
                count, ready = head.policy.plan([e.size for e in self._queue])
                if ready or self._closed or self._expected <= 0:
                    break
                remaining = head.enqueued + head.policy.max_queue_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return [self._queue.popleft() for _ in range(count)]

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._execute(batch)
            except BaseException as exc:
                self._fail(batch, exc)

    def _work_pipelined(self, handoff: _Handoff[tuple[list[_Entry[T, R]], object]]) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                try:
                    live = self._start(batch)
                    if live:
                        self._prepare(live, handoff)
                except BaseException as exc:
                    self._fail(batch, exc)
        finally:
            handoff.close()  # its finisher ends once it has run what it was handed

    def _prepare(self, live: list[_Entry[T, R]], handoff: _Handoff[tuple[list[_Entry[T, R]], object]]) -> None:
        assert self._stages is not None
        first = self._stages[0]
        prepared = self._attempt(live, lambda: first([e.item for e in live]))
        if prepared is _FAILED:
            return
        with self._cond:
            waiting = bool(self._queue)
        if waiting or not handoff.idle:
            handoff.put((live, prepared))
        else:  # nothing to overlap with (batch 64, one client: a hand-off cost 5% of its throughput): finish here
            self._finish_batch(live, prepared)

    def _finish_all(self, handoff: _Handoff[tuple[list[_Entry[T, R]], object]]) -> None:
        while (got := handoff.take()) is not None:
            try:
                self._finish_batch(*got)
            except BaseException as exc:
                self._fail(got[0], exc)
            handoff.idle = True

    def _finish_batch(self, live: list[_Entry[T, R]], prepared: object) -> None:
        assert self._stages is not None
        second = self._stages[1]
        self._answer(live, self._attempt(live, lambda: second(prepared)))

    def _fail(self, batch: list[_Entry[T, R]], exc: BaseException) -> None:
        """A worker that died would leave its model's queue unserved: fail the batch, go on."""
        log.exception("batch of %d requests failed outside its run", len(batch))
        for entry in batch:
            if not entry.future.done():
                entry.future.set_exception(exc)

    def _execute(self, batch: list[_Entry[T, R]]) -> None:
        live = self._start(batch)
        if live:
            self._run_entries(live)

    def _start(self, batch: list[_Entry[T, R]]) -> list[_Entry[T, R]]:
        """The batch's requests still wanted (the others told they were cancelled), counted as one batch."""
        now = time.monotonic()
        live = []
        for entry in batch:
            if entry.is_cancelled is not None and entry.is_cancelled():
                entry.future.set_exception(Cancelled("request cancelled before it ran"))
            elif entry.future.set_running_or_notify_cancel():
                live.append(entry)
        if live and self._on_batch is not None:
            try:
                self._on_batch(sum(e.size for e in live), [now - e.enqueued for e in live])
            except Exception:  # metrics must never fail a batch
                log.exception("batch observer failed")
        return live

    def _run_entries(self, live: list[_Entry[T, R]]) -> None:
        self._answer(live, self._attempt(live, lambda: self._run([e.item for e in live])))

    def _attempt(self, live: list[_Entry[T, R]], step: Callable[[], Any]) -> Any:
        """``step()`` for these requests, or _FAILED once they are answered otherwise: a lone request gets the
        error; a merged batch's requests are each run alone (one poisoned request cannot fail the others)."""
        try:
            return step()
        except BaseException as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return _FAILED
            log.warning("merged batch of %d requests failed (%s); running them one by one", len(live), exc)
            for entry in live:
                self._run_entries([entry])
            return _FAILED

    @staticmethod
    def _answer(live: list[_Entry[T, R]], results: Any) -> None:
        if results is not _FAILED:
            for entry, result in zip(live, results):
                entry.future.set_result(result)


def then(future: Future[T], fn: Callable[[T], R]) -> Future[R]:
    """A future of ``fn(future's result)``, computed where ``future`` completes; its error passes through."""
    out: Future[R] = Future()

    def done(f: Future[T]) -> None:
        try:
            out.set_result(fn(f.result()))
        except BaseException as exc:
            out.set_exception(exc)

    future.add_done_callback(done)
    return out


__all__ = ["BatchPolicy", "MicroBatcher", "Pending", "then"]
