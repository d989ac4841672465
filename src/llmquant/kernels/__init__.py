"""Kernel dispatch: for each quantized format, the fastest correct path on the device at hand.

Each kernel declares which formats it supports, what numerics it has and how to prepare its run-time
state from a module's packed weights. ``select`` walks a preference list per device and takes the first
kernel that supports the format. The CPU order comes from ``benchmarks/bench_kernels.py`` (see
benchmarks/results/kernels.md): on this 2-core x86 CPU with torch 2.13, fbgemm's fp16-weight GEMM beats
fp32 at batch 1 (1.4-6x) and matches it at 512 tokens, while ``torch._weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` are many
times slower than fp32, so they are not candidates. The reference path (dequantize, then ``F.linear``)
is what every kernel is tested against. For W8A8, fbgemm's int8 GEMM (with llmquant's activation
qparams) beats ``torch._int_mm`` at one token (``benchmarks/bench_dynamic.py``; at 512 tokens ``_int_mm``
measured faster there, a hybrid is not done yet). ``packed_avx2`` (a C++ extension built on first use)
reads int4/int8 packed codes directly for decode and hands many-token inputs to fbgemm's fp16 GEMM; it
comes before ``fbgemm_fp16`` for the formats it takes, and when it cannot be built the order falls
through to ``fbgemm_fp16``. ``packed_q8act`` (the same packed codes, activations rounded to int8 per block
of 32 as llama.cpp does, integer dot products) is opt-in: it is in no preference list.

``LLMQUANT_KERNEL=<name>`` in the environment, or :func:`set_kernel`, forces one kernel.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .base import KERNELS, Kernel, register
from . import reference as _reference  # noqa: F401  (registers)
from . import fbgemm as _fbgemm  # noqa: F401  (registers)
from . import int8 as _int8  # noqa: F401  (registers)
from . import fbgemm_int8 as _fbgemm_int8  # noqa: F401  (registers)
from . import packed_cpu as _packed_cpu  # noqa: F401  (registers; compiled on first use, see native.py)
from . import packed_q8act as _packed_q8act  # noqa: F401  (registers; opt-in, not in PREFERENCE)

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Preference by device type; the first kernel that supports a format wins.
PREFERENCE: dict[str, list[str]] = {
    "cpu": ["fbgemm_int8", "int8_int_mm", "packed_avx2", "fbgemm_fp16", "dequant_cached"],
    "cuda": ["int8_int_mm", "dequant_cached"],
}
DEFAULT_PREFERENCE = ["dequant_cached"]


def select(module, device: "torch.device") -> Kernel:
    """The kernel a QuantLinear on ``device`` runs with."""
    forced = getattr(module, "kernel_override", None) or os.environ.get("LLMQUANT_KERNEL")
    if forced:
        if forced not in KERNELS:
            from ..errors import LLMQuantError

            raise LLMQuantError(f"unknown kernel {forced!r}; known: {', '.join(KERNELS)}")
        k = KERNELS[forced]
        if k.supports(module, device):
            return k
    for name in PREFERENCE.get(device.type, DEFAULT_PREFERENCE):
        k = KERNELS[name]
        if k.supports(module, device):
            return k
    return KERNELS["reference"]


def set_kernel(model, name: str | None) -> None:
    """Force kernel ``name`` (or the automatic choice with None) on every QuantLinear of ``model``."""
    if name is not None and name not in KERNELS:
        from ..errors import LLMQuantError

        raise LLMQuantError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")
    for m in model.modules():
        if hasattr(m, "kernel_override"):
            m.kernel_override = name
            m.reset_kernel()


__all__ = ["KERNELS", "Kernel", "PREFERENCE", "register", "select", "set_kernel"]
