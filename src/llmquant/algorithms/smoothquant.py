"""SmoothQuant: migrate activation outliers into the weights before W8A8 quantization.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models",
ICML 2023 (arXiv:2211.10438), eq. (4): for the input channels j of the linears fed by one source,

    s_j = max|X_j|^a / max|W_j|^(1 - a)        Y = (X diag(s)^-1) (diag(s) W^T)

so dividing the source's output (a norm's weight and bias, or a linear's output rows) by ``s`` and
multiplying the consuming linears' input columns by ``s`` leaves the float model's function unchanged,
while the activations become easier to quantize per tensor (a = 0.5 balances both sides; larger a moves
more difficulty into the weights). Pure math on tensors: which source feeds which linears is data in
:mod:`llmquant.models.arch`, and the statistics come from :mod:`llmquant.flows.smooth`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import SchemeError


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``s = max|X|^a / max|W|^(1-a)`` per input channel; channels with no signal on either side get 1."""
    if not 0 <= alpha <= 1:
        raise SchemeError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    a = act_absmax.double().clamp(min=1e-5)
    w = weight_absmax.double().clamp(min=1e-5)
    s = a.pow(alpha) / w.pow(1 - alpha)
    dead = (act_absmax <= 0) | (weight_absmax <= 0)
    return torch.where(dead, torch.ones_like(s), s).clamp(min=1e-5).float()


def in_major_weight(m: nn.Module) -> torch.Tensor:
    """The weight as (out, in): ``nn.Linear`` stores it so; GPT-2's ``Conv1D`` (weight (in, out), ``nf`` =
    out) gets a transposed view, so in-place edits reach the module."""
    w = m.weight
    if isinstance(m, nn.Linear):
        return w.data
    if getattr(m, "nf", None) == w.shape[1]:
        return w.data.t()
    raise SchemeError(f"cannot tell the input dimension of a {type(m).__name__}'s weight")


def weight_absmax(linears: list[nn.Module]) -> torch.Tensor:
    """max |W_j| per input channel over all consuming linears."""
    return torch.cat([in_major_weight(m).abs() for m in linears], dim=0).amax(dim=0).float()


@torch.no_grad()
def apply_smoothing(source: nn.Module, linears: list[nn.Module], s: torch.Tensor) -> None:
    """Fold ``1/s`` into ``source`` (a norm: weight and bias; a linear: output rows and bias) and ``s`` into
    the input columns of ``linears``; the composed function is unchanged up to float rounding."""
    s = s.to(linears[0].weight.device)
    if isinstance(source, nn.Linear) or getattr(source, "nf", None) is not None:
        w = in_major_weight(source)  # (out, in): the source's outputs are our channels
        w.div_(s.to(w.dtype)[:, None])
    else:
        if getattr(source, "weight", None) is None:
            raise SchemeError(f"a {type(source).__name__} with no weight cannot absorb SmoothQuant scales")
        source.weight.data.div_(s.to(source.weight.dtype))
    if getattr(source, "bias", None) is not None:
        source.bias.data.div_(s.to(source.bias.dtype))
    for m in linears:
        w = in_major_weight(m)
        w.mul_(s.to(w.dtype)[None, :])


def _rtn_int8_rows(w: torch.Tensor) -> torch.Tensor:
    """int8 per-output-channel fake quantization (full signed grid, as the W8 preset)."""
    s = (w.abs().amax(dim=1, keepdim=True) / 127.5).clamp(min=1e-10)
    return (w / s).round().clamp(-128, 127) * s


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
