"""Quantization-aware training, the model side: ``prepare_qat`` swaps linears for fake-quantized ones,
``convert_qat`` turns them into the packed :class:`QuantLinear`s PTQ makes (same save/load/eval/kernels).

As in PyTorch's eager QAT (``torch.ao.quantization.prepare_qat`` / ``convert``), a user with their own
training loop only needs these two calls; :func:`llmquant.train_qat` is the loop for everyone else.

Initialisation: the weight qparams start from min-max of each weight (RTN's, ``init="rtn"``) or from
the least-squares clipping of each group (``init="mse"``, see :func:`llmquant.modules.fake_quant.mse_qparams`,
which also moves each group's largest value off the rounding boundary where RTN's symmetric grid puts it:
STE updates flip such values at the first step). Two hooks take better
starting points (e.g. GPTQ's) without changes here: ``init=`` a callable with the signature of the
entries of :data:`llmquant.algorithms.ALGORITHMS` (``(weight, scheme, name) -> (q, scale, zero)``), whose
dequantized codes become the starting weights; or a model that already holds ``QuantLinear``s (from any
PTQ method): each becomes a FakeQuantLinear holding its dequantized weight and its scales.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..algorithms import ALGORITHMS
from ..errors import SchemeError
from ..modules import QuantLinear, replace_module, select_linears
from ..modules.fake_quant import FakeQuantLinear
from ..schemes import QATParams, QuantConfig, dequantize, quantize_to_int, resolve_config
from .summary import QuantSummary, layer_row, untie_if_needed

log = logging.getLogger(__name__)

InitFn = Callable[[torch.Tensor, object, str], tuple]


def _resolve_init(init: "str | InitFn") -> InitFn | None:
    if callable(init):
        return init
    if init in ("rtn", "minmax", "mse", None):
        return None  # an observer inside FakeQuantLinear.from_linear (min-max: the same qparams as RTN)
    if init in ALGORITHMS:
        return ALGORITHMS[init]
    raise SchemeError(f"unknown QAT init {init!r}; give 'rtn', a name in {sorted(ALGORITHMS)}, or a callable")


def prepare_qat(
    model: nn.Module,
    config="W4G64",
    *,
    learn_scales: bool = True,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    init: "str | InitFn" = "mse",
    progress: bool = True,
) -> nn.Module:
    """Swap ``model``'s selected linears (and any ``QuantLinear``s) for :class:`FakeQuantLinear` in place.

    ``config``: a :class:`QuantConfig`, scheme, preset name or dict (``lm_head`` and the embedding are not
    fake-quantized; :func:`convert_qat` rounds them to ``config.head``, int8 by default, after training).
    ``learn_scales``: LSQ-learned step sizes (and zero points) or ones frozen at their initial values.
    ``lora_rank`` > 0: freeze the float weights and train rank-``r`` adapters instead (merged at convert).
    ``init``: ``"mse"`` (least-squares clipping per group), ``"rtn"`` (min-max: the model computes exactly
    what RTN's does), or a callable ``(weight, scheme, name) -> (q, scale, zero)`` such as a GPTQ step.
    Returns ``model``; ``model.llmquant_qat`` records the settings.
    """
    cfg: QuantConfig = resolve_config(config)
    if cfg.weight.zero_point == "min" or (cfg.activation is not None and cfg.activation.zero_point == "min"):
        from ..errors import SchemeError

        raise SchemeError("QAT learns zero points, not a stored float minimum (zero_point='min', as gguf:Q4_1): "
                          "train with zero_point='float' (same grid) and quantize onto gguf:Q4_1 after, or use PTQ")
    if lora_rank < 0:
        raise SchemeError(f"lora_rank must be >= 0, got {lora_rank}")
    init_fn = _resolve_init(init)
    opts = dict(learn_scales=learn_scales, lora_rank=lora_rank, lora_alpha=lora_alpha)
    chosen = select_linears(model, cfg.targets, cfg.ignore, types=(nn.Linear, QuantLinear))
    untie_if_needed(model, [n for n, _ in chosen])
    for name, lin in tqdm(chosen, desc=f"prepare_qat ({cfg.weight.name})", disable=not progress, leave=False):
        if isinstance(lin, QuantLinear):  # a PTQ result (e.g. GPTQ) as the starting point
            fq = _from_quant_linear(lin, **opts)
        elif init_fn is not None:
            if lin.weight.is_meta:
                raise SchemeError(f"QAT init {init!r} needs {name}'s whole weight, which is not loaded (a model loaded "
                                  "with shard=True): use init='mse' or 'rtn', or load the model whole")
            q, scale, zero = init_fn(lin.weight.detach(), cfg.weight, name)
            with torch.no_grad():
                start = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=lin.weight.device)
                start.weight.copy_(dequantize(q, scale, zero, cfg.weight).to(lin.weight.device))
                if lin.bias is not None:
                    start.bias.copy_(lin.bias)
            fq = FakeQuantLinear.from_linear(start, cfg.weight, cfg.activation, init_qparams=(scale, zero), **opts)
        else:
            observer = "mse" if init == "mse" else "minmax"
            fq = FakeQuantLinear.from_linear(lin, cfg.weight, cfg.activation, observer=observer, **opts)
        replace_module(model, name, fq)
    model.llmquant_qat = {"config": cfg.to_dict(), **opts, "init": init if isinstance(init, str) else "custom"}
    log.info("prepare_qat: %d linears fake-quantized at %s", len(chosen), cfg.weight.name)
    return model


def _from_quant_linear(q: QuantLinear, **opts) -> FakeQuantLinear:
    lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.qweight.device)
    with torch.no_grad():
        lin.weight.copy_(q.dequantize_weight(torch.float32, device=q.qweight.device))
        if q.bias is not None:
            lin.bias.copy_(q.bias.float())
    z = q.zero_point()
    fq = FakeQuantLinear.from_linear(lin, q.scheme, q.activation_scheme, init_qparams=(q.scale.float(), None if z is None else z.float()), **opts)
    if fq.input_quantizer is not None and fq.input_quantizer.static is not None and hasattr(q, "input_scale"):
        fq.input_quantizer.static.init_from(scale=q.input_scale, zero=getattr(q, "input_zero", None))
    return fq


def fake_quant_modules(model: nn.Module) -> list[tuple[str, FakeQuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]


def has_fake_quant(model: nn.Module) -> bool:
    """True when ``model`` was prepared for QAT (a generic ``convert`` can dispatch on this)."""
    return any(isinstance(m, FakeQuantLinear) for m in model.modules())


@torch.no_grad()
def fake_quant_codes(fq: FakeQuantLinear):
    """``(codes, scale, zero, float weight)`` of ``fq``'s fake-quantized weight (adapters merged)."""
    w = fq.merged_weight().detach().float()
    scale, zero = fq.weight_quantizer.export()
    return quantize_to_int(w, scale, zero, fq.scheme), scale, zero, w


def to_quant_linear(fq: FakeQuantLinear) -> QuantLinear:
    """The packed module whose dequantized weight equals ``fq``'s fake-quantized weight."""
    q, scale, zero, w = fake_quant_codes(fq)
    in_scale = in_zero = None
    if fq.input_quantizer is not None and fq.input_quantizer.static is not None:
        st = fq.input_quantizer.static
        if not bool(st.initialized):
            raise SchemeError("a static activation quantizer never saw data; run a forward pass before convert_qat")
        in_scale, in_zero = st.export()
    return QuantLinear.from_quantized(
        q, scale, zero, fq.scheme, bias=None if fq.bias is None else fq.bias.detach(),
        activation_scheme=fq.activation_scheme, input_scale=in_scale, input_zero=in_zero,
    ).to(w.device)


@torch.no_grad()
def convert_qat(model: nn.Module, *, progress: bool = True) -> QuantSummary:
    """Replace every :class:`FakeQuantLinear` of ``model`` with its packed :class:`QuantLinear`, in place.

    The converted model computes what the fake-quantized one did (up to the kernel's float rounding) and
    saves, loads and evaluates like a PTQ model. Weight SQNR in the summary is against the float master
    weight (adapters merged).
    """
    mods = fake_quant_modules(model)
    if not mods:
        raise SchemeError("the model has no fake-quantized linears; call prepare_qat (or train_qat) first")
    qat = getattr(model, "llmquant_qat", None) or {}
    cfg = QuantConfig.from_dict(qat["config"]) if "config" in qat else QuantConfig(weight=mods[0][1].scheme)
    if cfg.method != "qat":  # a user's own loop: the recipe records QAT with its default knobs
        cfg = cfg.with_(method="qat", method_params=QATParams())
    t0 = time.perf_counter()
    summary = QuantSummary(method="qat", config=cfg.to_dict())
    convert_fake_quant(model, summary, progress)
    from .heads import quantize_heads

    quantize_heads(model, cfg, summary)  # the embedding and output head (cfg.head), as every weight-only method
    summary.seconds = time.perf_counter() - t0
    model.llmquant_config = cfg
    if hasattr(model, "llmquant_qat"):
        del model.llmquant_qat
    model.eval()
    log.info("%s", summary)
    return summary


@torch.no_grad()
def convert_fake_quant(model: nn.Module, summary: QuantSummary, progress: bool = True) -> None:
    """Each :class:`FakeQuantLinear` of ``model`` becomes its packed :class:`QuantLinear` (in its own
    scheme), its row in ``summary``; nothing else changes."""
    for name, fq in tqdm(fake_quant_modules(model), desc="convert_qat", disable=not progress, leave=False):
        ql = to_quant_linear(fq)
        w = fq.merged_weight().detach().float()
        summary.layers.append(layer_row(name, w, None, ql, orig=fq, scheme=fq.scheme.name))
        replace_module(model, name, ql)


def run_qat(model: nn.Module, cfg: QuantConfig, calib=None, progress: bool = True) -> QuantSummary:
    """The ``qat`` method's handler: :func:`llmquant.train_qat` with ``cfg.method_params`` (QATParams),
    distilling a frozen copy of the float model, then converted; returns the conversion summary with the
    training result in ``summary.calibration["qat"]``."""
    from pathlib import Path

    from .qat_train import train_qat

    p: QATParams = cfg.method_params
    kw = {k: v for k, v in p.to_dict().items() if k not in ("text", "version")}
    text = None if p.text in (None, "default") else Path(p.text)
    res = train_qat(model, text, config=cfg, progress=progress, convert=False, **kw)
    summary = convert_qat(model, progress=progress)
    summary.seconds += res.seconds
    summary.calibration = {"qat": {k: v for k, v in res.to_dict().items() if k != "summary"}}
    return summary
