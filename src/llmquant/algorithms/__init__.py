"""Quantization algorithms: pure math on tensors (and statistics) -> integer codes and qparams."""

from .rtn import rtn_quantize

ALGORITHMS = {"rtn": rtn_quantize}

__all__ = ["ALGORITHMS", "rtn_quantize"]
