"""fbgemm's fp16-weight GEMM (``quantized::linear_dynamic_fp16``): activations stay fp32, weights are
held in fp16, products accumulate in fp32.

For per-channel (and per-tensor) schemes the fp16 weight holds the integer codes ``q - z`` themselves,
which fp16 represents exactly, and the per-row scale is applied to the output: the result is the
weight-only product ``x @ dequant(W)^T`` up to fp32 summation order. For grouped schemes the scale varies
along the input dimension, so the dequantized weight itself is rounded to fp16 (a relative error of at
most 2^-11 per weight, far below an int8 step). Run-time memory: 2 bytes per weight.
"""

from __future__ import annotations

import torch

from .base import Kernel, register


def _fbgemm_available() -> bool:
    try:
        return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
            torch.ops.quantized, "linear_prepack_fp16"
        )
    except Exception:  # pragma: no cover
        return False


_AVAILABLE = _fbgemm_available()


class FbgemmFP16(Kernel):
    name = "fbgemm_fp16"
    numerics = "weight-only: fp32 activations x fp16 weights (integer codes, exact, for per-channel)"
    runtime_bytes_per_weight = 2.0

    def supports(self, module, device) -> bool:
        return _AVAILABLE and device.type == "cpu" and module.activation_scheme is None

    def prepare(self, module, device, dtype):
        scheme = module.scheme
        if scheme.granularity in ("channel", "tensor"):
            codes = module.codes()  # q, int16 (N, K)
            if module.zero is not None:
                codes = codes - module.zero.to(torch.int16).reshape(-1, 1)
            w = codes.float()
            out_scale = module.scale.float().reshape(-1)
        else:
            w = module.dequantize_weight(dtype=torch.float32, device=device)
            out_scale = None
        if module.zero is not None and module.scheme.zero_point != "int" and out_scale is not None:
            # float zero points / minima are not integers: fall back to the rounded dequantized weight
            w = module.dequantize_weight(dtype=torch.float32, device=device)
            out_scale = None
        packed = torch.ops.quantized.linear_prepack_fp16(w, None)
        return packed, out_scale

    def run(self, module, state, x):
        packed, out_scale = state
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32:
            x2 = x2.float()
        y = torch.ops.quantized.linear_dynamic_fp16(x2.contiguous(), packed)
        if out_scale is not None:
            y = y * out_scale
        if module.bias is not None:
            y = y + module.bias.float()
        return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


register(FbgemmFP16())
