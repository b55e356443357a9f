"""Debris: files of a deck that no manifest names. Each backend says which of two ways suits it.

* :class:`MarkedDebris`, a directory whose writers hold a lock: a sweep (under the lock, so no writer is
  mid-write) removes temporary files and the card directories of interrupted adds at once, and the
  directories of removed cards (marked ``.removed``) and superseded gate files once unnamed for the
  grace period, since a replica that read the previous manifest may still be loading them.
* :class:`AgedDebris`, an object store with no lock across machines: a failed writer deletes its own
  files, a removed card's objects go at once after the commit, and age decides the rest (a writer
  commits within seconds of writing its files, under fresh keys): unnamed objects older than the grace
  period, by the store's clock, are a killed writer's; younger ones may be a live writer's and stay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from carddeck.deck.manifest import Manifest, named

if TYPE_CHECKING:
    from carddeck.deck.backend import Backend
    from carddeck.deck.transactions import Transactions

log = logging.getLogger(__name__)

REMOVED_MARK = ".removed"  # in a removed card's directory: kept for the grace period, from the mark's time


class Debris(Protocol):
    """What a change tells its backend's debris rule, and the sweep."""

    def abandon(self, keys: Iterable[str]) -> None:
        """A change that did not commit wrote these files."""

    def retire(self, path: str) -> None:
        """Before the commit: the card folder ``path`` is no longer named from this change on."""

    def retired(self, paths: Iterable[str]) -> None:
        """After the commit: the card folders ``paths`` are no longer named."""

    def revive(self, path: str) -> None:
        """The card folder ``path`` is written again (a removed key comes back)."""

    def supersede(self, key: str) -> None:
        """The gate file ``key`` is replaced by this change."""

    def sweep(self, manifest: Manifest) -> list[str]:
        """Remove what may go now, given the committed ``manifest``; what was removed, relative to the root."""
        ...

    def clean(self, store: Transactions) -> list[str]:
        """:meth:`sweep` outside a change (``carddeck deck`` and the server's poller call it)."""
        ...


class MarkedDebris:
    """A deck directory: marks and modification times, swept under the writers' lock."""

    def __init__(self, root: Path, grace_s: float) -> None:
        self.root = root
        self.grace_s = grace_s

    def abandon(self, keys: Iterable[str]) -> None:
        pass  # the lock kept other writers out: the next sweep takes what was written, as unnamed

    def retire(self, path: str) -> None:
        with contextlib.suppress(OSError):  # kept for the grace period, counted from now
            (self.root / path / REMOVED_MARK).touch()

    def retired(self, paths: Iterable[str]) -> None:
        pass  # marked before the commit, swept after the grace period

    def revive(self, path: str) -> None:
        (self.root / path / REMOVED_MARK).unlink(missing_ok=True)  # back within the grace period: not removed

    def supersede(self, key: str) -> None:
        with contextlib.suppress(OSError):  # kept for the grace period, counted from now
            os.utime(self.root / key)

    def pending(self, manifest: Manifest) -> list[Path]:
        """What :meth:`sweep` removes now, given ``manifest``."""
        root = self.root
        names = named(manifest)
        cutoff = time.time() - self.grace_s

        def unnamed(path: Path) -> bool:
            return path.relative_to(root).as_posix() not in names

        def expired(path: Path) -> bool:
            with contextlib.suppress(FileNotFoundError):
                return path.stat().st_mtime < cutoff
            return True

        tmp = [*root.glob(".*.tmp"), *root.glob("cards/*/*/.*.tmp"), *root.glob("gate/.*.tmp")]
        cards = [
            d
            for d in root.glob("cards/*/*")
            if d.is_dir() and unnamed(d) and (not (d / REMOVED_MARK).exists() or expired(d / REMOVED_MARK))
        ]
        routers = [r for r in root.glob("gate/*-*.npz") if unnamed(r) and expired(r)]  # routers, shift detectors
        return tmp + cards + routers

    def sweep(self, manifest: Manifest) -> list[str]:
        """Under the lock (no writer is mid-write): remove the debris, then card-name directories left empty."""
        removed = self.pending(manifest)
        root = self.root
        for path in removed:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        for name_dir in root.glob("cards/*"):
            if name_dir.is_dir() and not any(name_dir.iterdir()):
                name_dir.rmdir()
        names = sorted(p.relative_to(root).as_posix() for p in removed)
        if names:
            log.info("deck %s: removed debris %s", root, ", ".join(names))
        return names

    def clean(self, store: Transactions) -> list[str]:
        """Takes the lock only when there is debris: a clean deck is not written to."""
        if not self.pending(store.manifest()):
            return []
        with store._locked() as m:
            return self.sweep(m)


class AgedDebris:
    """An object store: writers delete their own leftovers; age decides what a killed writer left."""

    def __init__(self, backend: Backend, grace_s: float) -> None:
        self.backend = backend
        self.grace_s = grace_s

    def abandon(self, keys: Iterable[str]) -> None:
        for key in keys:  # fresh keys: nobody else's files
            with contextlib.suppress(Exception):
                self.backend.delete(key)

    def retire(self, path: str) -> None:
        pass  # deleted once the commit names them no more (:meth:`retired`)

    def retired(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.backend.delete(path)

    def revive(self, path: str) -> None:
        pass  # fresh keys: a card written again never meets its old objects

    def supersede(self, key: str) -> None:
        pass  # swept by age

    def orphans(self, manifest: Manifest) -> list[str]:
        """Objects that no manifest names and no live writer can still commit (killed writers')."""
        names = named(manifest)

        def ours(key: str) -> bool:  # only what a writer puts there: cards, fitted gate files, calibration
            return key.startswith(("cards/", "gate/")) or (key.startswith("calibration") and "/" not in key)

        def unnamed(key: str) -> bool:
            parts = key.split("/")
            return not any("/".join(parts[:i]) in names for i in range(1, len(parts) + 1))

        ages = self.backend.ages("")
        return sorted(k for k, age in ages.items() if ours(k) and unnamed(k) and age > self.grace_s)

    def sweep(self, manifest: Manifest) -> list[str]:
        orphans = self.orphans(manifest)
        for key in orphans:
            self.backend.delete(key)
        if orphans:
            log.info(
                "deck %s: removed objects no manifest names (killed writers): %s", self.backend.root, ", ".join(orphans)
            )
        return orphans

    def clean(self, store: Transactions) -> list[str]:
        return self.sweep(store.manifest())  # no lock to take: the sweep itself is all


__all__ = ["REMOVED_MARK", "AgedDebris", "Debris", "MarkedDebris"]
