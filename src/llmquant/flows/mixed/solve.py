"""A budget solved into a per-layer plan: a multiple-choice knapsack.

Choose one candidate c(u) per unit u to minimise the predicted damage sum_u D[u, c(u)] subject to
sum_u B[u, c(u)] <= budget, where B is the exact stored bytes. Solved exactly by dynamic programming over
bytes: best_u(b) = min_c best_{u-1}(b - B[u, c]) + D[u, c]. Byte costs are rounded up to a quantum
(``budget / 200_000`` bytes; 1 byte on small problems), so the plan always fits the budget and is optimal
up to that rounding (at most one quantum per unit). A budget is either an average bits per weight over
the planned layers (``target_bits``) or a total model size (``max_size``: everything stored, including
the norms and whatever the plan does not cover).
"""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import torch.nn as nn

from ...errors import BudgetError
from ...schemes import Plan
from ...schemes.formats import DEFAULT_CANDIDATES, GGUF_CANDIDATES, gguf_bytes, gguf_type, resolve_format
from .sensitivity import Sensitivity, sensitivity

log = logging.getLogger(__name__)
MAX_CELLS = 200_000


def parse_size(s) -> int:
    """Bytes from ``60MB``, ``60 MiB``, ``1.5GB``, ``123456`` (decimal MB = 1e6 bytes, as file sizes are quoted)."""
    if isinstance(s, (int, float)):
        return int(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b?|b)?\s*", str(s), re.I)
    if not m:
        raise BudgetError(f"cannot read size {s!r}; write it like 60MB, 60MiB or 1.5GB")
    unit = (m.group(2) or "b").lower().rstrip("b") or "b"
    mult = {"b": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 1024, "mi": 1024**2, "gi": 1024**3}[unit]
    return int(float(m.group(1)) * mult)


