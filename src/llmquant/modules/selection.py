"""Pick modules by exact name or ``re:`` regex (full match, :mod:`llmquant.schemes.names`), and swap
modules in place."""

from __future__ import annotations

import re
from typing import Iterable

import torch.nn as nn

from ..errors import SelectionError, UnsupportedModelError
from ..models import fused_expert_params, is_linear
from ..schemes.names import check_patterns as _check_patterns
from ..schemes.names import matches


def _split(targets) -> tuple[tuple[type, ...], tuple[str, ...]]:
    types, names = [], []
    for t in targets:
        if isinstance(t, type):
            types.append(t)
        elif isinstance(t, str):
            names.append(t)
        else:
            raise SelectionError(f"targets hold module types, names or 're:' patterns, not {type(t).__name__}")
    return tuple(types), tuple(names)


def select_linears(
    model: nn.Module,
    targets: Iterable = (),
    ignore: Iterable[str] = ("lm_head",),
    types: tuple[type, ...] = (nn.Linear,),
) -> list[tuple[str, nn.Module]]:
    """(name, module) of the modules chosen by ``targets`` and not ``ignore``d, in model order.

    ``targets`` holds exact names and ``re:`` patterns (full match), which select modules of ``types``,
    and may hold module classes too (``{nn.Linear, "re:.*lstm.*"}``, as ``torch.ao``'s dynamic
    quantization takes them), which select every module of that class; empty: every module of ``types``.
    Exact names that name no module raise :class:`SelectionError`, as does a selection that matches
    nothing: a silent no-op quantization is never what a user wants.
    """
    from .experts import fused_experts, unfuse_experts

    experts = fused_experts(model)
    if experts:  # mixture-of-experts weights kept fused: one linear per expert instead (the same function)
        if any(p.is_meta for n in experts for p in model.get_submodule(n).parameters()):
            raise UnsupportedModelError(f"{type(model).__name__} is a mixture-of-experts model read layer by layer "
                                        "(stream=True / --stream); its fused experts need the model loaded whole")
        unfuse_experts(model, experts)
    by_type, targets = _split(tuple(targets))
    ignore = tuple(ignore) + _float_by_default(model, targets)
    _check_patterns(targets + ignore)
    names = {n for n, _ in model.named_modules()}
    missing = [t for t in targets if not t.startswith("re:") and t not in names]
    if missing:
        raise SelectionError(f"targets name modules that do not exist: {missing}")
    chosen = []
    for name, mod in list(model.named_modules()):
        if matches(name, ignore):
            continue
        conv1d = is_linear(mod) and not isinstance(mod, nn.Linear) and not mod.weight.is_meta
        if conv1d:  # GPT-2's Conv1D (weight in x out): chosen, it becomes the nn.Linear computing the same
            mod = _as_linear(mod)
        # a module standing in for a linear (a streamed model's head kept in the checkpoint's dtype) counts as one
        linear = isinstance(mod, types) or (nn.Linear in types and getattr(mod, "stands_for_linear", False))
        if (by_type and isinstance(mod, by_type)) or (linear and (matches(name, targets) if targets else not by_type)):
            if conv1d:
                replace_module(model, name, mod)
            chosen.append((name, mod))
    if not chosen:
        kinds = "/".join(t.__name__ for t in (by_type or types))
        raise SelectionError(f"no {kinds} module matches targets={list(targets) or 'all'} ignore={list(ignore)}")
    fused = fused_expert_params(model)
    if fused and not targets:
        raise UnsupportedModelError(
            f"{type(model).__name__} keeps its mixture-of-experts weights as fused 3-D parameters ({fused[0]}, ... "
            f"{len(fused)} in all), which llmquant cannot quantize: quantizing every linear would leave the experts, "
            "most of the model, in float. To quantize the other linears only (attention, shared experts), name "
            "them: targets=['re:.*self_attn.*'] (or --targets)")
    return chosen


def _as_linear(conv1d: nn.Module) -> nn.Linear:
    """GPT-2's ``Conv1D`` (``y = x @ W + b``, W stored in x out) as the ``nn.Linear`` computing the same."""
    w = conv1d.weight
    lin = nn.Linear(w.shape[0], w.shape[1], bias=conv1d.bias is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    if conv1d.bias is not None:
        lin.bias = conv1d.bias
    return lin


def _float_by_default(model: nn.Module, targets) -> tuple[str, ...]:
    """Patterns of the linears the model's family keeps in float unless targets name them (MoE routers)."""
    from ..models import arch_for

    arch = arch_for(model)
    if arch is None or not arch.float_modules or targets:
        return ()
    return tuple(rf"re:{re.escape(arch.layers)}\.\d+\.{re.escape(m)}" for m in arch.float_modules)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
