"""bf16 / fp16 on a float model: compute under ``torch.autocast``, and half-precision weight storage.

``autocast("bf16")`` is ``torch.autocast(device, dtype)``: matmuls (linear, bmm, sdpa) run in the low
precision while the ops autocast keeps in fp32 stay there; on top of that the models llmquant knows upcast
their norms to fp32 themselves (Llama's RMSNorm computes in fp32), eager attention takes its softmax in
fp32, and :func:`llmquant.evaluate` takes log-softmax and KL of fp32 logits, so norms, softmax and the
loss stay fp32. ``to_half(model, "bf16")`` stores every Linear and the embeddings in bf16 (norms and
other small vectors stay fp32) through a plan, so it saves and loads like any plan.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ...errors import SchemeError
from ...schemes import FloatFormat, Plan, resolve_format

_DT = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in (torch.bfloat16, torch.float16):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DT:
        return _DT[dtype.lower()]
    raise SchemeError(f"autocast dtype must be bf16 or fp16, got {dtype!r}")


def fp16_autocast_supported(device: str = "cpu") -> bool:
    """Whether ``torch.autocast(device, float16)`` runs a linear here."""
    try:
        with torch.autocast(device, dtype=torch.float16):
            y = torch.nn.functional.linear(torch.ones(2, 4, device=device), torch.ones(3, 4, device=device))
        return y.dtype == torch.float16
    except (RuntimeError, AssertionError):
        return False


@contextlib.contextmanager
def autocast(dtype="bf16", device: str | torch.device = "cpu"):
    """Run a float model's forward in bf16/fp16 matmuls: ``with llmquant.autocast("bf16"): model(ids)``."""
    dt = _dtype(dtype)
    dev = torch.device(device).type
    if dt == torch.float16 and not fp16_autocast_supported(dev):
        raise SchemeError(f"this torch cannot autocast to float16 on {dev}; use bf16")
    with torch.autocast(dev, dtype=dt):
        yield


def half_plan(model: nn.Module, dtype="bf16", *, embeddings: bool = True) -> Plan:
    """A plan storing every Linear (and, with ``embeddings``, the embedding and head) in bf16/fp16."""
    from ..heads import head_names

    fmt = resolve_format("bf16" if _dtype(dtype) == torch.bfloat16 else "fp16")
    assert isinstance(fmt, FloatFormat)
    layers = {n: fmt.name for n in head_names(model)} if embeddings else {}
    layers["re:.*"] = fmt.name
    return Plan.from_layers(layers, info={"what": f"all weights in {fmt.name}, norms fp32"})


def to_half(model: nn.Module, dtype="bf16", *, embeddings: bool = True, progress: bool = False):
    """Store the model's weights in bf16/fp16 (norms stay fp32), in place; returns the apply summary."""
    from .apply import apply_plan

    return apply_plan(model, half_plan(model, dtype, embeddings=embeddings), progress=progress)
