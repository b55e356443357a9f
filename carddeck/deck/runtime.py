"""ONNX Runtime sessions for cards: execution providers, thread budgets, a shared worker pool.

One session per card. Providers: CUDA then CPU when onnxruntime-gpu sees a GPU, else CPU; each
session logs the providers it actually got (ORT falls back to CPU silently apart from a log line).
Threads: cards selected for a batch run concurrently, so each session gets
``cores // min(cards, cores)`` intra-op threads and the pool runs at most ``cores`` cards at once;
together they never ask for more threads than there are cores. Intra-op threads do not spin while
waiting for work (ORT's default is to spin): between the small batches a server runs, spinning burnt
1.5-2x the CPU per image with 2 threads per card and slowed the other threads sharing the cores
(benchmarks/bench_ort_threads.py, section 3); ``spin=True`` restores it for a dedicated, idle machine.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


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


def threads_per_card(num_cards: int, cores: int | None = None) -> int:
    cores = cpu_cores() if cores is None else cores
    return max(1, cores // max(1, min(num_cards, cores)))


class CardSession:
    """One card's ORT session. ``run`` is thread-safe (ORT releases the GIL).

    ``max_rows``: images per ORT run; a larger batch runs in slices of it. ORT's memory arena grows to the
    largest run it has seen and keeps that memory, so one 4,096-image request would pin gigabytes for good.
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
        log.info("card %s: ONNX Runtime providers %s, %d intra-op threads", key, self.providers, intra_op_threads)

    def logits(self, images: np.ndarray) -> np.ndarray:
        step = self.max_rows or max(1, len(images))
        outs = [self.session.run(["logits"], {"images": images[i : i + step]})[0] for i in range(0, len(images), step)]
        return np.asarray(outs[0] if len(outs) == 1 else np.concatenate(outs), np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def card_pool() -> ThreadPoolExecutor:
    """A process-wide pool that runs the cards of one batch concurrently (shared by deck snapshots)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=cpu_cores(), thread_name_prefix="carddeck-card")
        return _pool


__all__ = ["CardSession", "card_pool", "choose_providers", "cpu_cores", "softmax", "threads_per_card"]
