"""User-facing errors: one sentence that names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CsnError(Exception):
    """An error caused by the user's input; the CLI prints its message and exits with status 2."""


def closest(name: str, choices: Iterable[str], n: int = 1) -> list[str]:
    """Return up to n valid names closest to `name` (for 'did you mean' hints)."""
    return difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=0.0)


def unknown(kind: str, name: str, choices: Iterable[str]) -> CsnError:
    """Build the standard 'unknown X' error listing valid names, closest first."""
    choices = sorted(set(str(c) for c in choices))
    near = closest(name, choices, n=1)
    hint = f" (closest: {near[0]!r})" if near else ""
    return CsnError(f"unknown {kind} {name!r}{hint}; valid {kind}s are: {', '.join(choices)}.")
