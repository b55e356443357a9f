"""Adaptive micro-batching: concurrent small requests merge into one batch per model run.

A collector thread waits for a free worker, then takes the oldest queued request and adds more
until the batch holds ``max_batch_size`` images or ``max_wait`` has passed since the oldest
arrived. The wait adapts to load: it only waits while other requests have *announced* themselves
(entered the server and are still being decoded or routed); with nobody else coming it runs at
once, so a lone client pays no batching delay. While all workers are busy requests pile up and
form the next batch by themselves.

Requests are never split: a batch's requests all finish together. A failing merged batch is
retried one request at a time, so one poisoned request cannot fail the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from carddeck.errors import Cancelled

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Entry(Generic[T, R]):
    item: T
    size: int
    future: Future[R]
    enqueued: float = field(default_factory=time.monotonic)
    is_cancelled: Callable[[], bool] | None = None


class MicroBatcher(Generic[T, R]):
    """Merge submitted items into batches and run ``run(items) -> results`` (one result per item)."""

    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_wait_s: float,
        workers: int = 1,
        on_batch: Callable[[int, list[float]], None] | None = None,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1 or workers < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and workers must be >= 1, max_wait_s >= 0")
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._queue: deque[_Entry[T, R]] = deque()
        self._cond = threading.Condition()
        self._expected = 0
        self._closed = False
        self._slots = threading.Semaphore(workers)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"{name}-run")
        self._thread = threading.Thread(target=self._collect, name=f"{name}-collect", daemon=True)
        self._thread.start()

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
        self, item: T, size: int, *, announced: bool = False, is_cancelled: Callable[[], bool] | None = None
    ) -> Future[R]:
        future: Future[R] = Future()
        with self._cond:
            if announced:
                self._expected = max(0, self._expected - 1)
            if self._closed:
                raise RuntimeError("batcher is closed")
            self._queue.append(_Entry(item, size, future, is_cancelled=is_cancelled))
            self._cond.notify_all()
        return future

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def close(self, *, wait: bool = True) -> None:
        """Stop collecting; ``wait=False`` does not wait for the batches running now (shutdown past its drain)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5 if wait else 0.1)
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    # -- the collector ------------------------------------------------------------------------
    def _next_batch(self) -> list[_Entry[T, R]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            first = self._queue.popleft()
            batch, total = [first], first.size
            deadline = first.enqueued + self.max_wait_s
            while total < self.max_batch_size:
                if self._queue:
                    if total + self._queue[0].size > self.max_batch_size:
                        break
                    entry = self._queue.popleft()
                    batch.append(entry)
                    total += entry.size
                    continue
                remaining = deadline - time.monotonic()
                if self._expected <= 0 or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch

    def _collect(self) -> None:
        while True:
            self._slots.acquire()  # form the batch only once a worker can take it
            batch = self._next_batch()
            if batch is None:
                self._slots.release()
                return
            try:
                self._pool.submit(self._execute, batch)
            except RuntimeError:  # pool shut down under us
                self._slots.release()
                for entry in batch:
                    entry.future.set_exception(Cancelled("server is shutting down"))
                return

    def _execute(self, batch: list[_Entry[T, R]]) -> None:
        try:
            now = time.monotonic()
            live = []
            for entry in batch:
                if entry.is_cancelled is not None and entry.is_cancelled():
                    entry.future.set_exception(Cancelled("request cancelled before it ran"))
                elif entry.future.set_running_or_notify_cancel():
                    live.append(entry)
            if not live:
                return
            if self._on_batch is not None:
                try:
                    self._on_batch(sum(e.size for e in live), [now - e.enqueued for e in live])
                except Exception:  # metrics must never fail a batch
                    log.exception("batch observer failed")
            self._run_entries(live)
        finally:
            self._slots.release()

    def _run_entries(self, live: list[_Entry[T, R]]) -> None:
        try:
            results = self._run([e.item for e in live])
        except BaseException as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            log.warning("merged batch of %d requests failed (%s); running them one by one", len(live), exc)
            for entry in live:
                self._run_entries([entry])
            return
        for entry, result in zip(live, results):
            entry.future.set_result(result)


__all__ = ["MicroBatcher"]
