"""Apply a mixed-precision :class:`~llmquant.schemes.Plan` to a model, in place.

Each module the plan selects becomes a :class:`QuantLinear` (integer schemes, made by the plan's method),
a :class:`FloatLinear` (bf16/fp16), or, for embeddings, a :class:`QuantEmbedding` / :class:`FloatEmbedding`.
A tied embedding and output head given the same format keep sharing one stored tensor (saved once, as
llama.cpp does); given different formats they are untied first.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn

from ...algorithms import ALGORITHMS, rtn_quantize
from ...errors import SchemeError
from ...modules import QuantLinear
from ...schemes import FloatFormat, Plan, QuantConfig, QuantScheme, format_name, resolve_plan
from ..heads import build_heads, build_module, head_names
from ..pipeline import run_stages
from ..stages import (AWQStage, GPTQStage, LayerContext, Stage, imatrix_importance, make_quant_linear, rtn_result,
                      rtn_weighted)
from ..summary import QuantSummary

log = logging.getLogger(__name__)


def plan_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Every module a plan can name, in model order: the Linears and the Embeddings."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


def apply_plan(model: nn.Module, plan, *, calib=None, calibration=None, progress: bool = True,
               train: dict | None = None) -> QuantSummary:
    """Quantize ``model`` in place as ``plan`` (a Plan, its dict, or a .json path) says; returns a summary.
    A GPTQ or AWQ plan (``plan.method`` "gptq" / "awq") needs ``calib`` (token ids, windows x seq_len); ``calibration``:
    its :class:`CalibSpec` (batching, sequential; None: the defaults). A QAT plan trains the plan's formats
    (:func:`_apply_plan_qat`; ``train``: more keywords for :func:`llmquant.train_qat`, e.g. checkpoints)."""
    plan: Plan = resolve_plan(plan)
    if plan.method == "qat":
        return _apply_plan_qat(model, plan, progress, train or {})
    with torch.no_grad():
        return _apply(model, plan, calib, calibration, progress)


def _apply(model: nn.Module, plan: Plan, calib, calibration, progress: bool) -> QuantSummary:
    if plan.calibrated and calib is None:
        raise SchemeError(f"a {plan.method} plan needs calibration data: pass calib= (token ids), or use "
                          "llmquant.quantize(model, plan), which makes them from the default text")
    algo = ALGORITHMS.get(plan.method, rtn_quantize)  # GPTQ / AWQ plans: the embedding and the head by RTN
    if plan.method == "rtn" and plan.params is not None:
        algo = _rtn_with(plan.params, model)
    heads = head_names(model)
    assign = {n: f for n, f in plan.resolve(plan_targets(model), heads).items() if f != FloatFormat("float32")}
    t0 = time.perf_counter()
    # the linears that are neither the head nor the embedding run on the pipeline (layer by layer; data-free
    # for RTN); the embedding and the head (tied or not) after them (heads.build_heads)
    cfg = QuantConfig(method="plan", method_params=plan, calibration=calibration if plan.calibrated else None)
    calibrated = {"gptq": PlanGPTQStage, "awq": PlanAWQStage}
    stage = calibrated[plan.method](cfg, plan.params, assign) if plan.method in calibrated else PlanStage(cfg, assign, algo)
    layer_linears = [n for n, m in model.named_modules() if n in assign and n not in heads and isinstance(m, nn.Linear)]
    summary = QuantSummary(method=f"plan:{plan.method}", config=plan.to_dict())
    if layer_linears:
        inner = run_stages(model, stage.cfg, calib if plan.calibrated else None, progress=progress, stages=[stage],
                           names=layer_linears)
        summary.layers, summary.peak_memory_mb = inner.layers, inner.peak_memory_mb
        summary.layer_errors, summary.rtn_fallback = inner.layer_errors, inner.rtn_fallback
        del model.llmquant_config  # a plan model's recipe is its plan (model.llmquant_plan)
    summary.untied_lm_head = build_heads(model, {n: f for n, f in assign.items() if n not in layer_linears}, algo,
                                         summary)
    position = {n: k for k, n in enumerate(assign)}
    summary.layers.sort(key=lambda r: position[r.name])
    summary.seconds = time.perf_counter() - t0
    log.info("%s", summary)
    model.llmquant_plan = plan
    return summary


def _apply_plan_qat(model: nn.Module, plan: Plan, progress: bool, train: dict) -> QuantSummary:
    """The plan's formats trained end to end: the plan made by RTN (least-squares clipping for
    ``init="mse"``) is the starting point; every planned integer linear then trains under fake quantization
    in its own format (:func:`llmquant.prepare_qat` on the packed modules), distilling the float model as
    ``plan.params`` (:class:`~llmquant.schemes.QATParams`) says, and is packed again in that format. The
    embedding / head and bf16/fp16 layers keep their planned formats and stay frozen. ``train["text"]``, when
    given, is the training text instead of ``plan.params.text`` (e.g. token ids, as QAT-made sensitivity
    candidates train on)."""
    import copy
    import dataclasses
    from pathlib import Path

    from ..qat import convert_fake_quant, prepare_qat
    from ..qat_train import train_qat

    p = plan.params
    heads = head_names(model)
    for name, fmt in plan.resolve(plan_targets(model), heads).items():  # the linears QAT trains
        if name not in heads and isinstance(fmt, QuantScheme) and (fmt.super_group is not None or fmt.zero_point == "min"):
            raise SchemeError(f"a QAT plan trains each format's scales and zero points; {name}: {format_name(fmt)} "
                              "(a k-quant's two-level scales, or a stored float minimum as gguf:Q4_1) cannot be "
                              "trained: use a W-preset for it, or make the plan with method 'rtn', 'gptq' or 'awq'")
    teacher = copy.deepcopy(model) if p.loss == "kl" else None
    start = dataclasses.replace(plan, method="rtn", params={"observer": "mse"} if p.init == "mse" else None)
    t0 = time.perf_counter()
    with torch.no_grad():
        made = _apply(model, start, None, None, progress)
    trained = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and n not in heads]
    if not trained:
        raise SchemeError("the QAT plan gives no decoder linear an integer format: nothing to train")
    first = model.get_submodule(trained[0]).scheme
    prepare_qat(model, QuantConfig(weight=first, targets=tuple(trained)), learn_scales=p.learn_scales,
                lora_rank=p.lora_rank, lora_alpha=p.lora_alpha, init="rtn", progress=progress)
    model.llmquant_qat["config"] = QuantConfig(weight=first, targets=tuple(trained), method="qat",
                                               method_params=p).to_dict()
    kw = {k: v for k, v in p.to_dict().items()
          if k not in ("text", "version", "learn_scales", "lora_rank", "lora_alpha", "init")}
    train = dict(train)
    text = train.pop("text") if "text" in train else (Path(p.text) if p.text else None)
    res = train_qat(model, text, teacher=teacher, convert=False, progress=progress, **kw, **train)
    del teacher
    summary = QuantSummary(method="plan:qat", config=plan.to_dict())
    convert_fake_quant(model, summary, progress)
    rows = {r.name: r for r in summary.layers}
    summary.layers = [rows.get(r.name, r) for r in made.layers]
    summary.untied_lm_head, summary.head = made.untied_lm_head, made.head
    summary.calibration = {"qat": {k: v for k, v in res.to_dict().items() if k != "summary"}}
    summary.seconds = time.perf_counter() - t0
    for attr in ("llmquant_qat", "llmquant_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.llmquant_plan = plan
    model.eval()
    log.info("%s", summary)
    return summary


def _rtn_with(params, model):
    """RTN with ``params``' range search (``imse``: each weight's importance from the imatrix, min-max for a
    weight it has no entry for)."""
    importance = imatrix_importance(model, params.imatrix) if params.imatrix is not None else {}

    def algo(w, fmt, *, name=None):
        return rtn_weighted(w.detach().float(), fmt, name, params.observer, importance.get(name))

    return algo


def run_plan(model: nn.Module, cfg: QuantConfig, calib=None, progress: bool = True) -> QuantSummary:
    """The ``plan`` method's handler: ``cfg.method_params`` is the :class:`Plan`."""
    return apply_plan(model, cfg.method_params, calib=calib, calibration=cfg.calibration, progress=progress)


