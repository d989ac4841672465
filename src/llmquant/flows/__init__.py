"""Flows: orchestration of algorithms over a model (which modules, in which order, with what data).

``quantize(model, config)`` (:mod:`.registry`) is the one entry point: ``config.method`` picks a
registered :class:`Method`. Layer-wise methods run on the pipeline (:mod:`.pipeline`, stages in
:mod:`.stages`); the PyTorch-style faces (``prepare``/``convert``, ``quantize_dynamic``,
``prepare_qat``/``convert_qat``, plans) share the handlers.
"""

from .summary import LayerSummary, QuantSummary
from .registry import METHODS, Method, get_method, needs_calibration, quantize, register_method
from .calibrate import calibrate, convert, prepare, quantize_static, unprepare
from .dynamic import quantize_dynamic
from .qat import convert_qat, prepare_qat
from .qat_train import QATResult, train_qat
from . import distributed  # noqa: F401
from . import methods as _methods  # noqa: F401  (registers the built-in methods)

__all__ = ["LayerSummary", "METHODS", "Method", "QuantSummary", "get_method", "needs_calibration", "quantize",
           "register_method", "prepare", "convert", "calibrate", "quantize_static", "unprepare", "quantize_dynamic",
           "QATResult", "convert_qat", "prepare_qat", "train_qat"]
