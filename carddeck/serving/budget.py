"""How many images the server works on at once, bounded: past the budget a request is refused, not allocated.

Each image in flight costs its decoded and prepared copies and its share of the cards' activations; one
client sending many large requests at once must get RESOURCE_EXHAUSTED (HTTP 429) and a reason to retry,
not take the process's memory.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from carddeck.errors import Overloaded


class ImageBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        """Count ``n`` images in flight until the block ends; Overloaded when they do not fit."""
        with self._lock:
            if self.used + n > self.limit:
                raise Overloaded(
                    f"the server is working on {self.used} images and takes at most {self.limit} at once "
                    f"(--max-inflight-images); this request's {n} do not fit now: retry later or elsewhere"
                )
            self.used += n
        try:
            yield
        finally:
            with self._lock:
                self.used -= n


__all__ = ["ImageBudget"]