class PlanStage(Stage):
    """Each linear in the format the plan gives it (data-free: integer formats by the plan's method)."""

    needs_data = needs_gram = False

    def __init__(self, cfg, assign, algo) -> None:
        super().__init__(cfg)
        self.assign, self.algo = assign, algo

    label = "formats per layer"

    def quantize(self, ctx: LayerContext):
        return {n: self.assign[n] for n in ctx.linears}

    def build(self, name, lin, fmt):
        return build_module(name, lin, fmt, self.algo)


class _PlanFormats:
    """A calibrated stage with each linear onto the plan's format for it (float formats: rounded, not solved)."""

    def __init__(self, cfg, params, assign) -> None:
        super().__init__(cfg, params)
        self.assign = assign

    def scheme(self, name):
        return self.assign[name]

    def build(self, name, lin, result):
        fmt = self.assign[name]
        q, scale, zero, w = result[:4]
        if isinstance(fmt, FloatFormat):
            return build_module(name, lin, fmt, None, ref=w)
        return make_quant_linear(name, lin, q, scale, zero, self.cfg, weight=w, scheme=fmt, label=format_name(fmt))


class PlanGPTQStage(_PlanFormats, GPTQStage):
    """GPTQ with each linear onto the plan's format for it, in one layer-by-layer pass: linears sharing an
    input and a format are solved together; float formats (bf16/fp16) are rounded, not solved."""

    label = "GPTQ, formats per layer"

    def quantize(self, ctx: LayerContext):
        floats = {n: m for n, m in ctx.linears.items() if isinstance(self.assign[n], FloatFormat)}
        return {**rtn_result(floats, self.scheme), **super().quantize(ctx)}


class PlanAWQStage(_PlanFormats, AWQStage):
    """AWQ with each linear onto the plan's format for it: one scale per group of linears sharing an input,
    searched with each linear's error on its own format; then each linear's clipping search on its format."""

    label = "AWQ, formats per layer"
