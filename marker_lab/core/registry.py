"""Registries: one per extension point (engines, coupling kinds, second-stage formats, metrics, judges).

    ENGINES = Registry("eval.engine.name", "engine")
    ENGINES.add("hf", EngineKind(...))
    ENGINES.get(cfg.eval.engine.name)   # ConfigError naming the key and the known names for an unknown one

A choice between kinds is a lookup here, never an if-chain at the place that uses it: adding a kind means adding
an entry, and every place that dispatches on that key reads the same entry (tests/test_registries.py walks the
code for comparisons against registered names).
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

from marker_lab.core.errors import ConfigError

T = TypeVar("T")


def load_object(path: str) -> Callable:
    """The object a "module:name" path names, imported now (an entry whose code needs torch names it this way, so
    that reading the registry does not import it)."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


class Registry(Generic[T]):
    """Named entries of one kind, looked up by the value of one config key."""

    def __init__(self, key: str, what: str):
        self.key = key  # the config key whose value names an entry, for error lines
        self.what = what  # what an entry is, in words ("engine", "coupling kind")
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register `entry` under `name`; a name registered twice is a bug, not an override."""
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name) -> T:
        """The entry for `name` (an enum choice is looked up by its value); ConfigError if none is registered."""
        name = getattr(name, "value", name)
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"{self.key}={name!r}: no such {self.what} (known: {', '.join(self._entries)})") \
                from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return getattr(name, "value", name) in self._entries

    def __iter__(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())
