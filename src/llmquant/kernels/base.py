"""The kernel interface and registry."""

from __future__ import annotations

from typing import Any

import torch


class Kernel:
    """A way to compute ``y = x @ W_hat^T + b`` for a quantized linear.

    ``numerics`` says in words what is computed, for summaries and reports; ``runtime_bytes_per_weight``
    the memory its prepared state takes at run time (packed weights kept aside for saving).
    """

    name: str = "?"
    numerics: str = "?"
    runtime_bytes_per_weight: float = 0.0

    def supports(self, module, device: torch.device) -> bool:
        raise NotImplementedError

    def prepare(self, module, device: torch.device, dtype: torch.dtype) -> Any:
        """Run-time state built once from the packed weights (not saved)."""
        return None

    def run(self, module, state: Any, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


KERNELS: dict[str, Kernel] = {}


def register(kernel: Kernel) -> Kernel:
    KERNELS[kernel.name] = kernel
    return kernel
