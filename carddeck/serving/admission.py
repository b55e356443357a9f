"""Which requests a replica still takes: in-flight accounting and drain.

Every call that does work is counted while it runs (:meth:`Admission.request`); shutting down first
takes readiness away (load balancers stop sending), then drains: new work is refused with NotReady
(retry on another replica) and shutdown waits for what was already taken.
"""

from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager

from carddeck.errors import NotReady


class Admission:
    def __init__(self) -> None:
        self._inflight = 0
        self._cond = threading.Condition(threading.Lock())  # a plain lock: taken twice per request
        self._draining = False
        self.shutting_down = False  # readiness goes false; requests are still taken until drain
        self._admitted = _Admitted(self)

    def request(self) -> AbstractContextManager[None]:
        """Wrap every call that does work: refused once draining, counted until it finishes."""
        return self._admitted  # holds no state of its own: one for every request

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


class _Admitted:
    """:meth:`Admission.request`'s context: a class, not a generator (a third of the cost, every request)."""

    __slots__ = ("admission",)

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def __enter__(self) -> None:
        a = self.admission
        with a._cond:
            if a._draining:
                raise NotReady("the server is shutting down; retry on another replica")
            a._inflight += 1

    def __exit__(self, *exc: object) -> None:
        a = self.admission
        with a._cond:
            a._inflight -= 1
            if a._draining:  # only drain() waits (it sets draining under this lock first)
                a._cond.notify_all()


__all__ = ["Admission"]
