"""Quantized modules and module selection."""

from .quant_linear import QuantLinear
from .selection import matches, select_linears, replace_module

__all__ = ["QuantLinear", "matches", "select_linears", "replace_module"]

from .mixed import MIXED_MODULES, FloatEmbedding, FloatLinear, QuantEmbedding  # noqa: E402

__all__ += ["MIXED_MODULES", "FloatEmbedding", "FloatLinear", "QuantEmbedding"]
