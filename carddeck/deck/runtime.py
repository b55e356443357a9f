"""ONNX Runtime sessions for cards: execution providers, thread budgets, a shared worker pool.

One session per card. Providers: CUDA then CPU when onnxruntime-gpu sees a GPU, else CPU; each
session logs the providers it actually got (ORT falls back to CPU silently apart from a log line).
Threads: by default each session runs on one intra-op thread, and the cores are filled by running work
side by side instead: a card's run of many rows is cut into chunks, and a deck's run puts the chunks of
all the cards selected for a batch in one job list that up to ``cores`` threads claim (the card pool;
a card run on its own, :meth:`CardSession.logits`, hands its chunks to the row pool). A
second intra-op thread bought no latency at batch 1 for 1.7-1.8x the CPU per image, and cost 6-10%
more CPU per image at batches 8-64 than chunks on one thread each, which finish as soon at batch 64 (a
lone batch of 8, run whole, takes ~2 ms longer) (one card, 2 cores, benchmarks/bench_ort_threads.py
section 3); and a deck batch routed to three cards left a core idle while the third card ran alone. An
explicit ``intra_op_threads`` gives each session that many threads and runs each slice whole.
Intra-op threads do not spin while waiting for work (ORT's default is to spin): between the small
batches a server runs, spinning burnt 1.5-2x the CPU per image with 2 threads per card and slowed the
other threads sharing the cores (same benchmark); ``spin=True`` restores it for a dedicated, idle
machine. The same holds for the BLAS under numpy: :func:`one_blas_thread` keeps a serving process's
gate and shift monitor on the calling thread.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@functools.cache  # read once: a syscall on every deck run was 2% of a lone request's Python
def cpu_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def choose_providers(requested: Sequence[str] | None = None) -> list[str]:
    """``requested`` if given (each must be available), else CUDA then CPU when CUDA is available."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            from carddeck.errors import InvalidInput

            raise InvalidInput(f"execution provider(s) {missing} not available; this onnxruntime has {available}")
        return list(requested)
    return [CUDA, CPU] if CUDA in available else [CPU]


# cuDNN's EXHAUSTIVE search (ORT's default) benchmarks every convolution again for each new input
# shape; micro-batches come in every size from 1 to max_batch_size, so each new size stalled the
# card for a search (batch 1 at concurrency 32 on an H200: 9.5 images/s). HEURISTIC picks at once.
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}


def _with_options(provider: str) -> str | tuple[str, dict[str, str]]:
    return (provider, CUDA_OPTIONS) if provider == CUDA else provider


CHUNK_ROWS = 8  # per-image cost on one thread is flat from 8 rows up; a straggling thread holds at most this


