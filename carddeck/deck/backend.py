"""Where a deck store's files live, behind one small interface; the backend is chosen by the location.

A location ``SCHEME://...`` is opened by the module :mod:`carddeck.deck.backends`.SCHEME (its ``BACKEND``
class's ``from_location``), found when first named: a new backend is one module there and nothing
else. A plain ``DIR`` is ``file://DIR`` (:mod:`carddeck.deck.backends.file`); ``s3://bucket/prefix`` is an
S3-compatible object store (:mod:`carddeck.deck.backends.s3`). Keys are ``/``-separated paths
relative to the deck root (``manifest.json``, ``cards/<name>/<version>/model.onnx``).

The store (:class:`carddeck.deck.store.DeckStore`) writes files first and the manifest last, by
:meth:`Backend.commit`, a write that succeeds only when the manifest is still the one the writer read
(its change stamp): the loser of a race gets :class:`~carddeck.errors.ConcurrentChange`, a DeckConflict.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import re
from pathlib import Path
from typing import Protocol

from carddeck.deck import backends
from carddeck.deck.debris import Debris
from carddeck.errors import InvalidInput


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

    def debris(self, grace_s: float) -> Debris:
        """How files that no manifest names are found and removed here (:mod:`carddeck.deck.debris`)."""
        ...


SCHEME = re.compile(r"([a-z][a-z0-9+.-]*)://")


def schemes() -> list[str]:
    """The schemes of the backend modules there are (each module is named for its scheme)."""
    return sorted(m.name for m in pkgutil.iter_modules(backends.__path__) if not m.name.startswith("_"))


def open_backend(location: Path | str) -> Backend:
    """The backend for ``location``: ``SCHEME://...`` by the module of that name, a plain path as ``file://``."""
    text = str(location)
    match = SCHEME.match(text)
    scheme = match.group(1) if match else "file"
    try:
        module = importlib.import_module(f"{backends.__name__}.{scheme}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{backends.__name__}.{scheme}":
            raise  # the backend's own dependency is missing: say that, not "unknown scheme"
        raise InvalidInput(
            f"deck location {text!r}: no backend for {scheme}://; known: "
            + ", ".join(f"{s}://" for s in schemes())
            + " (or a directory)"
        ) from None
    backend: Backend = module.BACKEND.from_location(text if match else f"file://{text}")
    return backend


__all__ = ["Backend", "open_backend", "schemes"]
