"""Registries at the definition (timm's `@register_model`): models, dataset formats, analyses and report sections.

Each extension registers itself where it is defined (a decorator beside the class or function); whatever lists or
looks them up (create_model, load_dataset, the CLI, the report) reads the registry, so adding one is its module and
its test. A registry finds the modules of its package the first time it is read (`discover`): a new module in the
package registers without an import line anywhere else, and a module outside csn (a test, a user's package)
registers when it is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from csn.errors import CsnError, unknown

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> entries of one kind ('model', 'dataset', ...), filled by `register` where each entry is defined.

    package: the package whose modules are imported (once) before the registry is first read, so that every entry
    defined in it is registered; extra: forms that are valid besides the names (shown in the unknown-name error).
    """

    def __init__(self, kind: str, package: str | None = None, extra: Iterable[str] = ()) -> None:
        self.kind, self.package, self.extra = kind, package, tuple(extra)
        self._entries: dict[str, T] = {}
        self._discovered = package is None

    def register(self, name: str, entry: T) -> T:
        """Add `entry` under `name`; the same entry again is a no-op (a module imported twice), another is an error."""
        old = self._entries.get(name)
        if old is not None and old is not entry and _qualname(old) != _qualname(entry):
            raise CsnError(f"{self.kind} {name!r} is registered twice ({_qualname(old)} and {_qualname(entry)}); "
                           "give one of them another name.")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove `name` (a test's toy entry, when the test ends)."""
        self._entries.pop(name, None)

    def discover(self) -> None:
        """Import every module of the package (once), so that each registers what it defines."""
        if self._discovered:
            return
        self._discovered = True
        pkg = importlib.import_module(self.package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{self.package}."):
            importlib.import_module(info.name)

    def get(self, name: str) -> T:
        """The entry of `name`, or the one-sentence CsnError naming the valid names (closest first)."""
        self.discover()
        if name not in self._entries:
            raise unknown(self.kind, name, self.names() + list(self.extra))
        return self._entries[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self.discover()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """(name, entry) pairs in the order they were registered."""
        self.discover()
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def decorator(self, name: str, wrap: Callable[[T], object] | None = None) -> Callable[[T], T]:
        """`@registry.decorator(name)`: register the decorated object (or `wrap(obj)`) under `name`; returns it."""
        def deco(obj: T) -> T:
            self.register(name, obj if wrap is None else wrap(obj))  # type: ignore[arg-type]
            return obj
        return deco


def _qualname(obj: object) -> str:
    target = getattr(obj, "factory", None) or getattr(obj, "cls", None) or obj
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"


__all__ = ["Registry"]
