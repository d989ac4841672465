"""Two-level scales: llama.cpp's k-quant grids (ggml-common.h ``block_q2_K`` .. ``block_q6_K``).

A super-block of ``super_group`` values (256) holds ``n = super_group / group_size`` groups. Each group's
scale is an fp16 super-scale ``d`` times a small integer ``sc``; asymmetric schemes also keep a float minimum
per group, ``-(dmin * mc)`` with an fp16 ``dmin`` and an unsigned integer ``mc``::

    symmetric (Q3_K, Q6_K)     x = (d * sc) * c                  sc signed, sub_scale_bits bits
    minimum   (Q2_K, Q4_K/5_K) x = (d * sc) * q - dmin * mc      sc, mc unsigned, sub_scale_bits bits

Both products ``d * sc`` and ``dmin * mc`` are exact in float32 (11 + 8 significant bits at most), so
storing them as float32 group scales (and ``-(dmin * mc)`` as the float minimum of ``zero_point="min"``)
lets every existing path (codes, kernels, GPTQ's columns) compute exactly what llama.cpp computes.

The scales are chosen as ``quantize_row_q*_K_ref`` does: first each group's float scale (and minimum,
at most 0) by llama.cpp's search (:func:`search_qparams`: ``make_qkx2_quants`` for the minimum types,
``make_qx_quants`` for Q6_K and, here, Q3_K), or by min-max from ranges (:func:`kquant_qparams`, for
observers); then ``d = s_e / -2^(b-1)`` for the signed extreme ``s_e`` of the group scales (symmetric)
or ``d = max s / (2^b - 1)`` (unsigned), rounded to fp16, and ``sc = round(s / d)`` on the integer grid.
Unlike llama.cpp, ``sc`` is never 0 (a zero group scale would divide by zero when rounding codes; 1 costs
nothing), and ``sc`` is rounded against the fp16 ``d``. The codes are then rounded to nearest on the
final grid. On a tiny model's tensor the squared error is within 3% of llama.cpp's own quantizer's
(tests/test_llama_cpp.py).
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
    mc = torch.where(dmin > 0, v / torch.where(dmin > 0, dmin, 1.0), 0.0).round().clamp(0, hi) + 0.0  # no -0
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


# ---- llama.cpp's per-group scale search (ggml-quants.c make_qkx2_quants / make_qx_quants) -------------------
#: (rmin, rdelta, nstep, squared error) of make_qkx2_quants per bits, as quantize_row_q{2,4,5}_K_ref call it
_QKX2 = {2: (-0.5, 0.1, 15, False), 4: (-1.0, 0.1, 20, True), 5: (-0.5, 0.1, 15, True)}


def _search_min(x: torch.Tensor, nmax: int, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qkx2_quants on groups ``x`` (N, g): per group the scale ``s`` and minimum ``lo <= 0`` of
    ``x ~ s * L + lo`` with the least weighted error (weights ``sqrt(mean x^2) + |x|``; ``|x|`` and absolute
    error for 2 bits), trying ``(nmax + rmin + rdelta * i) / (max - min)`` for ``i = 0..nstep``. Given
    ``weights`` (N, g) (an importance matrix's, :func:`importance_weights`): squared error weighted by them,
    as llama.cpp's imatrix path (``make_qkx3_quants``)."""
    rmin, rdelta, nstep, squared = _QKX2.get(nmax.bit_length(), _QKX2[4])
    if weights is not None:
        w, squared = weights, True
    else:
        w = x.abs() if not squared else x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True)
    rng = (hi - lo).clamp(min=1e-30)
    sw, sx = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)

    def err(s, m, L):
        d = s * L + m - x
        return (w * (d * d if squared else d.abs())).sum(-1, keepdim=True)

    L = ((x - lo) * (nmax / rng)).round().clamp(0, nmax)
    best_s, best_m = rng / nmax, lo
    best = err(best_s, best_m, L)
    for i in range(nstep + 1):
        L = ((x - lo) * ((rmin + rdelta * i + nmax) / rng)).round().clamp(0, nmax)
        sl, sl2, sxl = (w * L).sum(-1, keepdim=True), (w * L * L).sum(-1, keepdim=True), (w * L * x).sum(-1, keepdim=True)
        det = sw * sl2 - sl * sl
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        s = (sw * sxl - sx * sl) / det
        m = (sl2 * sx - sl * sxl) / det
        pos = m > 0  # the minimum stays at or below 0: refit the scale alone
        s = torch.where(pos, sxl / sl2.clamp(min=1e-30), s)
        m = torch.where(pos, torch.zeros_like(m), m)
        e = err(s, m, L)
        better = ok & (e < best)
        best, best_s, best_m = torch.where(better, e, best), torch.where(better, s, best_s), torch.where(better, m, best_m)
    flat = hi == lo
    return torch.where(flat, torch.zeros_like(best_s), best_s), torch.where(flat, lo, best_m)


