"""Pick modules by exact name or ``re:`` regex (full match), and swap modules in place."""

from __future__ import annotations

import re
from typing import Iterable

import torch.nn as nn

from ..errors import SelectionError


def matches(name: str, patterns: Iterable[str]) -> bool:
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif p == name:
            return True
    return False


def _check_patterns(patterns: Iterable[str]) -> None:
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise SelectionError(f"bad regex {p!r}: {e}") from None


def select_linears(
    model: nn.Module,
    targets: Iterable[str] = (),
    ignore: Iterable[str] = ("lm_head",),
    types: tuple[type, ...] = (nn.Linear,),
) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module of ``types`` chosen by ``targets`` (all when empty) and not ``ignore``d.

    Exact names in ``targets`` that name no module raise :class:`SelectionError`, as does a selection that
    matches nothing: a silent no-op quantization is never what a user wants.
    """
    targets, ignore = tuple(targets), tuple(ignore)
    _check_patterns(targets + ignore)
    names = {n for n, _ in model.named_modules()}
    missing = [t for t in targets if not t.startswith("re:") and t not in names]
    if missing:
        raise SelectionError(f"targets name modules that do not exist: {missing}")
    chosen = []
    for name, mod in model.named_modules():
        if not isinstance(mod, types):
            continue
        if targets and not matches(name, targets):
            continue
        if matches(name, ignore):
            continue
        chosen.append((name, mod))
    if not chosen:
        raise SelectionError(
            f"no {'/'.join(t.__name__ for t in types)} module matches targets={list(targets) or 'all'} "
            f"ignore={list(ignore)}"
        )
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
