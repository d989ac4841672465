"""Round-to-nearest (RTN) weight quantization.

The baseline every calibrated method is judged against (e.g. Frantar et al., "GPTQ", 2022, Table 1;
Dettmers et al., "LLM.int8()", 2022): per (row, group) min-max qparams, e.g. asymmetric
``s = (max - min) / (qmax - qmin)``, ``z = qmin - round(min / s)``, then ``q = clamp(round(W / s) + z, qmin, qmax)``
(all grid conventions in :mod:`llmquant.schemes.primitives`).
"""

from __future__ import annotations

import torch

from ..schemes import QuantScheme, check_finite, compute_qparams, quantize_to_int


def rtn_quantize(
    weight: torch.Tensor, scheme: QuantScheme, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Integer codes (int16, shaped like ``weight``), scale and zero point (None if symmetric)."""
    w = weight.detach().float()
    check_finite(w, name)
    scale, zero = compute_qparams(w, scheme)
    q = quantize_to_int(w, scale, zero, scheme)
    return q, scale, zero
