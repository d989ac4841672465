"""What a module stores: the one definition of a module's stored tensors and bytes, which
:func:`llmquant.eval.model_size` and the mixed-precision planner sum.

A packed module (``QuantLinear``, ``QuantEmbedding``) stores its codes, scales, zero points and bias
(``stored_tensors()``: for a weight, exactly :func:`llmquant.schemes.format_bytes`); any other module its own
parameters and persistent buffers (children not included).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.nn as nn


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def is_packed(module: nn.Module) -> bool:
    """A module holding packed integer weights (it says which tensors it stores)."""
    return callable(getattr(module, "stored_tensors", None))


def stored_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors ``module`` itself stores (not its children's)."""
    if is_packed(module):
        return module.stored_tensors()
    return list(module.parameters(recurse=False)) + [
        b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set]


def unique_stored(model: nn.Module) -> Iterator[tuple[nn.Module, list[torch.Tensor]]]:
    """Each module of ``model`` with the tensors it stores that no module before it stored (a tied
    embedding and head, or a packed embedding sharing the head's tensors, count once)."""
    seen: set = set()
    for mod in model.modules():
        fresh = []
        for t in stored_tensors(mod):
            key = ("meta", id(t)) if t.is_meta else t.data_ptr()  # tensors still in a checkpoint have no address
            if key not in seen:
                seen.add(key)
                fresh.append(t)
        yield mod, fresh


def weights_held(module: nn.Module, tensors: list[torch.Tensor]) -> int:
    """How many numbers ``tensors`` (what :func:`unique_stored` gives for ``module``) hold: a packed module's
    logical (out x in) weight and its bias; the elements of anything else."""
    if not tensors:
        return 0
    if is_packed(module):
        bias = getattr(module, "bias", None)
        return module.in_features * module.out_features + (0 if bias is None else bias.numel())
    return sum(t.numel() for t in tensors)
