"""The server's Prometheus series on Ray Serve, through Ray's own metrics export.

A Ray Serve user scrapes every node's Ray metrics port (Ray's Prometheus service discovery finds them,
wherever Serve put the replicas), so each replica's :class:`~carddeck.observability.metrics.Metrics` is
mirrored there: every sample of its registry, under its own name and labels, as a Serve gauge (Serve adds
``application``, ``deployment`` and ``replica``; Ray prefixes names with ``ray_``). Mirroring the samples
keeps what ``carddeck serve`` exposes exactly (counters' ``_total``, histograms' ``_bucket``/``_sum``/
``_count``, info), which Ray's own counters and histograms would rename or re-bucket. With the prefix
stripped at scrape time (serve/ray/prometheus.yml), the dashboard and alerts of serve/ work unchanged.

Ray's export drops non-finite values: ±Inf (a histogram's ``_sum`` after an infinite shift statistic) goes out
as the largest float, so the series stays; NaN (a gauge with nothing to say) is left out, as Ray would.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Collection, Iterable
from typing import Any

from prometheus_client import CollectorRegistry

log = logging.getLogger(__name__)

# Ray re-exports a gauge for twice its report interval (10 s by default) after it was last set: pushing
# every second keeps each series alive, and one that leaves the registry leaves Ray's export too.
PUSH_INTERVAL_S = 1.0


def families(collectors: Iterable[Any]) -> frozenset[str]:
    """The metric family names of some collectors of a :class:`Metrics` (what one deployment fills)."""
    return frozenset(f.name for c in collectors for f in c.describe())


class RayMetricsExport:
    """Mirrors ``registry`` (the families named in ``only``; all when None) into Ray's metrics, every
    ``interval_s``, from a daemon thread. Create it in a Serve replica, so that Serve tags the series."""

    def __init__(
        self, registry: CollectorRegistry, *, only: Collection[str] | None = None, interval_s: float = PUSH_INTERVAL_S
    ) -> None:
        self.registry = registry
        self.only = only
        self.interval_s = interval_s
        self._gauges: dict[str, Any] = {}  # sample name -> its Serve gauge
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="carddeck-ray-metrics", daemon=True)
        self._thread.start()

    def push(self) -> int:
        """Set every sample now; returns how many."""
        from ray.serve.metrics import Gauge

        n = 0
        for family in self.registry.collect():
            if self.only is not None and family.name not in self.only:
                continue
            for sample in family.samples:
                if sample.name.endswith("_created") or math.isnan(sample.value):  # creation times: unused
                    continue
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    keys = tuple(sorted(sample.labels))
                    # Ray's stubs want a tuple of str; without Ray installed Gauge is Any and the ignore unused
                    gauge = Gauge(sample.name, family.documentation, tag_keys=keys)  # type: ignore[arg-type, unused-ignore]
                    self._gauges[sample.name] = gauge
                value = max(-sys.float_info.max, min(sample.value, sys.float_info.max))
                gauge.set(value, dict(sample.labels))
                n += 1
        return n

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.push()
            except Exception as exc:  # metrics must never take a replica down
                log.warning("exporting metrics to Ray failed (retrying every %.0f s): %s", self.interval_s, exc)
            self._stop.wait(self.interval_s)

    def close(self) -> None:
        self._stop.set()


__all__ = ["PUSH_INTERVAL_S", "RayMetricsExport", "families"]
