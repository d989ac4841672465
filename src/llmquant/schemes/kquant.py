"""Two-level scales: llama.cpp's k-quant grids (ggml-common.h ``block_q2_K`` .. ``block_q6_K``).

A super-block of ``super_group`` values (256) holds ``n = super_group / group_size`` groups. Each group's
scale is an fp16 super-scale ``d`` times a small integer ``sc``; asymmetric schemes also keep a float minimum
per group, ``-(dmin * mc)`` with an fp16 ``dmin`` and an unsigned integer ``mc``::

    symmetric (Q3_K, Q6_K)     x = (d * sc) * c                  sc signed, sub_scale_bits bits
    minimum   (Q2_K, Q4_K/5_K) x = (d * sc) * q - dmin * mc      sc, mc unsigned, sub_scale_bits bits

Both products ``d * sc`` and ``dmin * mc`` are exact in float32 (11 + 8 significant bits at most), so
storing them as float32 group scales (and ``-(dmin * mc)`` as the float minimum of ``zero_point="min"``)
lets every existing path (codes, kernels, GPTQ's columns) compute exactly what llama.cpp computes.

The super-scales are chosen as ``quantize_row_q*_K_ref`` does: first the per-group float scale (and
minimum, clamped to at most 0) by min-max, then ``d = s_e / -2^(b-1)`` for the signed extreme ``s_e`` of
the group scales (symmetric) or ``d = max s / (2^b - 1)`` (unsigned), rounded to fp16, and
``sc = round(s / d)`` on the integer grid. Unlike llama.cpp, ``sc`` is never 0 (a zero group scale would
divide by zero when rounding codes; 1 costs nothing), and ``sc`` is rounded against the fp16 ``d``.
"""

from __future__ import annotations

import torch

from .scheme import QuantScheme

FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal): the super-scale of an all-zero super-block


def sub_scale_range(scheme: QuantScheme) -> tuple[int, int]:
    """Integer range of the group scale multipliers ``sc`` (and, unsigned, of the minima ``mc``)."""
    b = scheme.sub_scale_bits
    return (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if scheme.symmetric else (0, 2**b - 1)


def _super_view(p: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """(rows, G) -> (rows, S, n), zero-padding the last super-block; returns the view and G."""
    rows, g = p.shape
    pad = -g % n
    if pad:
        p = torch.cat([p, p.new_zeros(rows, pad)], dim=1)
    return p.reshape(rows, -1, n), g


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def two_level_scales(s: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales ``s`` (rows, G) rounded onto the two-level grid: ``(d * sc, d)`` with ``d`` (rows, S)
    the fp16 super-scales (as float32) and ``d * sc`` (rows, G) float32."""
    n = scheme.super_group // scheme.group_size
    lo, hi = sub_scale_range(scheme)
    v, g = _super_view(s.float(), n)
    if scheme.symmetric:
        i = v.abs().argmax(dim=-1, keepdim=True)
        d = _fp16(v.gather(-1, i) / lo)
    else:
        d = _fp16(v.amax(dim=-1, keepdim=True) / hi)
    d = torch.where(d == 0, torch.full_like(d, FP16_TINY), d)
    sc = (v / d).round().clamp(lo, hi)
    sc = torch.where(sc == 0, torch.ones_like(sc), sc)
    return (d * sc).reshape(s.shape[0], -1)[:, :g], d.squeeze(-1)


def two_level_minima(m: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Group minima magnitudes ``m >= 0`` (rows, G) rounded onto ``dmin * mc``: ``(dmin * mc, dmin)``."""
    n = scheme.super_group // scheme.group_size
    _, hi = sub_scale_range(scheme)
    v, g = _super_view(m.float(), n)
    dmin = _fp16(v.amax(dim=-1, keepdim=True) / hi)
    mc = torch.where(dmin > 0, v / torch.where(dmin > 0, dmin, 1.0), 0.0).round().clamp(0, hi)
    return (dmin * mc).reshape(m.shape[0], -1)[:, :g], dmin.squeeze(-1)


def kquant_qparams(xmin: torch.Tensor, xmax: torch.Tensor, scheme: QuantScheme
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and float minimum, ``zero_point="min"``) per (row, group) on the scheme's two-level grid,
    from per-group ranges (rows, G); float32 as the scheme stores them."""
    if scheme.symmetric:  # signed extreme of each group onto qmin (llama.cpp's make_qx_quants start)
        ext = torch.where(xmin.abs() >= xmax.abs(), xmin, xmax)
        s = ext / scheme.qmin if scheme.signed_scale else torch.maximum(xmin.abs(), xmax.abs()) / (
            (scheme.qmax - scheme.qmin) / 2)
        return two_level_scales(s, scheme)[0], None
    lo = xmin.clamp(max=0)  # llama.cpp keeps the minimum at or below 0 (stored as a positive dmin * mc)
    s = (xmax - lo) / (scheme.qmax - scheme.qmin)
    m, _ = two_level_minima(-lo, scheme)
    return two_level_scales(s, scheme)[0], -m
