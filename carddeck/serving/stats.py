"""Per-model request statistics, the counters behind the Open Inference Protocol's ModelStatistics."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class ModelStats:
    """Counters for one model (ns, like Triton)."""

    inference_count: int = 0  # images
    execution_count: int = 0  # batch runs (merged requests count once): inferences / executions = mean batch
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    last_inference_ms: int = 0
    batch_sizes: dict[int, list[int]] = field(default_factory=dict)  # executed size -> [count, compute ns]


class Statistics:
    """Thread-safe :class:`ModelStats` by model name; readers get copies."""

    def __init__(self) -> None:
        self._stats: dict[str, ModelStats] = {}
        self._lock = threading.Lock()

    def record(
        self, model: str, n: int, elapsed_s: float, *, ok: bool, queued_s: float = 0.0, compute_s: float = 0.0
    ) -> None:
        """One request of ``n`` images that took ``elapsed_s`` in all."""
        elapsed = int(elapsed_s * 1e9)
        with self._lock:
            s = self._stats.get(model) or self._stats.setdefault(model, ModelStats())  # no ModelStats per call
            if ok:
                s.inference_count += n
                s.success_count += 1
                s.success_ns += elapsed
                s.queue_ns += int(queued_s * 1e9)
                s.compute_ns += int(compute_s * 1e9)
                s.last_inference_ms = int(time.time() * 1000)
            else:
                s.fail_count += 1
                s.fail_ns += elapsed

    def record_execution(self, model: str, n: int, compute_s: float) -> None:
        """One run of ``model`` on a batch holding ``n`` of its images (its requests, merged)."""
        with self._lock:
            s = self._stats.get(model) or self._stats.setdefault(model, ModelStats())  # no ModelStats per call
            s.execution_count += 1
            entry = s.batch_sizes.setdefault(n, [0, 0])
            entry[0] += 1
            entry[1] += int(compute_s * 1e9)

    def get(self, model: str) -> ModelStats:
        with self._lock:
            s = self._stats.get(model, ModelStats())
            return ModelStats(**{**s.__dict__, "batch_sizes": {k: list(v) for k, v in s.batch_sizes.items()}})


__all__ = ["ModelStats", "Statistics"]
