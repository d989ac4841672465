"""Round-to-nearest (RTN) weight quantization.

The baseline every calibrated method is judged against (e.g. Frantar et al., "GPTQ", 2022, Table 1;
Dettmers et al., "LLM.int8()", 2022): per (row, group) min-max qparams, e.g. asymmetric
``s = (max - min) / (qmax - qmin)``, ``z = qmin - round(min / s)``, then ``q = clamp(round(W / s) + z, qmin, qmax)``
(all grid conventions in :mod:`llmquant.schemes.primitives`). With a range search (``observer="mse"`` /
``"imse"``) each (row, group) range is first shrunk to the one of least (importance-weighted) squared
rounding error, :func:`llmquant.schemes.primitives.range_qparams`; with ``importance = diag(X^T X) / n``
the weighted error ``sum_k imp_k (w_k - q_k)^2`` is the output error ``E||(w - q) x||^2`` of the row for
uncorrelated inputs (the "importance matrix" of llama.cpp's quantizers).
"""

from __future__ import annotations

import torch

from ..schemes import QuantScheme, check_finite, quantize_to_int
from .search import range_qparams


def rtn_quantize(
    weight: torch.Tensor, scheme: QuantScheme, name: str = "weight", *, observer: str = "minmax",
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integer codes (int16, shaped like ``weight``), scale and zero point (None if symmetric).
    ``observer``: the range search ("minmax", "mse", "imse"); ``importance`` (in_features,): the per-input
    weights "imse" needs."""
    w = weight.detach().float()
    check_finite(w, name)
    scale, zero = range_qparams(w, scheme, observer, importance)
    q = quantize_to_int(w, scale, zero, scheme)
    return q, scale, zero
