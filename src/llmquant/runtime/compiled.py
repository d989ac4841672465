"""The lean runtime's compiled decode step: one new token of each sequence of a batch through the whole decoder
in C++ (``kernels/csrc/decode_step.cpp``), with no Python between the operations.

:class:`~llmquant.runtime.LeanModel` builds it on its first eligible call (one token per sequence, fewer than
:data:`MAX_BATCH` sequences, fp32 on CPU, no autocast) and uses it from then on; a left-padded batch passes
each row's RoPE position and its key mask. The rows go through each linear together, as the Python step's
do. ``LLMQUANT_COMPILED_DECODE=0`` (or ``LeanModel(model, compiled=False)``) keeps every step in Python. Each linear group (q/k/v, o, gate/up, down,
the head) becomes a ``LinearSpec``, chosen to compute what the Python path computes:

- the kernel's own C++ on its prepared tensors where the kernel has a native spec
  (:meth:`~llmquant.kernels.Kernel.native_spec`: ``packed_avx2``, ``packed_q8act``), fused exactly when the
  Python path fuses the group;
- ``at::linear`` for an fp32 float weight (``nn.Linear``, ``FloatLinear`` stored in fp32);
- otherwise the Python path's own callable for that linear or group (every other kernel and format keeps
  working; the step then holds the GIL).

Numerics: the linears are the Python path's; norms, RoPE and attention are computed in fp32 by hand-written
loops that differ from ATen's only in summation order, the MLP activation by ATen's function. The logits
differ from the Python step's by that order as the kernels carry it: about 1e-6 of the largest logit for
float linears; ``packed_avx2`` rounds activations to int16, so a 1e-7 difference can move a value by an int16
step (4e-4 of the largest logit on the default model, same greedy tokens); ``packed_q8act`` rounds them to
int8 (a code step is 1/127 of a block's largest value): a few %, and greedy runs may part after a while
(``benchmarks/check_compiled_decode.py``).

When the extension is unavailable, or the model has something the step does not handle (bf16/fp16 compute,
a non-CPU device), :func:`build` returns None and says why in a debug log; the Python path runs.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..kernels import native
from ..kernels.packed_cpu import LARGE_M
from ..modules import QuantLinear
from ..modules.float_modules import FloatLinear

if TYPE_CHECKING:  # pragma: no cover
    from .lean import LeanModel

log = logging.getLogger(__name__)

#: Environment switch: "0" keeps every decode step in Python.
ENV = "LLMQUANT_COMPILED_DECODE"

#: Batches from this many rows are a prefill to the packed kernels (another GEMM): the Python step runs them.
MAX_BATCH = LARGE_M

#: The lean runtime's activation names -> the step's.
ACTS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
        "relu": "relu"}


def enabled_by_env() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _one_spec(ext, mod: nn.Module, fn, device: torch.device, dtype: torch.dtype):
    """One linear's spec; ``fn`` is the Python path's callable for it (the fallback)."""
    if isinstance(mod, QuantLinear):
        spec = QuantLinear.native_spec([mod], device, dtype)
        if spec is not None:
            return spec
    elif isinstance(mod, (nn.Linear, FloatLinear)) and mod.weight.dtype == torch.float32 == dtype:
        return ext.LinearSpec.dense(mod.weight, mod.bias)
    return ext.LinearSpec.python(fn)


def group_spec(ext, mods: list[nn.Module], fused, fns: list, device: torch.device, dtype: torch.dtype):
    """The spec of linears sharing an input, outputs side by side. ``fused``: the Python path's fused call for
    them (``QuantLinear.fused_runner``) or None; ``fns``: its per-linear callables."""
    if fused is not None:
        spec = QuantLinear.native_spec(mods, device, dtype)
        # the kernel's fused call as the Python path makes it, natively where the kernel can
        return spec if spec is not None else ext.LinearSpec.python(lambda x: torch.cat(list(fused(x)), -1))
    return ext.LinearSpec.join([_one_spec(ext, m, f, device, dtype) for m, f in zip(mods, fns)])


def why_not(lean: "LeanModel") -> str | None:
    """None when ``lean``'s model can run the compiled step; otherwise why not, in words."""
    if not lean.compiled:
        return f"disabled ({ENV}=0 or compiled=False)"
    if lean.device.type != "cpu":
        return f"the compiled step runs on CPU; the model is on {lean.device}"
    if lean.dtype != torch.float32:
        return f"the compiled step computes in fp32; the model computes in {lean.dtype}"
    if lean.act_name not in ACTS:
        return f"activation {lean.act_name!r}"
    if native.load() is None:
        return f"the extension is unavailable ({native.why_unavailable()})"
    return None


def build(lean: "LeanModel"):
    """``native.load().DecodeStep`` for ``lean``'s model, or None (with the reason in a debug log)."""
    reason = why_not(lean)
    if reason is not None:
        log.debug("compiled decode step not used: %s", reason)
        return None
    ext, dev, dt = native.load(), lean.device, lean.dtype
    groups = {"qkv": [], "o": [], "gate_up": [], "down": []}
    for L in lean.layers:
        for name, g in (("qkv", L.qkv_group), ("gate_up", L.gate_up_group)):
            groups[name].append(group_spec(ext, g.mods, g.fused, g.fns, dev, dt))
        groups["o"].append(_one_spec(ext, L.o_mod, L.o, dev, dt))
        groups["down"].append(_one_spec(ext, L.down_mod, L.down, dev, dt))
    step = ext.DecodeStep(
        [L.in_w for L in lean.layers], [L.post_w for L in lean.layers], [L.q_norm for L in lean.layers],
        [L.k_norm for L in lean.layers], groups["qkv"], groups["o"], groups["gate_up"], groups["down"],
        lean.final_w, _one_spec(ext, lean.head_mod, lean.head, dev, dt), lean.n_heads, lean.n_kv, lean.head_dim,
        lean.final_w.numel(), lean.eps, lean.scale, ACTS[lean.act_name],
    )
    if step.needs_python:
        log.debug("compiled decode step: some linears run through Python (their kernel has no native spec)")
    return step


__all__ = ["ACTS", "ENV", "MAX_BATCH", "build", "enabled_by_env", "group_spec", "why_not"]
