"""Reference paths: dequantize the packed weights, then ``F.linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..schemes import compute_qparams, dequantize, quantize_to_int
from .base import Kernel, register


def fake_quant_input(module, x: torch.Tensor) -> torch.Tensor:
    """The input as the module's activation scheme sees it (quantized and dequantized); as is if weight-only."""
    a = module.activation_scheme
    if a is None:
        return x
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    cols = None
    if a.outlier_threshold is not None:  # LLM.int8(): columns with any |x| >= t stay in float
        cols = (x2.abs() >= a.outlier_threshold).any(dim=0)
        x_cols = x2[:, cols]
        x2 = x2.masked_fill(cols, 0.0)
    if a.dynamic:
        scale, zero = compute_qparams(x2, a)
    else:
        scale, zero = module.input_scale, getattr(module, "input_zero", None)
    q = quantize_to_int(x2, scale, zero, a)
    x_hat = dequantize(q, scale, zero, a)
    if cols is not None:
        x_hat[:, cols] = x_cols
    return x_hat.reshape(shape).to(x.dtype)


class Reference(Kernel):
    """Dequantizes at every call; slow, allocation-heavy, and the ground truth for tests."""

    name = "reference"
    numerics = "x_hat @ dequant(W)^T in the activation dtype (x_hat: x fake-quantized when activations are)"
    runtime_bytes_per_weight = 0.0

    def supports(self, module, device) -> bool:
        return True

    def run(self, module, state, x):
        w = module.dequantize_weight(dtype=x.dtype, device=x.device)
        b = None if module.bias is None else module.bias.to(x.dtype)
        return F.linear(fake_quant_input(module, x), w, b)


class DequantCached(Reference):
    """Dequantizes once into the activation dtype and keeps it: float speed, float memory."""

    name = "dequant_cached"
    numerics = "x_hat @ dequant(W)^T, W dequantized once to the activation dtype"
    runtime_bytes_per_weight = 4.0

    def prepare(self, module, device, dtype):
        return module.dequantize_weight(dtype=dtype, device=device)

    def run(self, module, state, x):
        b = None if module.bias is None else module.bias.to(x.dtype)
        return F.linear(fake_quant_input(module, x), state.to(x.dtype), b)


register(Reference())
register(DequantCached())
