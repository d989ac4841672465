"""Flows: orchestration of algorithms over a model (which modules, in which order, with what data)."""

from .ptq import QuantSummary, quantize
from .dynamic import quantize_dynamic

__all__ = ["QuantSummary", "quantize", "quantize_dynamic"]
