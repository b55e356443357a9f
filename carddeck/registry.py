"""Small name -> object registries, so the CLI and config files name methods the same way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