def _search_sym(x: torch.Tensor, nmax: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """make_qx_quants (rmse_type 1): per group the signed scale ``s`` of ``x ~ s * c``, ``c`` in
    [-nmax, nmax - 1], maximizing ``(sum w x c)^2 / sum w c^2`` with ``w = x^2`` (or the given ``weights``)
    over the starting points ``-(nmax + 0.1 i) / x_e``, ``i = -9..9``, ``x_e`` the group's signed extreme."""
    w = x * x if weights is None else weights
    i = x.abs().argmax(-1, keepdim=True)
    ext = x.gather(-1, i)
    ext = torch.where(ext == 0, torch.ones_like(ext), ext)
    best_s = best = None
    for k in [0] + [k for k in range(-9, 10) if k]:
        c = (x * (-(nmax + 0.1 * k) / ext)).round().clamp(-nmax, nmax - 1)
        slx, sl2 = (w * x * c).sum(-1, keepdim=True), (w * c * c).sum(-1, keepdim=True)
        s = slx / sl2.clamp(min=1e-30)
        score = s * slx
        if best is None:
            best_s, best = s, score
        else:
            better = (sl2 > 0) & (score > best)
            best_s, best = torch.where(better, s, best_s), torch.where(better, score, best)
    return best_s


def importance_weights(xg: torch.Tensor, importance: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Per-value error weights from per-column ``importance`` (K,) (mean squared inputs, an importance
    matrix), as llama.cpp's k-quant quantizers form them with an imatrix: ``imp * sqrt(sigma2 + x^2)``,
    ``sigma2`` twice the mean square of the value's super-block. ``xg``: (rows, G, group)."""
    rows, g, n = xg.shape
    per = scheme.super_group // n  # groups per super-block
    sigma2 = 2 * xg.float().pow(2).reshape(rows, g // per, per * n).mean(-1, keepdim=True)
    sigma2 = sigma2.expand(rows, g // per, per * n).reshape(rows, g, n)
    return importance.float().reshape(1, g, n) * (sigma2 + xg.float().pow(2)).sqrt()


def search_qparams(xg: torch.Tensor, scheme: QuantScheme,
                   importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """llama.cpp's k-quant group search on grouped weights ``xg`` (rows, G, group), then the two-level
    rounding: what :func:`llmquant.schemes.compute_qparams` gives a k-quant scheme. ``importance`` (K,):
    the search weighted as llama.cpp's quantizers weight it with an importance matrix
    (:func:`importance_weights`; the range search "imse")."""
    rows, g, n = xg.shape
    x = xg.reshape(rows * g, n).float()
    w = None if importance is None else importance_weights(xg, importance, scheme).reshape(rows * g, n)
    if scheme.symmetric:
        s = _search_sym(x, -scheme.qmin, w).reshape(rows, g)
        return two_level_scales(s, scheme)[0], None
    s, lo = _search_min(x, scheme.qmax, w)
    m, _ = two_level_minima(-lo.reshape(rows, g), scheme)
    return two_level_scales(s.reshape(rows, g), scheme)[0], -m
