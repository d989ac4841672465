"""Histogram observers: percentile, minimum-MSE and minimum-KL (entropy) range selection.

All three keep one histogram per range to estimate (2048 bins, as PyTorch's ``HistogramObserver`` and
TensorRT's calibrators do; the range grows with the data and old counts are re-binned), plus the exact
extremes. For symmetric schemes the histogram covers ``[-a, a]`` so it folds exactly into one of ``|x|``.
They differ only in how a clipping range is picked from it:

* **percentile** (TensorRT "percentile" calibration): the range holding ``p`` % of the values; symmetric:
  the p-th percentile of ``|x|``; asymmetric: the ``(100 - p)`` and ``p`` percentiles.
* **mse**: minimise the expected squared error ``E = sum_b n_b e_b`` over shrunken ranges ``f (lo, hi)``,
  with ``e_b = s^2 / 12`` for a bin inside the grid (uniform rounding noise of step ``s``) and
  ``(x_b - edge)^2`` for a clipped one (as llm-compressor's MSE observer searches shrink factors, with the
  error evaluated on the histogram instead of stored samples; the search is
  :func:`llmquant.schemes.primitives.search_range`, shared with QAT's init and AWQ's clipping).
* **histogram** / **kl** / **entropy** (Migacz, "8-bit Inference with TensorRT", GTC 2017): minimise
  ``KL(P || Q)`` where ``P`` is the clipped histogram with the clipped mass folded into its edge bins and
  ``Q`` the same bins merged into the grid's ``2^b`` levels and spread back over their non-empty bins.
"""

from __future__ import annotations

import math

import torch

from ..errors import SchemeError
from ..schemes import qparams_from_minmax
from ..schemes.primitives import search_range
from .base import Observer, make_observer, register_observer
from .minmax import MinMaxObserver

DEFAULT_BINS = 2048  # per tensor; per row / group (weights: few values per range) 512, to keep the search fast
ROW_BINS = 512


