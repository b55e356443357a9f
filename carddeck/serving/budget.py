"""How many images the server works on at once, bounded: past the budget a request is refused, not allocated.

Each image in flight costs its decoded and prepared copies and its share of the cards' activations; one
client sending many large requests at once must get RESOURCE_EXHAUSTED (HTTP 429) and a reason to retry,
not take the process's memory.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager

from carddeck.errors import Overloaded


class ImageBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def hold(self, n: int) -> AbstractContextManager[None]:
        """Count ``n`` images in flight until the block ends; Overloaded (on entering) when they do not fit."""
        return _Held(self, n)

    def take(self, n: int) -> None:
        with self._lock:
            if self.used + n > self.limit:
                raise Overloaded(
                    f"the server is working on {self.used} images and takes at most {self.limit} at once "
                    f"(--max-inflight-images); this request's {n} do not fit now: retry later or elsewhere"
                )
            self.used += n

    def give_back(self, n: int) -> None:
        with self._lock:
            self.used -= n


class _Held:
    """:meth:`ImageBudget.hold`'s context: a class, not a generator (a third of the cost, every request)."""

    __slots__ = ("budget", "n")

    def __init__(self, budget: ImageBudget, n: int) -> None:
        self.budget, self.n = budget, n

    def __enter__(self) -> None:
        self.budget.take(self.n)

    def __exit__(self, *exc: object) -> None:
        self.budget.give_back(self.n)


__all__ = ["ImageBudget"]
