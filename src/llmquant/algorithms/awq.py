"""AWQ: Lin, Tang, Tang, Yang, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration" (MLSys 2024), arXiv:2306.00978.

Weights that meet large activations matter most. Scaling input channel ``k`` of a weight by ``s_k > 1``
and its input by ``1/s_k`` leaves the float product unchanged, ``W x = (W diag(s)) (diag(s)^-1 x)``, but
shrinks that channel's relative rounding error. AWQ searches

    s = mean|x|^alpha / sqrt(max * min),   alpha* = argmin_alpha || Q(W diag(s)) diag(s)^-1 X - W X ||^2

over a grid of alpha in [0, 1) for all linears fed by one input, and folds ``1/s`` into the op before them
(a norm's weight and bias, or a previous linear's output rows), so the model's float function is unchanged.
An optional clipping search then shrinks each (row, group) range by the ratio that minimizes the same
output error. Output errors are computed exactly over all calibration tokens from the Gram matrix
``G = X^T X / n`` (``||D X||^2 = sum((D G) * D)``), so no activations need to be kept.
"""

from __future__ import annotations

import torch

from ..schemes import QuantScheme, check_finite, dequantize, minmax, qparams_from_minmax, quantize_to_int


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> float:
    """Mean squared output error per token, summed over rows: ``sum((D G) * D)`` for weight error D."""
    return float(((delta @ gram) * delta).sum())


def _fake_quant(w: torch.Tensor, scheme: QuantScheme, shrink: torch.Tensor | float = 1.0) -> torch.Tensor:
    lo, hi = minmax(w, scheme)
    scale, zero = qparams_from_minmax(lo * shrink, hi * shrink, scheme)
    return dequantize(quantize_to_int(w, scale, zero, scheme), scale, zero, scheme)


def awq_scales(x_absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_absmean.float().clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def awq_search_scale(
    weights: list[torch.Tensor], gram: torch.Tensor, x_absmean: torch.Tensor, scheme: QuantScheme, grid: int = 20
) -> tuple[torch.Tensor, float, dict[float, float]]:
    """The per-input-channel scale ``s`` (in_features,) that minimizes the summed output error of the
    linears ``weights`` (all fed by the same input) after quantization; also the chosen alpha and the loss
    at each alpha tried (alpha 0 is plain RTN)."""
    w = torch.cat([t.detach().float() for t in weights], dim=0)
    check_finite(w)
    g = gram.float()
    losses: dict[float, float] = {}
    best, best_s = float("inf"), None
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(x_absmean, alpha)
        delta = _fake_quant(w * s, scheme) / s - w
        loss = output_error(delta, g)
        losses[alpha] = loss
        if loss < best:
            best, best_s, best_alpha = loss, s, alpha
    return best_s, best_alpha, losses


def _group_blocks(x: torch.Tensor, gs: int) -> torch.Tensor:
    """(rows, K) -> (rows, groups, gs), zero-padding a ragged last group."""
    rows, k = x.shape
    ng = -(-k // gs)
    pad = ng * gs - k
    if pad:
        x = torch.cat([x, x.new_zeros(rows, pad)], dim=1)
    return x.reshape(rows, ng, gs)


def _gram_blocks(gram: torch.Tensor, gs: int) -> torch.Tensor:
    """Diagonal (gs x gs) blocks of the Gram matrix, zero-padded: (groups, gs, gs)."""
    k = gram.shape[0]
    ng = -(-k // gs)
    out = gram.new_zeros(ng, gs, gs)
    for gi in range(ng):
        a, b = gi * gs, min((gi + 1) * gs, k)
        out[gi, : b - a, : b - a] = gram[a:b, a:b]
    return out


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
        gs = scheme.group_size if scheme.granularity == "group" else w.shape[1]
        gb = _gram_blocks(gram.float(), gs)
        best = torch.full_like(lo, float("inf"))
        ratio = torch.ones_like(lo)
        for i in range(grid):
            r = 1 - max_shrink * i / grid
            scale, zero = qparams_from_minmax(lo * r, hi * r, scheme)
            d = _group_blocks(dequantize(quantize_to_int(w, scale, zero, scheme), scale, zero, scheme) - w, gs)
            dg = d.transpose(0, 1)  # (groups, rows, gs): one batched product, no (r, g, gs, gs) temporary
            err = (torch.bmm(dg, gb) * dg).sum(-1).T
            better = err < best
            best = torch.where(better, err, best)
            ratio = torch.where(better, torch.full_like(ratio, r), ratio)
        lo, hi = lo * ratio, hi * ratio
    scale, zero = qparams_from_minmax(lo, hi, scheme)
    return quantize_to_int(w, scale, zero, scheme), scale, zero


def fold_scale(source_weight: torch.Tensor, source_bias: torch.Tensor | None, targets: list[torch.Tensor], s: torch.Tensor) -> None:
    """In place: divide the source's outputs by ``s`` (a norm's weight/bias, or a linear's output rows and
    bias) and multiply the target linears' input columns by ``s``; the composed float function is unchanged."""
    s = s.to(source_weight.device)
    if source_weight.dim() == 1:
        source_weight.div_(s.to(source_weight.dtype))
    else:
        source_weight.div_(s.to(source_weight.dtype).unsqueeze(1))
    if source_bias is not None:
        source_bias.div_(s.to(source_bias.dtype))
    for t in targets:
        t.mul_(s.to(t.dtype).unsqueeze(0))
