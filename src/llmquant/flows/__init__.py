"""Flows: orchestration of algorithms over a model (which modules, in which order, with what data)."""

from .ptq import QuantSummary, quantize
from .sequential import CalibratedSummary, quantize_calibrated
from .calibrate import calibrate, convert, prepare, quantize_static, unprepare
from .dynamic import quantize_dynamic
from .qat import convert_qat, prepare_qat
from .qat_train import QATResult, train_qat

__all__ = ["CalibratedSummary", "QuantSummary", "quantize", "quantize_calibrated", "prepare", "convert", "calibrate",
           "quantize_static", "unprepare", "quantize_dynamic", "QATResult", "convert_qat",
           "prepare_qat", "train_qat"]
