"""The built-in methods, registered with :mod:`llmquant.flows.registry` (the one list of what
``QuantConfig(method=...)`` can name out of the box)."""

from __future__ import annotations

from ..schemes import AWQParams, BlockQATParams, GPTQParams, Plan, QATParams, RTNParams
from ..schemes import AutoRoundParams, HQQParams
from .autoround import AutoRoundStage
from .blockqat import BlockQATStage
from .calibrate import run_static
from .dynamic import run_dynamic
from .hqq import HQQStage
from .mixed.apply import run_plan
from .pipeline import run_stages
from .qat import run_qat
from .registry import Method, register_method
from .stages import AWQStage, GPTQStage, RTNStage


def _layerwise(model, cfg, calib=None, progress=True):
    return run_stages(model, cfg, calib, progress=progress)


for _m in (
    Method("rtn", _layerwise, params=RTNParams, stage=RTNStage,
           doc="round to nearest; min-max or searched ranges (no data), or importance-weighted (calibrated)"),
    Method("gptq", _layerwise, params=GPTQParams, calibrated=True, stage=GPTQStage,
           doc="GPTQ (Frantar et al. 2022), layer by layer"),
    Method("awq", _layerwise, params=AWQParams, calibrated=True, stage=AWQStage,
           doc="AWQ (Lin et al. 2024) scales and clipping, layer by layer"),
    Method("static", run_static, calibrated=True, doc="static activation scales from observers (W8A8)"),
    Method("smoothquant", run_static, calibrated=True, doc="SmoothQuant (Xiao et al. 2023), then static W8A8"),
    Method("dynamic", run_dynamic, doc="weights ahead of time, activation scales per input at run time"),
    Method("qat", run_qat, params=QATParams, streams=False,
           doc="quantization-aware training (distillation), then convert"),
    Method("blockqat", _layerwise, params=BlockQATParams, calibrated=True, stage=BlockQATStage,
           doc="block-wise QAT (EfficientQAT's Block-AP): each layer trained to its float outputs, layer by layer"),
    Method("hqq", _layerwise, params=HQQParams, stage=HQQStage,
           doc="HQQ (Badri & Shaji 2023): half-quadratic zero point / scale optimization per group; no data"),
    Method("autoround", _layerwise, params=AutoRoundParams, calibrated=True, stage=AutoRoundStage,
           doc="AutoRound (Cheng et al. 2023): rounding and ranges by signed gradient descent, layer by layer"),
    Method("plan", run_plan, params=Plan, doc="a mixed-precision plan: one format per layer"),
):
    register_method(_m)
