"""Accuracy and size measurements: perplexity, KL to the unquantized model, top-1 agreement, packed size."""

from .metrics import EvalResult, ReferenceLogits, evaluate
from .size import SizeInfo, model_size

__all__ = ["EvalResult", "ReferenceLogits", "evaluate", "SizeInfo", "model_size"]
