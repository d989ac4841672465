"""HQQ: half-quadratic quantization (Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning
Models", 2023). Calibration-free: it needs the weight only.

For each group, with codes ``q = clamp(round(W / s + z))`` and dequantized weight ``W_r = (q - z) s``, HQQ
minimizes the sparsity-promoting ``||W - W_r||_p^p`` (``p < 1``) over the zero point by half-quadratic
splitting: an auxiliary error ``W_e`` absorbs the few large errors, and the two sub-problems alternate,

    W_e <- shrink_p(W - W_r, beta)           shrink_p(x) = sign(x) relu(|x| - |x|^(p-1) / beta)
    z   <- mean_group(q - (W - W_e) / s)     (closed form: least squares on what W_e leaves)
    beta <- kappa beta

so outliers do not drag the zero point. Schemes without a zero point (symmetric) have only the scale to
move: we give it the analogous closed-form update ``s <- <q - z, W - W_e> / ||q - z||^2`` (optionally also
for asymmetric schemes, ``optimize_scale``). Every iterate is projected onto the scheme's stored qparams
(scale dtype, integer zero points rounded, a float minimum ``m = (qmin - z) s``) and scored by the objective
on the projected grid; each group keeps its best iterate (the min-max start, RTN's, included), so the result
is never worse than RTN on that objective. The grid itself is :mod:`llmquant.schemes.primitives`'.

The lp objective (p < 1) makes large errors cheap: on a symmetric grid, where only the scale moves, its best
iterate is often a smaller scale that clips each group's largest weights, which lowers the lp error but raises
the squared one, and the model's outputs suffer (on the default model at W4G128, KL 0.81 against RTN's 0.52).
The HQQ library never meets this case: it always stores a zero point and optimizes that alone. So a guard
(``guard=True``, the default) ends the search: each (row, group) keeps RTN's qparams wherever HQQ's raise the
squared weight error ``sum_k imp_k (W_k - W_r,k)^2`` of the group, with ``imp = 1`` (data-free) or, given
calibration statistics, ``imp_k = diag(X^T X)_k / n`` (then it is the group's output error for uncorrelated
inputs, and inputs with outlier channels, whose weights must not be clipped, are weighed as the model weighs
them). The result is never worse than RTN's in that error, group by group.
"""

from __future__ import annotations

import torch

from ..errors import SchemeError
from ..schemes import QuantScheme, check_finite, compute_qparams, quantize_to_int
from ..schemes.primitives import EPS, _grouped, from_grid, round_to_grid, scale_torch_dtype


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalized soft-thresholding operator of the lp-norm (p < 1; p = 1 is the ordinary soft threshold)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp(min=1e-12).pow(p - 1) / beta)


def _project(s: torch.Tensor, z: torch.Tensor | None, scheme: QuantScheme):
    """Working (scale, zero) in the affine form ``(q - z) s`` -> the scheme's stored qparams."""
    sdt = scale_torch_dtype(scheme)
    if scheme.signed_scale:
        s = torch.where(s < 0, s.clamp(max=-EPS), s.clamp(min=EPS))
    else:
        s = s.clamp(min=EPS)
    scale = s.to(sdt)
    if z is None:
        return scale, None
    if scheme.zero_point == "int":
        return scale, z.round().clamp(scheme.qmin, scheme.qmax).to(torch.int16)
    if scheme.zero_point == "min":
        return scale, ((scheme.qmin - z) * scale.float()).to(sdt)
    return scale, z.to(sdt)


def _working(scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme):
    """Stored qparams -> the working affine form (float32 scale and zero point)."""
    s = scale.float()
    if zero is None:
        return s, None
    if scheme.zero_point == "min":
        return s, scheme.qmin - zero.float() / s
    return s, zero.float()


