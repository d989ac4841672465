"""Flows: orchestration of algorithms over a model (which modules, in which order, with what data)."""

from .ptq import QuantSummary, quantize
from .qat import convert_qat, prepare_qat
from .qat_train import QATResult, train_qat

__all__ = ["QATResult", "QuantSummary", "convert_qat", "prepare_qat", "quantize", "train_qat"]
