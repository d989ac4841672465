"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models",
ICML 2023 (arXiv:2211.10438), eq. (4): for the input channels j of the linears fed by one source,

    s_j = max|X_j|^a / max|W_j|^(1 - a)        Y = (X diag(s)^-1) (diag(s) W^T)

so dividing the source's output (a norm's weight and bias, or a linear's output rows) by ``s`` and
multiplying the consuming linears' input columns by ``s`` leaves the float model's function unchanged,
while the activations become easier to quantize per tensor (a = 0.5 balances both sides; larger a moves
more difficulty into the weights). Pure math on tensors: the fold is :mod:`llmquant.algorithms.fold`,
which source feeds which linears is data in :mod:`llmquant.models.arch`, and the statistics come from
:mod:`llmquant.flows.smooth`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import SchemeError
from ..schemes import QuantScheme, compute_qparams
from ..schemes.primitives import from_grid, round_to_grid
from .fold import in_major_weight

W8_ROWS = QuantScheme(bits=8, granularity="channel")  # int8 per output channel, full signed grid (the W8 preset)


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``s = max|X|^a / max|W|^(1-a)`` per input channel; channels with no signal on either side get 1."""
    if not 0 <= alpha <= 1:
        raise SchemeError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    a = act_absmax.double().clamp(min=1e-5)
    w = weight_absmax.double().clamp(min=1e-5)
    s = a.pow(alpha) / w.pow(1 - alpha)
    dead = (act_absmax <= 0) | (weight_absmax <= 0)
    return torch.where(dead, torch.ones_like(s), s).clamp(min=1e-5).float()


def weight_absmax(linears: list[nn.Module]) -> torch.Tensor:
    """max |W_j| per input channel over all consuming linears."""
    return torch.cat([in_major_weight(m).abs() for m in linears], dim=0).amax(dim=0).float()


def _rtn_int8_rows(w: torch.Tensor) -> torch.Tensor:
    """int8 per-output-channel fake quantization (full signed grid, as the W8 preset) of float ``w``."""
    scale, _ = compute_qparams(w, W8_ROWS)
    return from_grid(round_to_grid(w, scale, None, W8_ROWS), scale, None, W8_ROWS)


@torch.no_grad()
def search_alpha(x: torch.Tensor, act_absmax: torch.Tensor, linears: list[nn.Module], alphas, act_fake_quant) -> tuple[float, list[float]]:
    """The alpha whose smoothing gives the smallest output error ``sum_i ||X W_i^T - Q(X/s) Q(W_i s)^T||^2`` on
    the sample ``x`` (tokens, K), with int8 per-channel weights and ``act_fake_quant`` (a function of the
    smoothed activations, e.g. an observer's per-tensor rule) for the inputs. Returns (best, errors)."""
    x = x.float()
    ws = [in_major_weight(m).float() for m in linears]
    w_absmax = torch.cat([w.abs() for w in ws]).amax(dim=0)
    ref = [x @ w.t() for w in ws]
    errs = []
    for a in alphas:
        s = smoothing_factors(act_absmax.to(x.device), w_absmax, a)
        xq = act_fake_quant(x / s)
        errs.append(sum(float((xq @ _rtn_int8_rows(w * s).t() - r).pow(2).sum()) for w, r in zip(ws, ref)))
    best = min(range(len(errs)), key=errs.__getitem__)
    return float(alphas[best]), errs
