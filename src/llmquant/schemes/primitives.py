"""Quantization primitives on tensors: qparams, quantize, dequantize, fake-quantize, the minimum-error range
search, SQNR. Every module that rounds to a grid does it through these (no re-derivations elsewhere).

Affine quantization: ``q = clamp(round(x / s) + z, qmin, qmax)`` and ``x_hat = (q - z) * s``.
Symmetric schemes use ``z = 0`` and the full signed grid with ``s = max|x| / ((qmax - qmin) / 2)``
(e.g. int4: [-8, 7], s = max|x| / 7.5, as compressed-tensors does; on the default model this gives KL
0.44 at W4 g64 against 0.52 for the restricted grid), or, with ``restricted_range``, ``[-qmax, qmax]`` and
``s = max|x| / qmax`` (GGUF Q8_0), or, with ``signed_scale``, ``s = x_e / qmin`` where ``x_e`` is the
value of largest magnitude with its sign (GGUF Q4_0 / Q5_0; ``s`` may be negative). Asymmetric ones use
``s = (max - min) / (qmax - qmin)`` with ``z = qmin - min / s`` (rounded for integer zero points, unrounded
for "float" ones), or, for ``zero_point="min"``, keep the minimum itself as a float offset ``m``:
``q = round((x - m) / s) + qmin`` and ``x_hat = (q - qmin) * s + m``, computed as GGUF Q4_1 / Q5_1 do
(``q * d + m`` in float32; qmin is 0 for asymmetric schemes), so those blocks are reproduced bit for bit.
Reductions run over the last dimension: per group of ``group_size`` values (the last group may be shorter
when the width is not a multiple), per row ("channel" for weights, "token" for activations), or over the
whole tensor.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..errors import InvalidWeightsError, SchemeError
from .methods import RANGE_SEARCHES
from .scheme import QuantScheme

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EPS = 1e-10


def scale_torch_dtype(scheme: QuantScheme) -> torch.dtype:
    return _DTYPES[scheme.scale_dtype]


def group_len(scheme: QuantScheme, k: int) -> int:
    """Values per group along a dimension of ``k``: the group size, or ``k`` when one group holds them all
    (so a group larger than the layer costs no padding)."""
    return min(scheme.group_size, k)


def _grouped(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """View ``x`` (..., K) as (rows, groups, group_len); a ragged last group is padded by repeating its
    last value, which changes neither its min nor its max."""
    k = x.shape[-1]
    if scheme.granularity == "tensor":
        return x.reshape(1, 1, -1)
    rows = x.reshape(-1, k)
    if scheme.granularity in ("channel", "token"):
        return rows.unsqueeze(1)
    gs = group_len(scheme, k)
    g = -(-k // gs)
    pad = g * gs - k
    if pad:
        rows = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
    return rows.reshape(rows.shape[0], g, gs)


def minmax(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) min and max of ``x`` under the scheme's granularity; shapes (rows, groups)."""
    xg = _grouped(x.float(), scheme)
    return xg.amin(dim=-1), xg.amax(dim=-1)


