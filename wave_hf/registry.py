"""One registry contract for every family of methods (initialization baselines, merge methods).

A method declares its name, its options and its entry point in the file that implements it (the mergekit /
timm pattern); callers look methods up here and never special-case a name. Unknown names and unknown
options fail with the accepted ones listed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one kind, in registration order; a read-only mapping for callers."""

    def __init__(self, kind: str, options: Callable[[T], Iterable[str]]):
        self.kind = kind
        self._options = options
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: add the decorated function or class under ``name`` (once)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{self.kind} names must be identifiers, got {name!r}")

        def deco(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return deco

    def __getitem__(self, name: str) -> T:
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered methods: {sorted(self._entries)}")
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def options(self, name: str) -> tuple[str, ...]:
        """The option names that ``name`` accepts."""
        return tuple(self._options(self[name]))

    def check_options(self, name: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` unchanged if every key is an option of ``name``; a typo must not fall back to a default."""
        accepted = self.options(name)
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            raise TypeError(f"{self.kind} {name!r} got unknown options {unknown}; accepted: {sorted(accepted)}")
        return dict(given)
