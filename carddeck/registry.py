"""Small name -> object registries, so the CLI and config files name methods the same way."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

from carddeck.errors import InvalidInput, shown

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to objects of one kind (datasets, corruptions, policies, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise InvalidInput(
                f"unknown {self.kind} {shown(name)}; valid choices: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)


def plugin_path(path: Iterable[str], package: str) -> list[str]:
    """A package's folders, then its namesakes elsewhere on ``sys.path``: where a one-module method or
    backend (``carddeck/compress/NAME.py``, ``carddeck/deck/backends/NAME.py``) may also live."""
    sub = Path(*package.split("."))
    folders: dict[Path, str] = {}
    for folder in [*path, *(str(Path(p) / sub) for p in sys.path if p)]:
        if Path(folder).is_dir():
            folders.setdefault(Path(folder).resolve(), folder)
    return list(folders.values())
