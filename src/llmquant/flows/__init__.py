"""Flows: orchestration of algorithms over a model (which modules, in which order, with what data)."""

from .ptq import QuantSummary, quantize
from .calibrate import calibrate, convert, prepare, quantize_static, unprepare

__all__ = ["QuantSummary", "quantize", "prepare", "convert", "calibrate", "quantize_static",
           "unprepare"]
