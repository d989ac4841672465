"""Quantized modules, module selection, and what a module stores."""

from .quant_linear import QuantLinear
from .selection import matches, select_linears, replace_module
from .float_modules import FloatEmbedding, FloatLinear
from .quant_embedding import QuantEmbedding
from .storage import is_packed, stored_tensors, tensor_bytes, unique_stored, weights_held

#: Module types besides QuantLinear that the folder format rebuilds from their manifest entry.
MANIFEST_MODULES = {c.__name__: c for c in (FloatLinear, FloatEmbedding, QuantEmbedding)}

__all__ = ["QuantLinear", "matches", "select_linears", "replace_module", "MANIFEST_MODULES", "FloatEmbedding",
           "FloatLinear", "QuantEmbedding", "is_packed", "stored_tensors", "tensor_bytes", "unique_stored",
           "weights_held"]
