"""How a request reaches a micro-batch run (:mod:`carddeck.serving.microbatch`).

A request that is alone in the server (nobody to merge with) skips the batcher and runs in its own
thread: no hand-off cost at low load. One too large for its model's batch, or any when batching is
off, runs in its own thread too. The others join the micro-batcher under their model's
:class:`~carddeck.serving.batching.BatchPolicy` (:mod:`carddeck.serving.batch_policies`).
:meth:`Dispatch.start` starts a request without waiting for it (the streaming RPCs): many requests of
one stream fill a batch from one thread. Every request, answered or failed, is counted in the
per-model statistics.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from carddeck.errors import Cancelled
from carddeck.serving.batch_policies import BatchPolicies
from carddeck.serving.batching import BatchPolicy, MicroBatcher, Pending
from carddeck.serving.microbatch import Done, MicroBatchRun, Work
from carddeck.serving.models import Model
from carddeck.serving.stats import Statistics


class Dispatch:
    def __init__(
        self,
        run: MicroBatchRun,
        statistics: Statistics,
        policies: BatchPolicies,
        *,
        metrics: Any = None,  # observe_batch, track_queue_depth (MetricsHook), or None
        batching: bool = True,  # with the server's batch flags (``policies.flags``)
        workers: int = 1,  # batches in flight
        pipelined: bool = True,  # a batch's verdict while the next one runs (MicroBatcher's stages)
    ) -> None:
        self.run = run
        self.statistics = statistics
        self.policies = policies
        self.metrics = metrics
        self._inferring = 0  # inference calls inside run/start right now
        self._inferring_lock = threading.Lock()
        self._counted = _Inferring(self)
        self.batcher: MicroBatcher[Work, Done] | None = None
        max_batch_size, max_wait_s, preferred_batch_sizes = policies.flags
        if batching and max_batch_size > 1:
            self.batcher = MicroBatcher(
                run,
                max_batch_size=max_batch_size,
                max_wait_s=max_wait_s,
                preferred_batch_sizes=preferred_batch_sizes,
                workers=workers,
                on_batch=self.observe_batch,
                name="carddeck-batch",
                stages=_stages(run) if pipelined else None,
            )
            if metrics is not None:  # read at scrape time, so the gauge also goes back down
                batcher = self.batcher
                metrics.track_queue_depth(lambda: batcher.queue_depth)

    def close(self, *, wait: bool = True) -> None:
        if self.batcher is not None:
            self.batcher.close(wait=wait)

    def run_request(
        self,
        model: Model,
        n: int,
        make_work: Callable[[], Work],
        timeout_s: float | None,
        is_cancelled: Callable[[], bool] | None,
    ) -> Done:
        """A request of ``n`` images whose caller waits for it; ``make_work`` checks and prepares it."""
        with self._inferring_call():
            start = time.monotonic()
            policy = self.policies.of(model)
            announced = self._announce(n, policy)
            try:
                work = make_work()
            except BaseException:
                if announced:
                    self.batcher.withdraw()  # type: ignore[union-attr]
                self.record(model.name, n, start, ok=False)
                raise
            return self._execute(work, announced, timeout_s, is_cancelled, model.name, start, policy)

    def start(
        self,
        model: Model,
        n: int,
        make_work: Callable[[], Work],
        answer: Callable[[Done], Any],
        *,
        hold: contextlib.AbstractContextManager[Any],
        is_cancelled: Callable[[], bool] | None = None,
        announced: bool = False,
    ) -> Future[Any]:
        """Start a request and return at once: a future of ``answer(done)``. ``hold`` (the image budget) is
        entered now and left when the request is answered. Invalid input raises here, before anything is
        queued. ``announced``: the caller told :meth:`announce` this request was coming (a stream reading
        its next request); it counts as arrived whichever way it goes."""
        start = time.monotonic()
        held = contextlib.ExitStack()  # given back when the request is answered
        try:
            held.enter_context(hold)
            work = make_work()
        except BaseException:
            held.close()
            if announced:
                self.withdraw()
            self.record(model.name, n, start, ok=False)
            raise

        out: Future[Any] = Future()
        batch_policy = self.policies.of(model)
        if self.batcher is None or len(work.x) >= batch_policy.max_batch_size:
            if announced:
                self.withdraw()
            try:
                with held, self._inferring_call():
                    out.set_result(answer(self._execute(work, False, None, is_cancelled, model.name, start)))
            except BaseException as exc:
                out.set_exception(exc)
            return out
        with self._inferring_lock:
            self._inferring += 1  # a unary request meanwhile is not alone: it joins the batch

        def finish(inner: Pending[Done]) -> None:
            held.close()
            with self._inferring_lock:
                self._inferring -= 1
            try:
                done = inner.result()
            except BaseException as exc:
                self.record(model.name, len(work.x), start, ok=False)
                out.set_exception(exc)
                return
            queued = max(0.0, time.monotonic() - start - done.compute_s)
            self.record(model.name, len(work.x), start, ok=True, queued_s=queued, compute_s=done.compute_s)
            out.set_result(answer(done))

        queued = self.batcher.submit(
            work, len(work.x), announced=announced, is_cancelled=is_cancelled, policy=batch_policy
        )
        queued.add_done_callback(finish)
        return out

    def announce(self) -> None:
        """A request is on its way (a stream is reading its next one): batches may wait for it, up to
        their queue delay; :meth:`start` with ``announced=True`` or :meth:`withdraw` settles it."""
        if self.batcher is not None:
            self.batcher.announce()

    def withdraw(self) -> None:
        """An announced request will not come (the stream ended, or the request failed before submit)."""
        if self.batcher is not None:
            self.batcher.withdraw()

    def _announce(self, n: int, policy: BatchPolicy) -> bool:
        """True: this request goes through the batcher (and told it to expect one more)."""
        if self.batcher is None or n >= policy.max_batch_size:
            return False
        with self._inferring_lock:
            alone = self._inferring <= 1 and self.batcher.queue_depth == 0
        if alone:
            return False
        self.batcher.announce()
        return True

    def _inferring_call(self) -> _Inferring:
        return self._counted  # holds no state of its own: one for every call

    def _execute(
        self,
        work: Work,
        batched: bool,
        timeout_s: float | None,
        is_cancelled: Callable[[], bool] | None,
        model: str,
        start: float,
        policy: BatchPolicy | None = None,
    ) -> Done:
        """Run ``work`` in this thread (``batched`` False) or submit it to the batcher and wait; record it."""
        ok = False
        x = work.x
        try:
            if not batched:  # large request, alone, or batching off: run in this thread
                if is_cancelled is not None and is_cancelled():
                    raise Cancelled("request cancelled (or its deadline passed) before it ran")
                self.observe_batch(len(x), [])  # a batch of its own, no queue wait
                t0 = time.monotonic()
                (done,) = self.run([work])
                done.queued_s, done.compute_s = t0 - start, time.monotonic() - t0  # its own, not shared
            else:
                assert self.batcher is not None
                future = self.batcher.submit(work, len(x), announced=True, is_cancelled=is_cancelled, policy=policy)
                if timeout_s is not None and timeout_s > 86400:
                    timeout_s = None  # "no deadline" arrives as a huge one from some clients
                try:
                    done = future.result(timeout=timeout_s)
                except FutureTimeout:
                    future.cancel()
                    raise Cancelled(f"deadline passed after {time.monotonic() - start:.3f} s in the queue") from None
            ok = True
            queued = done.queued_s if not batched else max(0.0, time.monotonic() - start - done.compute_s)
            self.record(model, len(x), start, ok=True, queued_s=queued, compute_s=done.compute_s)
            return done
        finally:
            if not ok:
                self.record(model, len(x), start, ok=False)

    def observe_batch(self, size: int, waits: list[float]) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch(size, waits)

    def record(
        self, model: str, n: int, start: float, *, ok: bool, queued_s: float = 0.0, compute_s: float = 0.0
    ) -> None:
        """The request in ``model``'s statistics (OIP ModelStatistics)."""
        self.statistics.record(model, n, time.monotonic() - start, ok=ok, queued_s=queued_s, compute_s=compute_s)


def _stages(run: MicroBatchRun) -> tuple[Callable[[list[Work]], Any], Callable[[Any], list[Done]]]:
    """A micro-batch in two stages: the gate and the cards, then the verdict, which runs while the next batch is
    gated and run (default deck, b1/c32, quiet machine: 1.09x images/s, 0.94x CPU per image; gating the next
    batch during this one's cards instead split the clients into three groups and lost: benchmarks/RESULTS.md,
    session 12)."""
    return run.route_and_run, run.judge


class _Inferring:
    """Counts a call in ``Dispatch._inferring`` while it runs: a class, not a generator (a third of the cost)."""

    __slots__ = ("dispatch",)

    def __init__(self, dispatch: Dispatch) -> None:
        self.dispatch = dispatch

    def __enter__(self) -> None:
        d = self.dispatch
        with d._inferring_lock:
            d._inferring += 1

    def __exit__(self, *exc: object) -> None:
        d = self.dispatch
        with d._inferring_lock:
            d._inferring -= 1


__all__ = ["Dispatch"]
