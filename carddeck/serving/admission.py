"""Which requests a replica still takes: in-flight accounting and drain.

Every call that does work is counted while it runs (:meth:`Admission.request`); shutting down first
takes readiness away (load balancers stop sending), then drains: new work is refused with NotReady
(retry on another replica) and shutdown waits for what was already taken.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from carddeck.errors import NotReady


class Admission:
    def __init__(self) -> None:
        self._inflight = 0
        self._cond = threading.Condition(threading.Lock())  # a plain lock: taken twice per request
        self._draining = False
        self.shutting_down = False  # readiness goes false; requests are still taken until drain

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Wrap every call that does work: refused once draining, counted until it finishes."""
        with self._cond:
            if self._draining:
                raise NotReady("the server is shutting down; retry on another replica")
            self._inflight += 1
        try:
            yield
        finally:
            with self._cond:
                self._inflight -= 1
                if self._draining:  # only drain() waits (it sets draining under this lock first)
                    self._cond.notify_all()

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self, timeout_s: float) -> bool:
        """Refuse new work and wait for in-flight requests; True when they all finished in time."""
        deadline = time.monotonic() + timeout_s
        self.shutting_down = True
        with self._cond:
            self._draining = True
            while self._inflight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True


__all__ = ["Admission"]
