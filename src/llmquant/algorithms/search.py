"""The weight range search (:func:`llmquant.schemes.primitives.range_qparams`) for the algorithms, with its
"mse" / "imse" search run in compiled code (``kernels/csrc/gptq_loop.cpp``, ``range_search``) where it
applies: fp32 weights on the CPU, uniform integer grids with fp32 scales (no k-quant two-level scales), whole
groups or per channel. The compiled search computes every candidate's qparams and round trip as the PyTorch
operations do and sums each group's error in float64; the qparams are then made from the winning ratios by
the same :func:`~llmquant.schemes.primitives.qparams_from_minmax`. Only a near-tie (two ratios whose float32
sums differ in the last bits) can go another way than the PyTorch search. ``LLMQUANT_NATIVE_SEARCH=0`` keeps
the PyTorch search."""

from __future__ import annotations

import os

import torch

from ..schemes import QuantScheme
from ..schemes import primitives as P


def _kind(scheme: QuantScheme) -> int | None:
    """range_search's qparams rule for the scheme (None: not handled there)."""
    if scheme.super_group is not None or scheme.scale_dtype != "float32" or scheme.granularity not in ("group", "channel"):
        return None
    if scheme.symmetric:  # (max|x| / ((qmax - qmin) / 2) is also the restricted grid's max|x| / qmax)
        return 1 if scheme.signed_scale else 0
    return {"int": 2, "float": 3, "min": 4}.get(scheme.zero_point)


def range_qparams(x: torch.Tensor, scheme: QuantScheme, search: str = "minmax",
                  importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`llmquant.schemes.primitives.range_qparams` (default ratios), compiled where it applies."""
    out = _compiled(x, scheme, search, importance)
    return out if out is not None else P.range_qparams(x, scheme, search, importance)


def _compiled(x, scheme, search, importance):
    """The compiled search's qparams, or None where it does not apply (bad arguments included: the PyTorch
    search gives their error)."""
    kind = _kind(scheme)
    if (search not in ("mse", "imse") or kind is None or x.dim() != 2 or x.device.type != "cpu"
            or os.environ.get("LLMQUANT_NATIVE_SEARCH") == "0"):
        return None
    k = x.shape[-1]
    gs = k if scheme.granularity == "channel" else P.group_len(scheme, k)
    imp = torch.empty(0)
    if search == "imse":
        if importance is None or importance.numel() != k:
            return None
        imp = importance.detach().float().reshape(-1).contiguous().cpu()
    if k % gs:
        return None
    from ..kernels import native

    mod = native.load()
    if mod is None:
        return None
    x = x.detach().float().contiguous()
    lo, hi = P.minmax(x, scheme)
    r = mod.range_search(x, lo.contiguous(), hi.contiguous(), imp, P.range_ratios(), gs, kind,
                         float(scheme.qmin), float(scheme.qmax))
    return P.qparams_from_minmax(lo * r, hi * r, scheme)