def hqq_quantize(
    weight: torch.Tensor,
    scheme: QuantScheme,
    *,
    iterations: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    optimize_scale: bool = True,
    guard: bool = True,
    importance: torch.Tensor | None = None,
    name: str = "weight",
    history: list | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integer codes (int16, shaped like ``weight``), scale and zero point (None if symmetric), as
    :func:`llmquant.algorithms.rtn_quantize` gives them. ``optimize_scale``: also update the scale (False: the
    zero point alone, the paper's; symmetric schemes, having no zero point, always update the scale).
    ``guard``: keep RTN's qparams in every (row, group) where HQQ's have a larger squared weight error,
    weighted per input column by ``importance`` (in_features,) when given (e.g. ``diag(X^T X) / n``).
    ``history``: if given, the kept-best objective ``sum |W - W_r|^p`` is appended after the start and after
    each iteration (before the guard)."""
    if scheme.super_group is not None:
        raise SchemeError(f"HQQ does not optimize two-level (k-quant) scales ({scheme.name}); use rtn or gptq for it")
    w = weight.detach().float()
    check_finite(w, name)
    opt_scale = scheme.symmetric or bool(optimize_scale)
    scale0, zero0 = compute_qparams(w, scheme)
    xg = _grouped(w, scheme)  # (rows, groups, gs); a ragged last group padded (masked out below)
    rows, ng, gs = xg.shape
    k = w.shape[-1]
    mask = torch.ones(1, ng, gs, device=w.device)
    if scheme.granularity == "group" and ng * gs > k:  # the padding of a ragged last group
        mask[0, -1, k - (ng - 1) * gs:] = 0
    n = mask.sum(-1, keepdim=True)
    qmin, qmax = scheme.qmin, scheme.qmax

    def objective(scale, zero, power=p, weight=mask):  # per (row, group), on the projected (stored) qparams
        sz = None if zero is None else zero.float().unsqueeze(-1)
        q = round_to_grid(xg, scale.float().unsqueeze(-1), sz, scheme)
        err = (xg - from_grid(q, scale.float().unsqueeze(-1), sz, scheme)).abs().pow(power) * weight
        return err.sum(-1)

    best_s, best_z = scale0.reshape(rows, ng), None if zero0 is None else zero0.reshape(rows, ng)
    best = objective(best_s, best_z)
    if history is not None:
        history.append(float(best.sum()))
    s, z = _working(best_s, best_z, scheme)
    s, z = s.unsqueeze(-1), None if z is None else z.unsqueeze(-1)
    b = float(beta)
    for _ in range(iterations):
        q = torch.clamp(torch.round(xg / s + (0 if z is None else z)), qmin, qmax)
        qz = q if z is None else q - z
        we = shrink_lp(xg - qz * s, b, p)
        target = xg - we  # what the grid should reproduce once the outlier part W_e is set aside
        if opt_scale:
            den = (qz * qz * mask).sum(-1, keepdim=True)
            s_new = (qz * target * mask).sum(-1, keepdim=True) / den.clamp(min=1e-12)
            s = torch.where(den > 0, s_new, s)
            if scheme.signed_scale:
                s = torch.where(s.abs() < EPS, torch.full_like(s, EPS), s)
            else:
                s = s.clamp(min=EPS)
        if z is not None:
            z = ((q - target / s) * mask).sum(-1, keepdim=True) / n
            if scheme.zero_point == "int":  # integer zero points: the scale is fitted to the rounded zero
                z = z.round().clamp(qmin, qmax)
        b *= kappa
        cs, cz = _project(s.squeeze(-1), None if z is None else z.squeeze(-1), scheme)
        cur = objective(cs, cz)
        better = cur < best
        best = torch.where(better, cur, best)
        best_s = torch.where(better, cs, best_s)
        if best_z is not None:
            best_z = torch.where(better, cz, best_z)
        if history is not None:
            history.append(float(best.sum()))
    if guard:  # RTN's qparams wherever HQQ's raise the (importance-weighted) squared weight error
        wt = mask
        if importance is not None:
            imp = importance.detach().float().to(w.device).reshape(-1)
            if imp.numel() != k:
                raise SchemeError(f"{name}: importance has {imp.numel()} values for {k} input columns")
            wt = _grouped(imp.expand(w.shape[0], k), scheme) * mask
        s0, z0 = scale0.reshape(rows, ng), None if zero0 is None else zero0.reshape(rows, ng)
        worse = objective(best_s, best_z, 2.0, wt) > objective(s0, z0, 2.0, wt)
        best_s = torch.where(worse, s0, best_s)
        if best_z is not None:
            best_z = torch.where(worse, z0, best_z)
    scale = best_s.reshape(scale0.shape)
    zero = None if best_z is None else best_z.reshape(zero0.shape)
    return quantize_to_int(w, scale, zero, scheme), scale, zero


__all__ = ["hqq_quantize", "shrink_lp"]
