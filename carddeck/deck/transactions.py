"""Changes to a deck, each one transaction: read the manifest, write files, commit the manifest last.

Every file is written whole; the manifest is written last, by a conditional commit that fails with
DeckConflict if another writer committed since this one read it, so a crash or a lost race at any
point leaves the previous manifest, which names only complete files. Where the backend has a lock
(a directory: ``flock`` on ``ROOT/.lock``), writers take it; readers never lock. ``manifest()`` re-reads
the manifest only when its change stamp (inode/size/mtime, ETag) moved, so replicas can poll the
version cheaply. What a change leaves behind is the backend's debris rule's (:mod:`carddeck.deck.debris`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from carddeck.deck.backend import open_backend
from carddeck.deck.manifest import MANIFEST, Manifest, encode
from carddeck.errors import CarddeckError, InvalidInput, ReadOnlyDeck

log = logging.getLogger("carddeck.deck.store")

READ_ONLY = "READ-ONLY"  # marker file: the deck is shipped (in the package, in the repository), never changed
DEBRIS_GRACE_S = 60.0  # replicas poll every few seconds and load a deck in seconds: ample margin


class Transactions:
    """A deck's manifest, read by its change stamp, and changed one transaction at a time."""

    def __init__(self, root: Path | str, *, debris_grace_s: float = DEBRIS_GRACE_S) -> None:
        self.backend = open_backend(root)
        self.root = self.backend.root
        self.debris_grace_s = debris_grace_s
        if self.backend.stamp(MANIFEST) is None:
            raise InvalidInput(
                f"{self.root} is not a deck: no {MANIFEST} (make one with `carddeck deck init DIR`, "
                "or `DeckStore.create(root)` in Python)"
            )
        self._cache: tuple[str, Manifest] | None = None
        self._change = threading.local()  # the change in progress in this thread: its base stamp, its files
        self.debris = self.backend.debris(debris_grace_s)

    def manifest(self) -> Manifest:
        return self._stamped_manifest()[1]

    def _stamped_manifest(self) -> tuple[str, Manifest]:
        stamp = self.backend.stamp(MANIFEST)
        if stamp is None:
            raise InvalidInput(f"{self.root} is not a deck: no {MANIFEST}")
        cached = self._cache
        if cached is not None and cached[0] == stamp:
            return cached
        source = f"{self.root}/{MANIFEST}"
        try:
            raw, stamp = self.backend.read_stamped(MANIFEST)
            data = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"{source}: unreadable manifest ({exc})") from None
        manifest = Manifest.from_dict(data, source)
        self._cache = (stamp, manifest)
        return stamp, manifest

    @property
    def version(self) -> int:
        return self.manifest().version

    @property
    def read_only(self) -> bool:
        return self.backend.stamp(READ_ONLY) is not None

    def check_writable(self) -> None:
        """ReadOnlyDeck (naming the way out) when the deck may not be changed."""
        if self.read_only:
            raise ReadOnlyDeck(
                f"the deck {self.root} is read-only (it holds the {READ_ONLY} marker of the packaged default deck, "
                "which a plain copy keeps): make a copy you can change with `carddeck deck init DIR` and serve that "
                "with `carddeck serve --deck DIR`"
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[Manifest]:
        """One change: the manifest it starts from; files it writes go to the debris rule if it does not commit."""
        self.check_writable()
        change = self._change
        with self.backend.lock():
            self._cache = None
            change.base, manifest = self._stamped_manifest()
            change.written = []
            try:
                yield manifest
            except BaseException:
                self.debris.abandon(change.written)
                raise
            finally:
                change.base, change.written = None, []

    def _write(self, key: str, data: bytes) -> None:
        self._change.written.append(key)
        self.backend.write(key, data)

    def _commit(self, manifest: Manifest) -> Manifest:
        """Write the manifest, if it is still the one :meth:`_locked` read (else DeckConflict)."""
        base = getattr(self._change, "base", None)
        assert base is not None, "commit outside _locked"
        self.backend.commit(MANIFEST, encode(manifest), expected=base)
        self._cache = None
        log.info("deck %s: version %d (%d cards)", self.root, manifest.version, len(manifest.cards))
        try:
            self.debris.sweep(manifest)
        except (OSError, CarddeckError) as exc:  # the change is committed; debris waits for the next sweep
            log.warning("deck %s: could not remove debris: %s", self.root, exc)
        return manifest

    def clean(self) -> list[str]:
        """Remove debris (see :mod:`carddeck.deck.debris`); returns what was removed, relative to the root.

        A read-only deck is never written to.
        """
        if self.read_only:
            return []
        return self.debris.clean(self)


__all__ = ["DEBRIS_GRACE_S", "READ_ONLY", "Transactions"]
