"""Reference paths: dequantize the packed weights, then ``F.linear``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Kernel, register


class Reference(Kernel):
    """Dequantizes at every call; slow, allocation-heavy, and the ground truth for tests."""

    name = "reference"
    numerics = "weight-only: x @ dequant(W)^T in the activation dtype"
    runtime_bytes_per_weight = 0.0

    def supports(self, module, device) -> bool:
        return module.activation_scheme is None

    def run(self, module, state, x):
        w = module.dequantize_weight(dtype=x.dtype, device=x.device)
        b = None if module.bias is None else module.bias.to(x.dtype)
        return F.linear(x, w, b)


class DequantCached(Reference):
    """Dequantizes once into the activation dtype and keeps it: float speed, float memory."""

    name = "dequant_cached"
    numerics = "weight-only: x @ dequant(W)^T, W dequantized once to the activation dtype"
    runtime_bytes_per_weight = 4.0

    def prepare(self, module, device, dtype):
        return module.dequantize_weight(dtype=dtype, device=device)

    def run(self, module, state, x):
        b = None if module.bias is None else module.bias.to(x.dtype)
        return F.linear(x, state.to(x.dtype), b)


register(Reference())
register(DequantCached())
