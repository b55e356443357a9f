"""A deck in a local directory (``DIR`` or ``file://DIR``): atomic renames and a lock file for writers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from carddeck.deck.cardfile import atomic_write
from carddeck.deck.debris import MarkedDebris
from carddeck.errors import ConcurrentChange


class LocalBackend:
    """A deck directory: atomic renames, and an exclusive ``flock`` on ``ROOT/.lock`` for writers."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_location(cls, location: str) -> LocalBackend:
        return cls(Path(location.removeprefix("file://")).expanduser())

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

    def debris(self, grace_s: float) -> MarkedDebris:
        return MarkedDebris(self.root, grace_s)

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


BACKEND = LocalBackend

__all__ = ["BACKEND", "LocalBackend"]