def chunks(n: int) -> list[tuple[int, int]]:
    """``[start, stop)`` spans cutting ``n`` rows into near-equal chunks of at least CHUNK_ROWS rows."""
    k = max(1, n // CHUNK_ROWS)
    return list(itertools.pairwise([n * i // k for i in range(k + 1)]))


class CardSession:
    """One card's ORT session. ``run`` is thread-safe (ORT releases the GIL).

    ``max_rows``: images per ORT run; a larger batch runs in slices of it. ORT's memory arena grows to the
    largest run it has seen and keeps that memory, so one 4,096-image request would pin gigabytes for good.
    ``row_chunks``: each slice runs in chunks (:func:`chunks`) on up to this many threads at once (CPU
    only), so a one-thread session still fills the cores; its rows in flight stay within one slice. Rows never
    influence each other in a plain card; never give it to a session whose output depends on the whole
    batch (the adaptive variants of :mod:`carddeck.deck.adapt`).
    """

    def __init__(
        self,
        model: bytes,
        *,
        key: str,
        digest: str,
        providers: Sequence[str],
        intra_op_threads: int,
        max_rows: int | None = None,
        spin: bool = False,
        row_chunks: int = 1,
    ) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        for pool in ("intra_op", "inter_op"):
            opts.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spin else "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self.key = key
        self.digest = digest
        self.intra_op_threads = intra_op_threads
        self.max_rows = max_rows
        self.session = ort.InferenceSession(model, opts, providers=[_with_options(p) for p in providers])
        self.providers: list[str] = list(self.session.get_providers())
        self.row_chunks = 1 if CUDA in self.providers else max(1, row_chunks)  # one GPU run beats chunks
        log.info(
            "card %s: ONNX Runtime providers %s, %d intra-op threads, runs in up to %d concurrent chunks",
            key,
            self.providers,
            intra_op_threads,
            self.row_chunks,
        )

    def logits(self, images: np.ndarray) -> np.ndarray:
        step = self.max_rows or max(1, len(images))
        outs = [self._slice(images[i : i + step]) for i in range(0, len(images), step)]
        return np.asarray(outs[0] if len(outs) == 1 else np.concatenate(outs), np.float32)

    def spans(self, n: int) -> list[tuple[int, int]]:
        """``[start, stop)`` spans of ``n`` rows that may run side by side, each through :meth:`logits`: the
        chunks of each ``max_rows`` slice; all ``n`` rows in one span when the session runs them whole (GPU,
        or intra-op threads of its own). A deck runs all its cards' spans as one job list (``Deck.run_routed``)."""
        if self.row_chunks <= 1:
            return [(0, n)]
        step = self.max_rows or max(1, n)
        return [(lo + a, lo + b) for lo in range(0, n, step) for a, b in chunks(min(step, n - lo))]

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"images": x})[0]

    def _slice(self, x: np.ndarray) -> np.ndarray:
        spans = chunks(len(x)) if self.row_chunks > 1 else [(0, len(x))]
        if len(spans) == 1:
            return self._run(x)
        outs = run_claimed(spans, lambda span: self._run(x[span[0] : span[1]]), row_pool(), self.row_chunks)
        return np.concatenate(outs)


# Variables by which a user names BLAS thread counts themselves; one_blas_thread leaves those alone.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def one_blas_thread() -> str:
    """Run numpy's and scipy's BLAS on the calling thread only, unless the environment names a thread count;
    what was done, for the log. For serving processes: their matrix products are small (the gate's and the
    shift monitor's, a few hundred rows at most), yet OpenBLAS hands the larger of them to a second thread,
    which then spins for its next job; under load it never slept. At batch 1 / concurrency 32 on the default
    deck that thread burnt 1.2-1.4 ms of CPU per image, a third of the server's (2 cores, session 7)."""
    named = [v for v in BLAS_THREAD_VARIABLES if os.environ.get(v)]
    if named:
        return f"BLAS threads as {named[0]}={os.environ[named[0]]} says"
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    return "BLAS on the calling thread (1 thread; set OPENBLAS_NUM_THREADS to choose)"


T = TypeVar("T")
R = TypeVar("R")


def run_claimed(jobs: Sequence[T], fn: Callable[[T], R], pool: ThreadPoolExecutor, threads: int) -> list[R]:
    """``[fn(job) for job in jobs]`` on up to ``threads`` threads: the caller and ``threads - 1`` helpers from
    ``pool`` claim jobs until none is left, so a thread the scheduler holds back delays one job, not a fixed
    share, and the caller works instead of waiting (one hand-off per helper, not one per job). A helper
    still queued when the caller is done is cancelled, so nothing waits on a busy pool (no deadlock between
    the card and row pools)."""
    outs: list[R | None] = [None] * len(jobs)
    claimed = itertools.count()  # next() on a count is atomic under the GIL

    def work() -> None:
        while (i := next(claimed)) < len(jobs):
            outs[i] = fn(jobs[i])

    helpers = [pool.submit(work) for _ in range(min(threads, len(jobs)) - 1)]
    try:
        work()
    finally:
        for helper in helpers:
            helper.cancel()
    for helper in helpers:
        if not helper.cancelled():
            helper.result()  # it ran: its jobs are in (or its error is raised here)
    return outs  # type: ignore[return-value]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)  # in place: one new array per call, not four
    z /= z.sum(axis=1, keepdims=True)
    return z.astype(np.float32, copy=False)


_pools: dict[str, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def _shared_pool(name: str, workers: int) -> ThreadPoolExecutor:
    pool = _pools.get(name)  # made once: every deck run asks, and needs no lock after that
    if pool is not None:
        return pool
    with _pool_lock:
        if name not in _pools:
            _pools[name] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"carddeck-{name}")
        return _pools[name]


def card_pool() -> ThreadPoolExecutor:
    """A process-wide pool that runs the cards of one batch concurrently (shared by deck snapshots)."""
    return _shared_pool("card", cpu_cores())


def row_pool() -> ThreadPoolExecutor:
    """A process-wide pool for the chunks of a card's run beyond the caller's own (:class:`CardSession`)."""
    return _shared_pool("rows", max(1, cpu_cores() - 1))


__all__ = [
    "CardSession",
    "card_pool",
    "choose_providers",
    "chunks",
    "cpu_cores",
    "one_blas_thread",
    "row_pool",
    "run_claimed",
    "softmax",
]
