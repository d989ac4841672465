"""Flows: orchestration of algorithms over a model (which modules, in which order, with what data)."""

from .ptq import QuantSummary, quantize

__all__ = ["QuantSummary", "quantize"]
