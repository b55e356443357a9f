"""Each model's batching on its snapshot, like Triton's per-model ``dynamic_batching`` config.

The deck manifest's ``batching`` settings (Triton's names; the deck model at the top level, a card
under ``cards``) over the server's flags, computed once per (deck version, model).
"""

from __future__ import annotations

import logging

from carddeck.serving.batching import BatchPolicy
from carddeck.serving.models import Model

log = logging.getLogger(__name__)


class BatchPolicies:
    def __init__(self, max_batch_size: int, max_wait_s: float, preferred_batch_sizes: tuple[int, ...]) -> None:
        self.flags = (max_batch_size, max_wait_s, preferred_batch_sizes)  # the server's
        self._policies: dict[tuple[int, str], BatchPolicy] = {}  # (deck version, model) -> its policy

    def of(self, model: Model) -> BatchPolicy:
        """``model``'s batching on its snapshot: the manifest's settings for it over the server's flags."""
        deck = model.deck
        key = (deck.version, model.name)
        found = self._policies.get(key)
        if found is not None:
            return found
        settings = dict(deck.manifest.batching)
        cards = settings.pop("cards", {})
        if model.card is not None:
            settings = dict(cards.get(model.card.name, {}))
        max_batch_size, max_wait_s, preferred_batch_sizes = self.flags
        most = settings.get("max_batch_size", max_batch_size)
        preferred = tuple(settings.get("preferred_batch_size", preferred_batch_sizes))
        if any(p > most for p in preferred):
            log.warning(
                "model %s: preferred batch sizes %s above max_batch_size %d: ignored", model.name, preferred, most
            )
            preferred = tuple(p for p in preferred if p <= most)
        delay = settings.get("max_queue_delay_microseconds", max_wait_s * 1e6) / 1e6
        found = BatchPolicy(most, delay, preferred)
        if len(self._policies) > 1024:  # old snapshots' entries
            self._policies.clear()
        self._policies[key] = found
        return found


__all__ = ["BatchPolicies"]
