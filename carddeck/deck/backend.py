"""Where a deck store's files live, behind one small interface; the backend is chosen by the location.

``DIR`` or ``file://DIR`` is a local directory (:class:`LocalBackend`); ``s3://bucket/prefix`` is an
S3-compatible object store (:class:`carddeck.deck.s3.S3Backend`). Keys are ``/``-separated paths
relative to the deck root (``manifest.json``, ``cards/<name>/<version>/model.onnx``).

The store (:class:`carddeck.deck.store.DeckStore`) writes files first and the manifest last, by
:meth:`Backend.commit`, a write that succeeds only when the manifest is still the one the writer read
(its change stamp): the loser of a race gets :class:`~carddeck.errors.ConcurrentChange`, a DeckConflict.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from carddeck.deck.cardfile import atomic_write
from carddeck.errors import ConcurrentChange


class Backend(Protocol):
    @property
    def root(self) -> Path | str:
        """The location, as the user names it in messages."""
        ...

    @property
    def remote(self) -> bool:
        """Files cost a download: the store keeps a local copy of card files by sha256."""
        ...

    def read(self, key: str) -> bytes:
        """The file's bytes; FileNotFoundError when there is none."""
        ...

    def read_stamped(self, key: str) -> tuple[bytes, str]:
        """The file's bytes and the change stamp of exactly those bytes."""
        ...

    def write(self, key: str, data: bytes) -> None:
        """Readers see the old file or the whole new one, never a part."""
        ...

    def stamp(self, key: str) -> str | None:
        """A cheap change stamp (inode/size/mtime, ETag) of the file; None when there is none."""
        ...

    def commit(self, key: str, data: bytes, expected: str | None) -> None:
        """Write only if the file's stamp is still ``expected`` (None: only if absent); else ConcurrentChange."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Keys of the files under ``prefix`` (a folder)."""
        ...

    def ages(self, prefix: str) -> dict[str, float]:
        """Seconds since each file under ``prefix`` ("" for every file) was last written, by the store's clock."""
        ...

    def delete(self, prefix: str) -> None:
        """Delete the file ``prefix`` or every file under the folder ``prefix``; absent is fine."""
        ...

    def fresh(self, key: str) -> str:
        """A key for a new file that no concurrent writer can also choose (writers that race need it)."""
        ...

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """Serialize writers where the backend can (a local lock file); elsewhere the commit decides."""
        ...


class LocalBackend:
    """A deck directory: atomic renames, and an exclusive ``flock`` on ``ROOT/.lock`` for writers."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def read_stamped(self, key: str) -> tuple[bytes, str]:
        path = self.root / key
        with open(path, "rb") as f:
            return f.read(), _stamp(os.fstat(f.fileno()))

    def write(self, key: str, data: bytes) -> None:
        atomic_write(self.root / key, data)

    def stamp(self, key: str) -> str | None:
        try:
            return _stamp(os.stat(self.root / key))
        except FileNotFoundError:
            return None

    def commit(self, key: str, data: bytes, expected: str | None) -> None:
        current = self.stamp(key)
        if current != expected:
            raise ConcurrentChange(f"{self.root / key} changed since it was read (another writer); nothing was written")
        atomic_write(self.root / key, data)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def ages(self, prefix: str) -> dict[str, float]:
        now = time.time()
        ages = {}
        for key in self.list(prefix):
            with contextlib.suppress(FileNotFoundError):  # removed since it was listed
                ages[key] = now - os.stat(self.root / key).st_mtime
        return ages

    def delete(self, prefix: str) -> None:
        path = self.root / prefix
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def fresh(self, key: str) -> str:
        return key  # writers hold the lock: the plain key is theirs alone

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with open(self.root / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def open_backend(location: Path | str) -> Backend:
    """The backend for ``location``: ``s3://bucket/prefix``, ``file://DIR`` or a plain directory."""
    text = str(location)
    if text.startswith("s3://"):
        from carddeck.deck.s3 import S3Backend

        return S3Backend.from_location(text)
    if text.startswith("file://"):
        return LocalBackend(Path(text[len("file://") :]).expanduser())
    return LocalBackend(Path(location).expanduser())


__all__ = ["Backend", "LocalBackend", "open_backend"]
