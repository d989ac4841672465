"""Scale folding: the one equivalence that AWQ and SmoothQuant both rest on.

For a per-channel scale ``s`` on the channels between a source (a norm, or a linear whose output rows are
those channels) and the linears that consume them,

    W x = (W diag(s)) (diag(s)^-1 x)

so dividing the source's outputs by ``s`` (its weight and bias) and multiplying the consumers' input
columns by ``s`` leaves the float model's function unchanged (up to float rounding). A norm whose output
is ``n(x) * (offset + w) + b`` (Gemma's RMSNorm: offset 1) must scale ``offset + w``, so its new weight is
``(offset + w) / s - offset``; dividing ``w`` alone would leave ``offset / s`` unscaled. SmoothQuant (Xiao et
al., ICML 2023, arXiv:2211.10438) folds ``s = max|X|^a / max|W|^(1-a)`` to move activation outliers
into the weights; AWQ (Lin et al., MLSys 2024, arXiv:2306.00978) folds the activation-aware scale
that minimizes the consumers' quantized output error.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import SchemeError


def fold_scale(source_weight: torch.Tensor, source_bias: torch.Tensor | None, consumer_weights: list[torch.Tensor],
               s: torch.Tensor, weight_offset: float = 0.0) -> None:
    """In place: divide the source's outputs by ``s`` (a norm's weight (C,), or a linear's output rows of an
    (C, in) weight, and the bias) and multiply the consuming linears' (out, C) input columns by ``s``.
    ``weight_offset``: the constant a norm adds to its weight before scaling (1 for ``x * (1 + w)``)."""
    s = s.to(source_weight.device)
    if source_weight.dim() == 1 and weight_offset:
        w = (source_weight.double() + weight_offset) / s.double() - weight_offset
        source_weight.copy_(w.to(source_weight.dtype))
    elif source_weight.dim() == 1:
        source_weight.div_(s.to(source_weight.dtype))
    else:
        source_weight.div_(s.to(source_weight.dtype).unsqueeze(1))
    if source_bias is not None:
        source_bias.div_(s.to(source_bias.dtype))
    for t in consumer_weights:
        t.mul_(s.to(device=t.device, dtype=t.dtype).unsqueeze(0))


def in_major_weight(m: nn.Module) -> torch.Tensor:
    """The weight as (out, in): ``nn.Linear`` stores it so; GPT-2's ``Conv1D`` (weight (in, out), ``nf`` =
    out) gets a transposed view, so in-place edits reach the module."""
    w = m.weight
    if isinstance(m, nn.Linear):
        return w.data
    if getattr(m, "nf", None) == w.shape[1]:
        return w.data.t()
    raise SchemeError(f"cannot tell the input dimension of a {type(m).__name__}'s weight")


@torch.no_grad()
def fold_scale_modules(source: nn.Module, linears: list[nn.Module], s: torch.Tensor, weight_offset: float = 0.0) -> None:
    """:func:`fold_scale` on modules: ``source`` a norm (weight and bias; ``weight_offset`` as there) or a
    linear / ``Conv1D`` (output rows and bias), ``linears`` the consumers (``nn.Linear`` or ``Conv1D``)."""
    s = s.to(linears[0].weight.device)
    if isinstance(source, nn.Linear) or getattr(source, "nf", None) is not None:
        sw = in_major_weight(source)  # (out, in): the source's outputs are our channels
        weight_offset = 0.0
    else:
        if getattr(source, "weight", None) is None:
            raise SchemeError(f"a {type(source).__name__} with no weight cannot absorb a folded scale")
        sw = source.weight.data
    bias = getattr(source, "bias", None)
    fold_scale(sw, None if bias is None else bias.data, [in_major_weight(m) for m in linears], s, weight_offset)
