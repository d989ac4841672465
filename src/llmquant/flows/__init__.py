"""Flows: orchestration of algorithms over a model (which modules, in which order, with what data)."""

from .ptq import QuantSummary, quantize
from .sequential import CalibratedSummary, quantize_calibrated

__all__ = ["CalibratedSummary", "QuantSummary", "quantize", "quantize_calibrated"]