class HistogramObserver(Observer):
    """Histogram state shared by the range-selection rules; subclasses implement :meth:`_select`."""

    def __init__(self, scheme, ch_axis=None, label="", bins: int | None = None):
        super().__init__(scheme, ch_axis, label)
        bins = bins or (DEFAULT_BINS if self.ch_axis is None else ROW_BINS)
        self.bins = int(bins) + int(bins) % 2  # even, so a symmetric histogram folds exactly
        self.hist: torch.Tensor | None = None  # (C, bins) float64 counts
        self.lo: torch.Tensor | None = None  # (C,) histogram range
        self.hi: torch.Tensor | None = None
        self.min_val: torch.Tensor | None = None  # exact extremes
        self.max_val: torch.Tensor | None = None

    # ---- accumulation ---------------------------------------------------------------------------
    def _bin(self, xc: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, weights: torch.Tensor | None = None):
        c, b = xc.shape[0], self.bins
        w = (hi - lo).clamp(min=1e-12)
        idx = ((xc - lo[:, None]) / w[:, None] * b).floor_().clamp_(0, b - 1).long()
        idx += (torch.arange(c, device=xc.device) * b)[:, None]
        counts = torch.bincount(idx.reshape(-1), weights=None if weights is None else weights.reshape(-1), minlength=c * b)
        return counts.reshape(c, b).double()

    def _update(self, xc: torch.Tensor) -> None:
        mn, mx = xc.amin(dim=1), xc.amax(dim=1)
        if self.min_val is None:
            self.min_val, self.max_val = mn, mx
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, mn), torch.maximum(self.max_val, mx)
        lo, hi = self.min_val, self.max_val
        if self.scheme.symmetric:
            a = torch.maximum(lo.abs(), hi.abs())
            lo, hi = -a, a
        if self.hist is None:
            self.lo, self.hi = lo.clone(), hi.clone()
            self.hist = torch.zeros(xc.shape[0], self.bins, dtype=torch.float64, device=xc.device)
        elif bool((lo < self.lo).any() or (hi > self.hi).any()):
            # re-bin the old counts at their bin centres into the wider range
            self.hist = self._bin(self.centers().float(), lo, hi, weights=self.hist)
            self.lo, self.hi = lo.clone(), hi.clone()
        self.hist += self._bin(xc, self.lo, self.hi)

    def centers(self) -> torch.Tensor:
        """(C, bins) bin centres in float64."""
        lo, hi = self.lo.double()[:, None], self.hi.double()[:, None]
        t = (torch.arange(self.bins, dtype=torch.float64, device=lo.device) + 0.5) / self.bins
        return lo + t * (hi - lo)

    # ---- selection ------------------------------------------------------------------------------
    def _range(self):
        lo, hi = self._select()
        return lo.float(), hi.float()

    def _select(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def derive(self, spec: str) -> Observer:
        """Another histogram-family (or min-max) observer holding this one's statistics, so one calibration
        pass can be turned into ranges by several rules."""
        new = make_observer(spec, self.scheme, ch_axis=self.ch_axis, label=self.label)
        if isinstance(new, HistogramObserver):
            if new.bins != self.bins:
                raise SchemeError("derived histogram observers must use the same number of bins")
            for k in ("hist", "lo", "hi", "min_val", "max_val"):
                setattr(new, k, getattr(self, k))
        elif type(new) is MinMaxObserver:
            new.min_val, new.max_val = self.min_val, self.max_val
        else:
            raise SchemeError(f"a {new.name} observer cannot be derived from histogram statistics; calibrate with it")
        new.out_shape, new.count = self.out_shape, self.count
        return new


def _quantile_pos(counts: torch.Tensor, q: float) -> torch.Tensor:
    """Position in bin units (0..n, interpolated inside the bin) of the q-quantile of each row of counts."""
    total = counts.sum(dim=1, keepdim=True).clamp(min=1e-300)
    cdf = counts.cumsum(dim=1) / total
    j = torch.searchsorted(cdf, torch.full_like(cdf[:, :1], q)).clamp(max=counts.shape[1] - 1)
    prev = torch.where(j > 0, cdf.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(j, dtype=cdf.dtype))
    h = cdf.gather(1, j) - prev
    frac = torch.where(h > 0, (q - prev) / h.clamp(min=1e-300), torch.ones_like(h)).clamp(0, 1)
    return (j + frac).squeeze(1)


@register_observer("percentile")
class PercentileObserver(HistogramObserver):
    arg_name = "percentile"

    def __init__(self, scheme, ch_axis=None, label="", percentile: float = 99.99, bins: int | None = None):
        super().__init__(scheme, ch_axis, label, bins)
        if not 50 < percentile <= 100:
            raise SchemeError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = float(percentile)

    def _select(self):
        p = self.percentile / 100
        width = (self.hi - self.lo).double()
        if self.scheme.symmetric:
            half = self.bins // 2
            folded = self.hist[:, half:] + self.hist[:, :half].flip(1)  # |x| in bins of width a / half
            t = _quantile_pos(folded, p) * (width / 2) / half
            return -t, t
        step = width / self.bins
        lo = self.lo.double() + _quantile_pos(self.hist, 1 - p) * step
        hi = self.lo.double() + _quantile_pos(self.hist, p) * step
        return lo, hi


@register_observer("mse")
class MSEObserver(HistogramObserver):
    arg_name = "min_fraction"

    def __init__(self, scheme, ch_axis=None, label="", min_fraction: float = 0.01, grid: int = 200,
                 bins: int | None = None):
        super().__init__(scheme, ch_axis, label, bins)
        if not 0 < min_fraction <= 1:
            raise SchemeError(f"the smallest shrink fraction must be in (0, 1], got {min_fraction}")
        grid = grid if self.ch_axis is None else grid // 2
        self.fractions = torch.logspace(0, math.log10(min_fraction), grid, dtype=torch.float64)

    def expected_error(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Expected squared quantization error per row when the range is (lo, hi)."""
        s = self.scheme
        scale, zero = qparams_from_minmax(lo.float(), hi.float(), s)
        scale = scale.double()
        z = torch.zeros_like(scale) if zero is None else zero.double()
        gmin, gmax = ((s.qmin - z) * scale)[:, None], ((s.qmax - z) * scale)[:, None]
        c = self.centers()
        err = torch.where(c < gmin, (c - gmin) ** 2, torch.where(c > gmax, (c - gmax) ** 2, (scale**2 / 12)[:, None]))
        return (self.hist * err).sum(dim=1)

    def _select(self):
        return search_range(self.lo.double(), self.hi.double(), self.fractions.tolist(), self.expected_error)


@register_observer("histogram", "kl", "entropy")
class EntropyObserver(HistogramObserver):
    arg_name = "candidates"

    def __init__(self, scheme, ch_axis=None, label="", candidates: float = 128, bins: int | None = None):
        super().__init__(scheme, ch_axis, label, bins)
        self.levels = scheme.qmax - scheme.qmin + 1
        if self.bins < 2 * self.levels:
            raise SchemeError(f"the KL observer needs at least {2 * self.levels} bins for {scheme.bits}-bit grids")
        self.candidates = int(candidates) if self.ch_axis is None else max(8, int(candidates) // 4)

    def kl(self, i0: torch.Tensor, i1: torch.Tensor) -> torch.Tensor:
        """KL(P || Q) per row for the clipping range of bins [i0, i1)."""
        h, levels = self.hist, self.levels
        b = torch.arange(self.bins, device=h.device)[None, :]
        i0, i1 = i0[:, None], i1[:, None]
        inr = (b >= i0) & (b < i1)
        inside = h * inr
        p = inside.clone()
        p.scatter_add_(1, i0, (h * (b < i0)).sum(1, keepdim=True))  # clipped mass into the edge bins
        p.scatter_add_(1, i1 - 1, (h * (b >= i1)).sum(1, keepdim=True))
        level = ((b - i0).clamp(min=0) * levels // (i1 - i0)).clamp(max=levels - 1)
        nz = (p > 0) & inr
        mass = torch.zeros(h.shape[0], levels, dtype=h.dtype, device=h.device).scatter_add_(1, level, inside)
        cnt = torch.zeros_like(mass).scatter_add_(1, level, nz.to(h.dtype))
        q = torch.where(nz, mass.gather(1, level) / cnt.gather(1, level).clamp(min=1), torch.zeros_like(h))
        p = p / p.sum(1, keepdim=True).clamp(min=1e-300)
        q = q / q.sum(1, keepdim=True).clamp(min=1e-300)
        q = torch.where(nz, q.clamp(min=1e-7), q)  # smoothing: a clipped edge bin with no in-range mass
        return torch.where(p > 0, p * (p / q.clamp(min=1e-300)).log(), torch.zeros_like(p)).sum(1)

    def _select(self):
        n, levels = self.bins, self.levels
        lo, width = self.lo.double(), (self.hi - self.lo).double()
        # candidate clipping ranges f (lo, hi) in bin units, from the full range down to one of `levels` bins
        zero_pos = (-lo / width.clamp(min=1e-300) * n).clamp(0, n)
        best = torch.full_like(lo, float("inf"))
        best_i0, best_i1 = torch.zeros_like(lo).long(), torch.full_like(lo, n).long()
        for f in torch.linspace(1.0, levels / n, self.candidates, dtype=torch.float64):
            i0 = (zero_pos * (1 - f)).round().long()
            i1 = (zero_pos + f * (n - zero_pos)).round().long()
            i1 = torch.maximum(i1, (i0 + levels).clamp(max=n))
            i0 = torch.minimum(i0, i1 - levels)
            e = self.kl(i0, i1)
            better = e < best
            best = torch.where(better, e, best)
            best_i0, best_i1 = torch.where(better, i0, best_i0), torch.where(better, i1, best_i1)
        step = width / n
        return lo + best_i0 * step, lo + best_i1 * step
