"""AWQ: Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration" (MLSys 2024), arXiv:2306.00978.

Weights that meet large activations matter most. Scaling input channel ``k`` of a weight by ``s_k > 1``
and its input by ``1/s_k`` leaves the float product unchanged, ``W x = (W diag(s)) (diag(s)^-1 x)``, but
shrinks that channel's relative rounding error. AWQ searches

    s = mean|x|^alpha / sqrt(max * min),   alpha* = argmin_alpha || Q(W diag(s)) diag(s)^-1 X - W X ||^2

over a grid of alpha in [0, 1) for all linears fed by one input, and folds ``1/s`` into the op before them
(a norm's weight and bias, or a previous linear's output rows; :func:`llmquant.algorithms.fold.fold_scale`),
so the model's float function is unchanged. An optional clipping search then shrinks each (row, group)
range by the ratio that minimizes the same output error (:func:`llmquant.schemes.primitives.search_range`
with :func:`~llmquant.schemes.primitives.gram_error`). Output errors are computed exactly over all
calibration tokens from the Gram matrix ``G = X^T X / n`` (``||D X||^2 = sum((D G) * D)``), so no
activations need to be kept.
"""

from __future__ import annotations

import torch

from ..schemes import QuantScheme, check_finite, fake_quantize, minmax, qparams_from_minmax, quantize_to_int
from ..schemes.primitives import gram_error, search_range
from .fold import fold_scale  # noqa: F401  (re-exported: AWQ's fold lives with SmoothQuant's)


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """Mean squared output error per token, summed over rows: ``sum((D G) * D)`` for weight error D."""
    return float(((delta @ gram) * delta).sum())


def awq_scales(x_absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_absmean.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def awq_search_scale(
    weights: list[torch.Tensor], gram: torch.Tensor, x_absmean: torch.Tensor, scheme, grid: int = 20
) -> tuple[torch.Tensor, float, dict[float, float]]:
    """The per-input-channel scale ``s`` (in_features,) that minimizes the summed output error of the
    linears ``weights`` (all fed by the same input) after quantization; also the chosen alpha and the loss
    at each alpha tried (alpha 0 is plain RTN). ``scheme``: one :class:`QuantScheme` for all, or one per
    weight (a mixed-precision plan's; a float format there adds no error)."""
    schemes = list(scheme) if isinstance(scheme, (list, tuple)) else [scheme] * len(weights)
    if len(schemes) != len(weights):
        raise ValueError(f"{len(schemes)} schemes for {len(weights)} weights")
    parts = [(t.detach().float(), f) for t, f in zip(weights, schemes) if isinstance(f, QuantScheme)]
    for w, _ in parts:
        check_finite(w)
    g = gram.float()
    losses: dict[float, float] = {}
    best, best_s, best_alpha = float("inf"), torch.ones_like(x_absmean, dtype=torch.float32), 0.0
    for i in range(grid if parts else 0):
        alpha = i / grid
        s = awq_scales(x_absmean, alpha)
        loss = sum(output_error(fake_quantize(w * s, f) / s - w, g) for w, f in parts)
        losses[alpha] = loss
        if loss < best:
            best, best_s, best_alpha = loss, s, alpha
    if not parts:
        losses[0.0] = 0.0
    return best_s, best_alpha, losses


@torch.no_grad()
def awq_clip_quantize(
    weight: torch.Tensor, gram: torch.Tensor, scheme: QuantScheme, *, grid: int = 20, max_shrink: float = 0.5,
    clip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes, scale and zero (as RTN) of ``weight`` with each (row, group) range shrunk by the ratio in
    ``[1 - max_shrink, 1]`` that minimizes that group's output error ``d^T G_gg d``."""
    w = weight.detach().float()
    check_finite(w)
    lo, hi = minmax(w, scheme)  # (rows, groups)
    if clip and scheme.granularity in ("group", "channel"):
        ratios = [1 - max_shrink * i / grid for i in range(grid)]
        lo, hi = search_range(lo, hi, ratios, gram_error(w, gram.float(), scheme))
    scale, zero = qparams_from_minmax(lo, hi, scheme)
    return quantize_to_int(w, scale, zero, scheme), scale, zero
