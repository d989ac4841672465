"""How a config, a plan or a CLI flag names modules: an exact module name, or ``re:`` and a regular
expression that must match the whole name. The one selection dialect (:mod:`llmquant.modules.selection`
picks modules with it, :class:`~llmquant.schemes.Plan` maps them to formats)."""

from __future__ import annotations

import re
from typing import Iterable

from ..errors import SelectionError


def matches(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` is one of ``patterns`` or fully matches one of their ``re:`` regexes."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif p == name:
            return True
    return False


def check_patterns(patterns: Iterable[str], what: str = "") -> None:
    """Raise :class:`SelectionError` for a ``re:`` pattern that is not a valid regex."""
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise SelectionError(f"bad regex {p!r}{what}: {e}") from None