def solve_knapsack(damage, cost, budget: int, quantum: int | None = None) -> list[int]:
    """Indices c(u) minimising sum damage[u][c] with sum cost[u][c] <= budget (exact for quantum 1)."""
    D = np.asarray(damage, dtype=np.float64)
    C = np.asarray(cost, dtype=np.int64)
    n_units = D.shape[0]
    if n_units == 0:
        return []
    if int(C.min(axis=1).sum()) > budget:
        raise BudgetError(f"budget {budget} bytes is below the smallest plan ({int(C.min(axis=1).sum())} bytes)")
    q = quantum or max(1, math.ceil(budget / MAX_CELLS))
    W = -(-C // q)  # round costs up: the plan stays within budget
    cap = int(budget // q)
    best = np.zeros(cap + 1)
    choice = np.zeros((n_units, cap + 1), dtype=np.int16)
    for u in range(n_units):
        new = np.full(cap + 1, np.inf)
        for c in range(D.shape[1]):
            w = int(W[u, c])
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[: cap + 1 - w] + D[u, c]
            better = cand < new
            new[better] = cand[better]
            choice[u, better] = c
        best = new
    if not np.isfinite(best[cap]):  # rounding made it infeasible: fall back to the cheapest plan
        return [int(i) for i in C.argmin(axis=1)]
    out, b = [0] * n_units, cap
    for u in range(n_units - 1, -1, -1):
        c = int(choice[u, b])
        out[u] = c
        b -= int(W[u, c])
    return out


SIZES = ("auto", "folder", "gguf")
_NEVER = 1 << 50  # the cost of a candidate that cannot hold a layer (never fits a budget)


def _sized(sens: Sensitivity, size: str) -> tuple[str, list[list[int]], list[list[float]]]:
    """(what the bytes count, bytes[u][c], damage[u][c]) for budgets counted as ``size``: ``folder`` (the
    bytes an llmquant folder stores, as measured), ``gguf`` (the tensor data of a GGUF file: a candidate
    that no GGUF type holds on a layer's rows gets infinite damage), ``auto`` (``gguf`` when every candidate
    is a GGUF type, else ``folder``). A GGUF type that cannot hold a layer's rows was not measured on it
    (infinite damage) in either case."""
    if size not in SIZES:
        raise BudgetError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    fmts = [resolve_format(c) for c in sens.candidates]
    if size == "auto":
        size = "gguf" if all(gguf_type(f) is not None for f in fmts) else "folder"
    if size == "gguf" and not any(gguf_type(f) is not None for f in fmts):
        raise BudgetError(f"no candidate is a GGUF type ({', '.join(sens.candidates)}); plan for GGUF with "
                          f"GGUF types: {', '.join(GGUF_CANDIDATES)}")
    nbytes, damage, homeless = [], [], []
    for u, row, brow in zip(sens.units, sens.damage, sens.nbytes):
        b = [gguf_bytes(f, *u.shape) for f in fmts] if size == "gguf" else list(brow)
        d = [math.inf if x is None else v for x, v in zip(b, row)]
        if not any(math.isfinite(v) for v in d):
            homeless.append(f"{u.name} (rows of {u.shape[1]})")
        nbytes.append([_NEVER if x is None or not math.isfinite(v) else x for x, v in zip(b, d)])
        damage.append(d)
    if homeless:
        raise BudgetError(f"no candidate {'GGUF type ' if size == 'gguf' else ''}holds {', '.join(homeless[:4])}"
                          f"{' ...' if len(homeless) > 4 else ''}: k-quants need widths that are multiples of 256; "
                          "add a 32-value type (gguf:Q8_0, gguf:Q4_0 ...), a preset such as W4G32, or fp16")
    return size, nbytes, damage


def plan_from_sensitivity(sens: Sensitivity, *, target_bits: float | None = None, max_size=None,
                          method: str | None = None, size: str = "auto") -> Plan:
    """The plan of least predicted damage within the budget (exactly one of ``target_bits``, ``max_size``).

    ``method``: how the plan's integer formats are made (None: as the sensitivity measured them, i.e. GPTQ
    with its knobs for a ``quantizer="gptq"`` sensitivity, AWQ for ``"awq"``, QAT with its
    :class:`~llmquant.schemes.QATParams` for ``"qat"``, else RTN).

    ``size`` says what the budget's bytes are (see :func:`_sized`): with GGUF candidates
    (:data:`~llmquant.schemes.GGUF_CANDIDATES`) the default counts the GGUF file's tensor bytes, and each
    layer only takes types whose blocks fit its rows (the k-quants: widths that are multiples of 256)."""
    if (target_bits is None) == (max_size is None):
        raise BudgetError("give exactly one budget: target_bits (average bits per weight) or max_size (e.g. '60MB')")
    size, sizes, damages = _sized(sens, size)
    nweights = sum(u.numel for u in sens.units)
    cheapest = sum(min(r) for r in sizes)
    dearest = sum(max(x for x in r if x < _NEVER) for r in sizes)
    if target_bits is not None:
        if not 0 < target_bits <= 32:
            raise BudgetError(f"target bits {target_bits} is outside (0, 32]: 32 is the float size; ask for fewer bits")
        budget = int(target_bits * nweights / 8)
        if budget < cheapest:
            raise BudgetError(f"target of {target_bits} bits/weight is below the smallest candidate plan "
                              f"({8 * cheapest / nweights:.3f} bits/weight); raise it or add a smaller candidate")
        what = f"{target_bits} bits/weight over {len(sens.units)} layers"
    else:
        total = parse_size(max_size)
        if total > sens.fp32_bytes:
            raise BudgetError(f"max size {total / 1e6:.1f} MB is above the model's fp32 size ({sens.fp32_bytes / 1e6:.1f} MB): "
                              "nothing needs quantizing; ask for less")
        budget = total - sens.fixed_bytes
        if budget < cheapest:
            raise BudgetError(f"max size {total / 1e6:.2f} MB is below the smallest candidate plan "
                              f"({(cheapest + sens.fixed_bytes) / 1e6:.2f} MB including {sens.fixed_bytes / 1e6:.2f} MB "
                              "the plan does not cover); raise it, add a smaller candidate, or plan the embeddings too (include_head)")
        what = f"{total / 1e6:.2f} MB total"
    if size == "gguf":
        what += " (GGUF tensor bytes)"
    if budget >= dearest:
        log.info("the budget holds every layer at its largest candidate")
    pick = solve_knapsack(damages, sizes, budget)
    layers: dict[str, str] = {}
    for u, c in zip(sens.units, pick):
        for m in u.modules:
            layers[m] = sens.candidates[c]
    nbytes = sum(sizes[i][c] for i, c in enumerate(pick))
    counts: dict[str, int] = {}
    for c in pick:
        counts[sens.candidates[c]] = counts.get(sens.candidates[c], 0) + 1
    info = {
        "budget": what,
        "solver": "multiple-choice knapsack, exact DP over bytes",
        "sensitivity": {"method": sens.method, "key": sens.key, "tokens": sens.tokens},
        "predicted_kl": float(sum(damages[i][c] for i, c in enumerate(pick))),
        "bytes": "GGUF tensor data" if size == "gguf" else "llmquant folder",
        "bits_per_weight": 8 * nbytes / nweights,
        "planned_bytes": nbytes,
        "total_bytes": nbytes + sens.fixed_bytes,
        "formats": counts,
    }
    made = sens.extra.get("settings", {}).get("quantizer") or {"name": "rtn", "params": None}
    if method is None:
        method, params = made["name"], made["params"]
    else:
        params = made["params"] if method == made["name"] else None
    info["sensitivity"]["quantizer"] = made["name"]
    return Plan.from_layers(layers, method=method, params=params, info=info)


def plan_mixed_precision(
    model: nn.Module,
    *,
    target_bits: float | None = None,
    max_size=None,
    text=None,
    candidates=DEFAULT_CANDIDATES,
    method: str = "fisher",
    include_head: bool = False,
    sensitivity_result: Sensitivity | None = None,
    size: str = "auto",
    **sens_kw,
) -> Plan:
    """Measure (or reuse, from the disk cache) per-layer sensitivity and solve the budget into a plan.

    ``include_head`` plans the output head and embedding too (needed for total-size budgets that should
    count them at low precision). ``candidates=GGUF_CANDIDATES`` plans llama.cpp types for a GGUF file,
    the budget counted in GGUF bytes (``size``, see :func:`plan_from_sensitivity`). Apply the plan with
    ``llmquant.quantize(model, plan)``."""
    sens = sensitivity_result or sensitivity(model, text, candidates, method=method, include_head=include_head, **sens_kw)
    return plan_from_sensitivity(sens, target_bits=target_bits, max_size=max_size, size=size)
