"""A local copy of remote deck files, keyed by their sha256: a restart or a new snapshot downloads only what changed.

The key is the digest the manifest records, so an entry can never be stale; an entry whose bytes do
not hash to its name (a torn or tampered file) is dropped and fetched again. The folder is
``CARDDECK_CACHE_DIR``, else ``$XDG_CACHE_HOME/carddeck/files`` (``~/.cache/carddeck/files``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

from carddeck.deck.cardfile import atomic_write

_DIGEST = re.compile(r"[0-9a-f]{64}")


def default_cache_dir() -> Path:
    if os.environ.get("CARDDECK_CACHE_DIR"):
        return Path(os.environ["CARDDECK_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "carddeck" / "files"


class FileCache:
    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder or default_cache_dir()

    def _path(self, digest: str) -> Path | None:
        return self.folder / digest[:2] / digest if _DIGEST.fullmatch(digest) else None

    def get(self, digest: str) -> bytes | None:
        path = self._path(digest)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return data

    def put(self, digest: str, data: bytes) -> None:
        """Keep ``data`` (already checked against ``digest``); a full or read-only disk only costs a download."""
        path = self._path(digest)
        if path is not None:
            with contextlib.suppress(OSError):
                atomic_write(path, data)


__all__ = ["FileCache", "default_cache_dir"]
