"""Which module paths a user pattern selects: every matching rule lives here (as in PEFT)."""
from __future__ import annotations

import difflib
import re
from typing import Protocol, Sequence, TypeVar

ALL_LINEAR = "all-linear"


class _Pattern(Protocol):
    match: str


Override = TypeVar("Override", bound=_Pattern)


def matches(pattern: str, path: str) -> bool:
    """True if ``pattern`` is the exact path, a dotted suffix of it, or a regex that full-matches it."""
    if pattern == path or path.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, path) is not None
    except re.error:
        return False


def matches_any(patterns: list[str], path: str) -> bool:
    return any(matches(p, path) for p in patterns)


def overrides_for(overrides: Sequence[Override], names: Sequence[str]) -> list[Override]:
    """The overrides whose ``match`` selects any of a layer's names (its path and aliases), in the order
    given: where two set the same field, the later wins."""
    return [o for o in overrides if any(matches(o.match, n) for n in names)]


def closest(pattern: str, paths: list[str], n: int = 3) -> list[str]:
    """The module paths nearest to a pattern that matched nothing, for the error message."""
    tails = {p.rsplit(".", 1)[-1]: p for p in paths}
    near = difflib.get_close_matches(pattern, paths, n=n, cutoff=0.3)
    near += [tails[t] for t in difflib.get_close_matches(pattern, list(tails), n=n, cutoff=0.5)]
    return list(dict.fromkeys(near))[:n] or paths[:n]
