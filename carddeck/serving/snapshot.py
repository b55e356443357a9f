"""The live deck snapshot: one store object, polled for changes, swapped as one reference.

The current :class:`~carddeck.deck.Deck` is one reference. A request reads it once and finishes on
that snapshot, whatever happens to the reference meanwhile; a change (AddCard, RemoveCard, or a
new manifest written by another replica into a shared store) builds the next snapshot beside the
current one (``Deck.open(previous=...)`` reuses the unchanged cards' sessions) and swaps the
reference, then tells the listeners. Writers serialize on one lock; readers never take it.

A store that cannot be read (an S3 endpoint down, a directory gone) costs nothing but freshness: the
replica keeps serving its last snapshot, keeps polling, and catches up when the store answers again.
:class:`StoreState` says where it stands (reachable, last in sync, failed polls); listeners, metrics and
health report it, and the log says it once per outage, not once per poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from carddeck.card import CardMeta
from carddeck.deck import Deck, DeckStore
from carddeck.deck.store import DEBRIS_GRACE_S
from carddeck.errors import CarddeckError, CardRejected, NotReady

log = logging.getLogger(__name__)

STORE_KEY = "carddeck-store"  # header / metadata key of ready answers: StoreState.describe()


class DeckMetrics(Protocol):
    """What the snapshot holder reports; :class:`carddeck.observability.metrics.Metrics` provides it."""

    def set_deck(self, version: int, cards: Any) -> None: ...
    def set_default_policy(self, policy: str, configured: str) -> None: ...
    def card_change(self, op: str, outcome: str) -> None: ...
    def set_store(self, reachable: bool, last_sync: float, failed: bool) -> None: ...


@dataclass(frozen=True)
class StoreState:
    """What this replica knows of its deck store, as of its last poll."""

    reachable: bool = True  # the manifest could be read
    last_sync: float = 0.0  # wall clock of the last poll that found this replica serving the store's version
    failures: int = 0  # polls in a row that did not end in sync (0: in sync)
    error: str = ""  # why the last poll failed

    @property
    def in_sync(self) -> bool:
        return self.failures == 0

    def describe(self) -> str:
        """One ASCII line (an HTTP header, gRPC metadata): ``reachable``, or what is wrong and how stale the
        served snapshot may be."""
        if self.in_sync:
            return "reachable"
        since = datetime.fromtimestamp(self.last_sync, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        what = "unreachable" if not self.reachable else "reachable, but its deck cannot be loaded"
        text = f"{what}; serving the snapshot last in sync at {since}, {self.failures} failed polls since: {self.error}"
        return " ".join(text.split()).encode("ascii", "replace").decode()


class StoreWatch:
    """Where a replica stands with its store, poll after poll: the :class:`StoreState`, said in the log once per
    outage (not once per poll), told to the metrics and, when it changes, to the listeners."""

    def __init__(self, location: Path | str, metrics: DeckMetrics | None = None) -> None:
        self.location = location
        self.metrics = metrics
        self.state = StoreState()
        self.listeners: list[Callable[[StoreState], None]] = []  # told when the store is lost or back

    def synced(self, version: object) -> None:
        """A poll found this replica serving the store's version (``version``)."""
        old = self.state
        self._set(StoreState(reachable=True, last_sync=time.time()), failed=False)
        if not old.in_sync:
            log.info(
                "deck store %s (%s) after %d failed polls; serving deck version %s",
                "in sync again" if old.reachable else "reachable again", self.location, old.failures, version,
            )  # fmt: skip

    def failed(self, exc: Exception, *, reachable: bool, version: object) -> None:
        """A poll could not read the store (``reachable`` False) or could not load its deck; ``version`` is served."""
        old = self.state
        self._set(replace(old, reachable=reachable, failures=old.failures + 1, error=str(exc)), failed=True)
        if old.in_sync or old.reachable != reachable:  # once per outage (and once more if its kind changes)
            if reachable:
                log.warning("deck store %s changed, but the new deck cannot be loaded; still serving version %s "
                            "and retrying every poll: %s", self.location, version, exc)  # fmt: skip
            else:
                log.warning("cannot reach the deck store %s; still serving deck version %s and retrying every poll "
                            "(logged once per outage): %s", self.location, version, exc)  # fmt: skip

    def _set(self, state: StoreState, *, failed: bool) -> None:
        changed = state.in_sync != self.state.in_sync or state.reachable != self.state.reachable
        self.state = state
        if self.metrics is not None:
            self.metrics.set_store(state.reachable, state.last_sync, failed)
        if changed:
            for listener in self.listeners:
                listener(state)