def qparams_from_minmax(
    xmin: torch.Tensor, xmax: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point from ranges. Zero is None for symmetric schemes."""
    if scheme.super_group is not None:  # llama.cpp k-quants: two-level scales
        from .kquant import kquant_qparams

        return kquant_qparams(xmin.float(), xmax.float(), scheme)
    sdt = scale_torch_dtype(scheme)
    if scheme.symmetric:
        if scheme.signed_scale:
            ext = torch.where(xmin.abs() >= xmax.abs(), xmin, xmax)
            scale = ext / scheme.qmin
            scale = torch.where(scale < 0, scale.clamp(max=-EPS), scale.clamp(min=EPS)).to(sdt)
            return scale, None
        return scale_from_absmax(torch.maximum(xmin.abs(), xmax.abs()), scheme), None
    if scheme.zero_point == "min":
        scale = ((xmax - xmin) / (scheme.qmax - scheme.qmin)).clamp(min=EPS).to(sdt)
        return scale, xmin.to(sdt)
    if scheme.zero_point == "int":
        # keep 0 representable so the integer zero point stays inside the grid
        xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)
    scale = ((xmax - xmin) / (scheme.qmax - scheme.qmin)).clamp(min=EPS).to(sdt)
    zero = scheme.qmin - xmin / scale.float()
    if scheme.zero_point == "int":
        zero = zero.round().clamp(scheme.qmin, scheme.qmax).to(torch.int16)
    else:
        zero = zero.to(sdt)
    return scale, zero


def scale_from_absmax(amax: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The scale of a symmetric scheme (not ``signed_scale``) from ``max|x|``: ``max|x| / ((qmax - qmin) / 2)``."""
    return (amax / ((scheme.qmax - scheme.qmin) / 2)).clamp(min=EPS).to(scale_torch_dtype(scheme))


def compute_qparams(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max (round-to-nearest) qparams; shapes (rows, groups) or (1, 1) for per-tensor. k-quant schemes
    (two-level scales) search each group's scale and minimum as llama.cpp's quantizer does
    (:func:`llmquant.schemes.kquant.search_qparams`)."""
    if scheme.super_group is not None:
        from .kquant import search_qparams

        return search_qparams(_grouped(x.float(), scheme), scheme)
    xmin, xmax = minmax(x, scheme)
    return qparams_from_minmax(xmin, xmax, scheme)


def expand_groups(p: torch.Tensor, k: int, scheme: QuantScheme) -> torch.Tensor:
    """Broadcast per-(row, group) parameters to (rows, k)."""
    if scheme.granularity == "group":
        return p.repeat_interleave(group_len(scheme, k), dim=1)[:, :k]
    return p  # (rows, 1) or (1, 1) broadcasts


def quantize_to_int(
    x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: QuantScheme
) -> torch.Tensor:
    """Integer codes (int16, values in [qmin, qmax]) of ``x`` with the given qparams, shaped like x."""
    k = x.shape[-1]
    rows = x.reshape(-1, k).float() if scheme.granularity != "tensor" else x.reshape(1, -1).float()
    s = expand_groups(scale.float(), rows.shape[-1], scheme)
    z = None if zero is None else expand_groups(zero.float(), rows.shape[-1], scheme)
    return round_to_grid(rows, s, z, scheme).to(torch.int16).reshape(x.shape)


def round_to_grid(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, scheme: QuantScheme) -> torch.Tensor:
    """Float codes ``clamp(round(x / s) + z, qmin, qmax)`` (``round((x - m) / s) + qmin`` for a float minimum
    ``m``) with ``s`` / ``z`` already broadcastable to ``x``: the one rounding rule, elementwise and without
    reshapes, so hot loops (GPTQ's columns, the int8 kernels' activations) use it directly."""
    if z is not None and scheme.zero_point == "min":
        q = (x - z).div_(s).add_(scheme.qmin)
    else:
        q = x / s
        if z is not None:
            q = q.add_(z)
    return q.round_().clamp_(scheme.qmin, scheme.qmax)


def from_grid(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, scheme: QuantScheme) -> torch.Tensor:
    """Values ``(q - z) * s`` (``(q - qmin) * s + m`` for a float minimum) of float codes ``q``, elementwise,
    with ``s`` / ``z`` broadcastable to ``q``: the inverse of :func:`round_to_grid` on the grid."""
    if z is not None and scheme.zero_point == "min":  # two float32 roundings, as GGUF computes q * d + m
        return (q - scheme.qmin) * s + z
    if z is not None:
        q = q - z
    return q * s


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    scheme: QuantScheme,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(q - zero) * scale`` broadcast over groups; returns ``dtype``, shaped like q."""
    rows = q.reshape(-1, q.shape[-1]) if scheme.granularity != "tensor" else q.reshape(1, -1)
    k = rows.shape[-1]
    s = expand_groups(scale.float(), k, scheme)
    z = None if zero is None else expand_groups(zero.float(), k, scheme)
    return from_grid(rows.float(), s, z, scheme).reshape(q.shape).to(dtype)


def fake_quantize(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Quantize then dequantize with min-max qparams (no gradient trick; see QAT for that)."""
    scale, zero = compute_qparams(x, scheme)
    return dequantize(quantize_to_int(x, scale, zero, scheme), scale, zero, scheme, x.dtype)


def group_sum(v: torch.Tensor, groups: int, scheme: QuantScheme) -> torch.Tensor:
    """Sum per-value quantities ``v`` (rows, K) onto the (rows, groups) or (1, 1) qparams they belong to
    (a ragged last group sums only its real values)."""
    if scheme.granularity == "tensor":
        return v.sum().reshape(1, 1)
    if scheme.granularity != "group":
        return v.sum(dim=1, keepdim=True)
    rows, k = v.shape
    gs = group_len(scheme, k)
    pad = groups * gs - k
    if pad:
        v = torch.cat([v, v.new_zeros(rows, pad)], dim=1)
    return v.reshape(rows, groups, gs).sum(-1)


# ---- minimum-error range search --------------------------------------------------------------------
# One search for QAT's "mse" init, the MSE observer, AWQ's clipping, RTN's and GPTQ's weight ranges: shrink
# each (row, group) range (lo, hi) by ratios r and keep, per range, the first r with the least
# error(r lo, r hi). The error measure is what differs: the round trip's squared error (optionally weighted
# per input column by an importance such as diag(X^T X), as llama.cpp's imatrix does), the output error
# through a Gram matrix, or an expected error over a histogram (the observer's own).
RangeError = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def search_range(lo: torch.Tensor, hi: torch.Tensor, ratios: Iterable[float], error: RangeError
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r* lo, r* hi)`` with ``r*`` per range the ratio of ``ratios`` of least ``error(r lo, r hi)`` (a
    tensor shaped like ``lo``); the full range (r = 1) where no ratio has a finite error."""
    best = torch.full_like(lo, float("inf"))
    best_r = torch.ones_like(lo)
    for r in ratios:
        e = error(lo * r, hi * r)
        better = e < best
        best = torch.where(better, e, best)
        best_r = torch.where(better, r, best_r)
    return lo * best_r, hi * best_r


def _roundtrip(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    scale, zero = qparams_from_minmax(lo, hi, scheme)
    return dequantize(quantize_to_int(x, scale, zero, scheme), scale, zero, scheme) - x


def squared_error(x: torch.Tensor, scheme: QuantScheme, importance: torch.Tensor | None = None) -> RangeError:
    """Error measure for :func:`search_range`: ``sum (x - Q(x))^2`` per (row, group) of float ``x``, or with
    ``importance`` (K,) (one weight per column of ``x``, e.g. the inputs' ``diag(X^T X) / n``)
    ``sum_k importance_k (x_k - Q(x_k))^2``: the output error of the group when its inputs are uncorrelated."""
    imp = None if importance is None else importance.float().to(x.device).reshape(-1)
    if imp is not None and imp.numel() != x.shape[-1]:
        raise SchemeError(f"importance has {imp.numel()} values for {x.shape[-1]} columns")
    k = x.shape[-1]
    if x.dim() == 2 and (scheme.granularity == "channel"
                         or (scheme.granularity == "group" and k % group_len(scheme, k) == 0)):
        # the same values, operation for operation, on the (rows, groups, group) view with the qparams
        # broadcast: no per-value copies of the scales, no integer round trip (3-4x faster)
        xg = _grouped(x.float(), scheme)
        impg = None if imp is None else imp.reshape(1, *xg.shape[1:])

        def grouped_error(lo, hi):
            scale, zero = qparams_from_minmax(lo, hi, scheme)
            s = scale.float().unsqueeze(-1)
            z = None if zero is None else zero.float().unsqueeze(-1)
            d = from_grid(round_to_grid(xg, s, z, scheme), s, z, scheme).sub_(xg).pow_(2)
            return (d if impg is None else d.mul_(impg)).sum(-1)
        return grouped_error

    def error(lo, hi):
        d = _roundtrip(x, lo, hi, scheme).pow(2)
        if imp is not None:
            d = d * imp
        return group_sum(d.reshape(-1, x.shape[-1]) if scheme.granularity != "tensor" else d.reshape(1, -1),
                         lo.shape[1], scheme)
    return error


def range_ratios(steps: int = 20, lowest: float = 0.5) -> list[float]:
    """The shrink ratios a range search tries: ``steps`` values from 1 (the full range) down to ``lowest``."""
    return torch.linspace(1.0, lowest, steps).tolist() if steps > 1 else [1.0]


def range_qparams(x: torch.Tensor, scheme: QuantScheme, search: str = "minmax", importance: torch.Tensor | None = None,
                  *, steps: int = 20, lowest: float = 0.5) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Qparams of ``x`` (rows, K) by a weight range search (:data:`RANGE_SEARCHES`): "minmax" is
    :func:`compute_qparams`; "mse" and "imse" shrink each (row, group) range by the ratio of
    :func:`range_ratios` whose round trip has the least squared error, "imse" weighting column ``k``'s error
    by ``importance[k]`` (required). For k-quant schemes "minmax" is llama.cpp's own group search, "imse" the
    same search weighted as llama.cpp weights it with an importance matrix, and "mse"'s shrunk ranges are
    rounded onto the two-level grid (:func:`qparams_from_minmax`)."""
    if search not in RANGE_SEARCHES:
        raise SchemeError(f"unknown range search {search!r}; known: {', '.join(RANGE_SEARCHES)}")
    if search == "imse" and importance is None:
        raise SchemeError("the importance-weighted range search ('imse') needs per-column importance "
                          "(calibration statistics)")
    if search == "minmax":
        return compute_qparams(x, scheme)
    if search == "imse" and scheme.super_group is not None:  # llama.cpp's own search, importance-weighted
        from .kquant import search_qparams

        imp = importance.float().to(x.device).reshape(-1)
        if imp.numel() != x.shape[-1]:
            raise SchemeError(f"importance has {imp.numel()} values for {x.shape[-1]} columns")
        return search_qparams(_grouped(x.detach().float(), scheme), scheme, imp)
    x = x.detach().float()
    lo, hi = minmax(x, scheme)
    ratios = range_ratios(steps, lowest)
    imp = importance if search == "imse" else None
    if scheme.granularity == "tensor":
        return qparams_from_minmax(*search_range(lo, hi, ratios, squared_error(x, scheme, imp)), scheme)
    # rows are independent: search a few at a time, so that each ratio's round trip stays in cache
    rows = x.reshape(-1, x.shape[-1])
    step = max(1, _SEARCH_CHUNK // max(1, rows.shape[-1]))
    parts = [search_range(lo[a : a + step], hi[a : a + step], ratios, squared_error(rows[a : a + step], scheme, imp))
             for a in range(0, rows.shape[0], step)]
    return qparams_from_minmax(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), scheme)


#: Values per chunk of rows in :func:`range_qparams`'s search (a chunk's round trip fits a core's L2 cache).
_SEARCH_CHUNK = 1 << 16


def gram_error(w: torch.Tensor, gram: torch.Tensor, scheme: QuantScheme) -> RangeError:
    """Error measure for :func:`search_range`: each (row, group)'s output error ``d^T G_gg d`` for weight
    error ``d`` and the diagonal block ``G_gg`` of the inputs' Gram matrix ``G = X^T X / n`` (per channel:
    the whole of G). ``w``: (rows, K) float; per-tensor schemes are not supported."""
    if scheme.granularity not in ("group", "channel"):
        raise SchemeError("the Gram-weighted range search needs per-channel or grouped scales")
    rows, k = w.shape
    gs = group_len(scheme, k) if scheme.granularity == "group" else k
    ng = -(-k // gs)
    gb = gram.new_zeros(ng, gs, gs)  # diagonal blocks, zero-padded
    for gi in range(ng):
        a, b = gi * gs, min((gi + 1) * gs, k)
        gb[gi, : b - a, : b - a] = gram[a:b, a:b]

    def error(lo, hi):
        d = _roundtrip(w, lo, hi, scheme)
        if ng * gs > k:
            d = torch.cat([d, d.new_zeros(rows, ng * gs - k)], dim=1)
        dg = d.reshape(rows, ng, gs).transpose(0, 1)  # (groups, rows, gs): one batched product
        return (torch.bmm(dg, gb) * dg).sum(-1).T
    return error


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN/Inf, from its sum (one reduction, no mask: 10-20x faster than
    ``isfinite(t).all()`` on activations); 16-bit values are summed in float32 so that their sum cannot
    overflow where they do not."""
    if not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)))


def check_finite(w: torch.Tensor, name: str = "weight") -> None:
    if not all_finite(w):
        bad = (~torch.isfinite(w)).sum().item()
        raise InvalidWeightsError(f"{name} holds {bad} NaN/Inf value(s); fix the model before quantizing it")


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(||ref||^2 / ||ref - approx||^2)."""
    ref, approx = ref.detach().double(), approx.detach().double()
    noise = (ref - approx).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def hadamard(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of size ``n`` (a power of two): ``H H^T = I``."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype=dtype, device=device)


def rotate_blocks(x: torch.Tensor, block: int, h: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., K) times the block-diagonal Hadamard matrix ``diag(H_b, ..., H_b)`` (K a multiple of b).
    Since it is orthonormal, ``(x R)(W R)^T = x W^T``: rotating a linear's input and weight rows alike leaves
    the float product unchanged while spreading an outlier channel over its block."""
    if h is None:
        h = hadamard(block, x.dtype, x.device)
    shape = x.shape
    return (x.reshape(*shape[:-1], shape[-1] // block, block) @ h.to(x.dtype)).reshape(shape)
