"""The kernel interface and registry."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


class Kernel:
    """A way to compute ``y = x @ W_hat^T + b`` for a quantized linear.

    ``numerics`` says in words what is computed, for summaries and reports; ``runtime_bytes_per_weight``
    the memory its prepared state takes at run time (packed weights kept aside for saving).

    The state :meth:`prepare` returns is the kernel's own: only the kernel reads it. What callers outside
    the kernels need of it goes through methods here (:meth:`fuse`).
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

    def fuse(self, modules: Sequence, states: Sequence[Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """One call for several modules prepared by this kernel that share their input (q/k/v, gate/up):
        a callable ``x -> cat([y_1, ..., y_n], -1)``, given ``x`` as :meth:`run` is; None when this kernel
        cannot run these modules together (the default), and the caller runs them one by one."""
        return None

    def native_spec(self, modules: Sequence, states: Sequence[Any]) -> Any:
        """The compiled decode step's description (a ``native.load().LinearSpec``) of the one-row product of
        modules prepared by this kernel that share their input, stacked along the output as :meth:`fuse`
        stacks them: the same computation on the same prepared tensors, run from C++ with no Python (see
        :mod:`llmquant.runtime.compiled`). None (the default): the step calls this kernel through Python."""
        return None


KERNELS: dict[str, Kernel] = {}


def register(kernel: Kernel) -> Kernel:
    KERNELS[kernel.name] = kernel
    return kernel