class Snapshots:
    """Owns one :class:`DeckStore` (its manifest cache and connection live on) and the current snapshot."""

    def __init__(
        self,
        location: Path | str,  # a directory or a store URL (s3://bucket/prefix)
        *,
        poll_interval_s: float = 2.0,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        spin: bool = False,
        calibration_data: str = "",
        reserved_names: tuple[str, ...] = (),
        debris_grace_s: float = DEBRIS_GRACE_S,
        metrics: DeckMetrics | None = None,
        max_run_rows: int | None = None,
        poll_timeout_s: float = 10.0,
    ) -> None:
        self.location = location
        self.poll_interval_s = poll_interval_s
        self.providers = providers
        self.intra_op_threads = intra_op_threads
        self.spin = spin
        self.calibration_data = calibration_data
        self.reserved_names = reserved_names
        self.debris_grace_s = debris_grace_s
        self.metrics = metrics
        self.max_run_rows = max_run_rows
        self.poll_timeout_s = poll_timeout_s
        self.current: Deck | None = None
        self.swaps = 0  # snapshots installed after the first
        self.listeners: list[Callable[[Deck], None]] = []  # told each new snapshot, e.g. health follows the deck
        self.store_watch = StoreWatch(location, metrics)
        self.store_listeners = self.store_watch.listeners  # told when the store is lost or back
        self._store: DeckStore | None = None
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._last_clean = 0.0
        self._calibration: np.ndarray | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Deck:
        """Open the deck (raises on a missing or broken store) and start watching it for changes."""
        deck = self._open(previous=None)
        self._clean()
        self._install(deck)
        self._synced()
        if self.poll_interval_s > 0:
            self._poller = threading.Thread(target=self._poll, name="carddeck-deck-poll", daemon=True)
            self._poller.start()
        return deck

    def close(self, *, wait: bool = True) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=5 if wait else 0.1)

    @property
    def deck(self) -> Deck:
        deck = self.current
        if deck is None:
            raise NotReady("the deck is not loaded yet")
        return deck

    @property
    def store_state(self) -> StoreState:
        return self.store_watch.state

    @property
    def store(self) -> DeckStore:
        if self._store is None:
            self._store = DeckStore(self.location, debris_grace_s=self.debris_grace_s)
        return self._store

    # -- changes ------------------------------------------------------------------------------
    def add_card(self, model: bytes | Path) -> tuple[CardMeta, bool]:
        """Validate and add a card through the store, then swap in the new snapshot.

        Returns its CardMeta and whether it is new (False: the same bytes were already there, e.g. a
        retried add whose answer was lost; nothing changes).
        """
        with self._swap_lock:
            store = self.store
            try:
                meta = store.add_card(model, calibration=self._calibration_images(), reserved=self.reserved_names)
            except Exception:
                self._card_change("add", "rejected")
                raise
            if not store.last_add_was_new:
                self._card_change("add", "already_present")
                return meta, False
            try:
                self._install(self._open(previous=self.current))
            except Exception as exc:  # the store took it but it cannot be served: undo
                store.remove_card(meta.name, meta.version)
                self._card_change("add", "rejected")
                raise CardRejected(f"card {meta.key} was stored but cannot be served ({exc}); removed again") from exc
            self._card_change("add", "ok")
            return meta, True

    def remove_card(self, name: str, version: int | None = None) -> tuple[list[str], str]:
        """Remove a card (one version, or all) and swap in the new snapshot.

        Returns the removed keys and a note when the removal changed the deck's default policy.
        """
        with self._swap_lock:
            try:
                removed = self.store.remove_card(name, version)
            except Exception:
                self._card_change("remove", "rejected")
                raise
            note = self._install(self._open(previous=self.current))
            self._card_change("remove", "ok")
            return removed, note

    def reload_if_changed(self) -> bool:
        """Swap in a new snapshot when the store's manifest version moved (another replica wrote it)."""
        current = self.current
        version = self.store.manifest().version
        if current is not None and version == current.version:
            return False
        with self._swap_lock:
            current = self.current
            if current is not None and self.store.manifest().version == current.version:
                return False
            self._install(self._open(previous=current))
            return True

    # -- inside -------------------------------------------------------------------------------
    def _open(self, previous: Deck | None) -> Deck:
        return Deck.open(
            self.store,
            previous=previous,
            providers=self.providers,
            intra_op_threads=self.intra_op_threads,
            spin=self.spin,
            max_run_rows=self.max_run_rows,
        )

    def _install(self, deck: Deck) -> str:
        """Swap in ``deck``; returns a note when that changed the default policy ("" otherwise)."""
        old = self.current
        self.current = deck  # one reference swap: in-flight requests keep the snapshot they read
        note = ""
        if old is not None:
            self.swaps += 1
            log.info("deck snapshot %d -> %d (%d cards)", old.version, deck.version, len(deck.cards))
            if old.default_policy != deck.default_policy:
                note = f"the default policy changed from {old.default_policy!r} to {deck.default_policy!r}"
                note += f": {deck.policy_note}" if deck.policy_note else ""
                log.warning("deck %s version %d: %s", deck.root, deck.version, note)
        if self.metrics is not None:
            self.metrics.set_deck(deck.version, deck.cards)
            self.metrics.set_default_policy(deck.default_policy, deck.configured_policy)
        for listener in self.listeners:
            listener(deck)
        return note

    def _clean(self) -> None:
        """Sweep the store's debris (at start, then now and then while polling); never fails the server."""
        self._last_clean = time.monotonic()
        try:
            self.store.clean()
        except (OSError, CarddeckError) as exc:  # e.g. a read-only deck: nothing of ours to clean there
            log.warning("deck %s: could not remove debris: %s", self.location, exc)

    def poll(self) -> None:
        """One look at the store: swap in its new version if any; on any failure keep the snapshot, note it."""
        try:
            version = self.store.manifest().version
        except Exception as exc:  # endpoint down, directory gone or unreadable, a torn manifest
            self._failed(exc, reachable=False)
            return
        if self.current is None or version != self.current.version:
            try:
                self.reload_if_changed()
            except Exception as exc:  # e.g. a card file another replica named that cannot be read or run
                self._failed(exc, reachable=True)
                return
        self._synced()
        if time.monotonic() - self._last_clean > self.debris_grace_s:
            self._clean()  # debris from a crash, younger than the grace period at start

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            done = threading.Event()
            threading.Thread(target=self._poll_once, args=(done,), name="carddeck-deck-poll-call", daemon=True).start()
            # a store that accepts connections but never answers (a hung endpoint) must not look healthy:
            # a poll not back in time counts as a failed one, again for every timeout it stays out
            while not done.wait(self.poll_timeout_s):
                if self._stop.is_set():
                    return
                self._failed(TimeoutError(f"no answer from the store in {self.poll_timeout_s:g} s"), reachable=False)

    def _poll_once(self, done: threading.Event) -> None:
        try:
            self.poll()
        finally:
            done.set()

    def _synced(self) -> None:
        self.store_watch.synced(getattr(self.current, "version", "?"))

    def _failed(self, exc: Exception, *, reachable: bool) -> None:
        self.store_watch.failed(exc, reachable=reachable, version=getattr(self.current, "version", "?"))

    def _calibration_images(self) -> np.ndarray | None:
        if not self.calibration_data:
            return None  # the store falls back to the deck's own calibration.npz
        if self._calibration is None:
            from carddeck.data.datasets import load_dataset

            self._calibration = load_dataset(self.calibration_data, "train").images
        return self._calibration

    def _card_change(self, op: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.card_change(op, outcome)


__all__ = ["STORE_KEY", "DeckMetrics", "Snapshots", "StoreState", "StoreWatch"]
