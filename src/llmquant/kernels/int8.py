"""int8 x int8 -> int32 GEMM for W8A8 modules (weights int8 per output channel, activations int8).

Activations are quantized per token (dynamic), per tensor (dynamic) or with a calibrated per-tensor scale
(static). The integer product runs through ``torch._int_mm`` (CPU: any shape; CUDA: M > 16 and K, N
multiples of 8, so small batches are padded to 17 rows and other shapes fall back to the reference);
the int32 result is rescaled by ``x_scale * w_scale``. Asymmetric activations are handled without widening:
with codes ``u`` in [0, 255] and zero point ``z``, ``sum_k (u_k - z) w_k = sum_k (u_k - 128) w_k + (128 - z) sum_k w_k``,
so the GEMM takes ``u - 128`` as int8 and a per-output-channel row sum corrects it.
"""

from __future__ import annotations

import torch

from ..schemes import QuantScheme, compute_qparams, quantize_to_int
from .base import Kernel, register


def quantize_activation(x2: torch.Tensor, scheme: QuantScheme, scale=None, zero=None):
    """Codes (int16, M x K) and scale/zero broadcastable to (M, 1): from ``x2`` itself when ``scheme.dynamic``,
    else the given calibrated per-tensor ``scale``/``zero``."""
    if scale is None:
        scale, zero = compute_qparams(x2, scheme)
    q = quantize_to_int(x2, scale, zero, scheme)
    return q, scale.float().reshape(-1, 1), None if zero is None else zero.float().reshape(-1, 1)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (K, N) -> int32, respecting ``torch._int_mm``'s shape rules."""
    if a.device.type == "cuda":
        m, k = a.shape
        n = b.shape[1]
        if k % 8 or n % 8:
            return (a.float() @ b.float()).to(torch.int32)  # exact: |sums| < 2^24 for K < 1024
        if m <= 16:
            pad = torch.zeros(17 - m, k, dtype=a.dtype, device=a.device)
            return torch._int_mm(torch.cat([a, pad]), b)[:m]
    return torch._int_mm(a, b)


def supports_w8a8(module) -> bool:
    a, w = module.activation_scheme, module.scheme
    return (
        a is not None
        and a.bits == 8
        and w.bits == 8
        and w.symmetric
        and w.granularity in ("channel", "tensor")
        and a.granularity in ("token", "tensor")
    )


class Int8IntMM(Kernel):
    name = "int8_int_mm"
    numerics = "W8A8: int8 activations (per token or per tensor) x int8 weights, int32 accumulate"
    runtime_bytes_per_weight = 1.0

    def supports(self, module, device) -> bool:
        return supports_w8a8(module)

    def prepare(self, module, device, dtype):
        codes = module.codes().to(device)
        w_t = codes.t().contiguous().to(torch.int8)  # (K, N)
        w_scale = module.scale.float().reshape(1, -1).to(device)
        row_sum = codes.sum(dim=1, dtype=torch.int32).reshape(1, -1).to(device)
        return w_t, w_scale, row_sum

    def run(self, module, state, x):
        w_t, w_scale, row_sum = state
        a = module.activation_scheme
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        static = None if a.dynamic else (module.input_scale, getattr(module, "input_zero", None))
        q, xs, xz = quantize_activation(x2, a, *(static or (None, None)))
        if a.symmetric:
            acc = int_mm(q.to(torch.int8), w_t).float()
        else:  # codes in [0, 255]: shift to int8 and correct with the weight row sums
            acc = int_mm((q - 128).to(torch.int8), w_t).float() + (128 - xz) * row_sum.float()
        y = acc * xs * w_scale
        if module.bias is not None:
            y = y + module.bias.float()
        return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


register(Int8IntMM())
