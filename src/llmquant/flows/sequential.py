"""Calibrated weight quantization (GPTQ, AWQ), layer by layer.

The inputs of decoder layer 0 (hidden states and the keyword arguments the model passes it: attention
mask, position embeddings...) are captured for the calibration windows. Then, for each layer i: a float
forward pass with hooks gathers each linear's input statistics (and the float outputs), the algorithm
quantizes the layer's linears, they are replaced by QuantLinear, and the calibration data runs through the
quantized layer to give the inputs of layer i + 1 and the layer's output error (relative MSE against the
float layer on the same inputs, over the first ``ERROR_WINDOWS`` windows). Peak memory: the model plus one
layer's activations for the calibration set (and the float outputs of ``ERROR_WINDOWS`` windows).

With ``CalibSpec(sequential=False)``, or for a model with no decoder layers (any ``nn.Module``), one float
pass over the whole model gathers the statistics of every linear at once ("whole-model" calibration).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import CalibrationError, UnsupportedArchitectureError
from ..models import arch_for
from ..modules import select_linears
from ..schemes import CalibSpec, QuantConfig
from .block import quantize_block
from .ptq import QuantSummary, _untie_if_needed, make_quant_linear
from .stats import StatsCollector

log = logging.getLogger(__name__)

#: a layer's output error (relative MSE against the float layer) is measured on the first this many
#: calibration windows: keeping every window's float output would double the activation memory
ERROR_WINDOWS = 16


@dataclass
class CalibratedSummary(QuantSummary):
    """A QuantSummary plus the calibration used and each decoder layer's output error."""

    calibration: dict = field(default_factory=dict)
    layer_errors: list[float] = field(default_factory=list)  # relative MSE of each layer's output

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(calibration=self.calibration, layer_errors=self.layer_errors)
        return d


class _Stop(Exception):
    pass


def _raise_stop(*args):
    raise _Stop


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _decoder_layers(model: nn.Module, arch) -> tuple[str, nn.ModuleList] | None:
    if arch is not None:
        try:
            return arch.layers, model.get_submodule(arch.layers)
        except AttributeError:
            pass
    for name, mod in model.named_modules():  # unknown model: the first list of repeated blocks
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and all(any(isinstance(c, nn.Linear) for c in b.modules()) for b in mod):
            return name, mod
    return None


def awq_pairs(model: nn.Module, cfg: QuantConfig, arch) -> tuple:
    p = cfg.method_params
    n2l, l2l = getattr(p, "norm_to_linears", None), getattr(p, "linear_to_linears", None)
    n2l = n2l if n2l is not None else (arch.norm_to_linears if arch else None)
    l2l = l2l if l2l is not None else (arch.linear_to_linears if arch else ())
    if not n2l:
        mt = getattr(getattr(model, "config", None), "model_type", None)
        raise UnsupportedArchitectureError(
            f"AWQ needs to know which norm feeds which linears in {type(model).__name__} (model_type {mt!r}); "
            "pass them as AWQParams(norm_to_linears=[['input_layernorm', ['self_attn.q_proj', ...]], ...]) "
            "with paths inside one decoder layer, or add an ArchSpec to llmquant.models.arch.ARCHS"
        )
    return tuple(n2l) + tuple(l2l or ())


def _run(module: nn.Module, x, kwargs: dict):
    out = module(x, **kwargs) if isinstance(x, torch.Tensor) else module(*x, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "logits", out) if not isinstance(out, torch.Tensor) else out


def _check(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise CalibrationError(f"NaN/Inf in the activations of {where} on the calibration data; "
                               "the model overflows (try float32, or other calibration text)")


def _batches(calib: torch.Tensor, bs: int, dev) -> list[torch.Tensor]:
    return [b.to(dev) for b in calib.split(bs)]


def _model_kwargs(calib: torch.Tensor) -> dict:
    return {"use_cache": False} if not calib.is_floating_point() else {}


@torch.no_grad()
def _capture(model, layer0, batches, kw):
    inputs, kwargs = [], []

    def pre(mod, args, kwargs_):
        kw2 = dict(kwargs_)
        inputs.append(args[0] if args else kw2.pop("hidden_states"))
        kwargs.append(kw2)
        raise _Stop

    h = layer0.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(b, **kw)
            except _Stop:
                pass
    finally:
        h.remove()
    return inputs, kwargs


@torch.no_grad()
def quantize_calibrated(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor, *, progress: bool = True) -> CalibratedSummary:
    """Quantize ``model``'s selected linears in place with ``cfg.method`` ("gptq" | "awq"), calibrated on
    ``calib``: token ids (windows, seq_len) for a language model, or float inputs (n, ...) for any module."""
    if not isinstance(calib, torch.Tensor) or calib.dim() < 2 or calib.shape[0] < 1:
        raise CalibrationError("calibration data must be a tensor of token ids (windows, seq_len) or of inputs (n, ...)")
    spec = cfg.calibration or CalibSpec()
    arch = arch_for(model)
    uses_awq = cfg.method == "awq" or getattr(cfg.method_params, "awq_scales", False)
    pairs = awq_pairs(model, cfg, arch) if uses_awq else ()
    chosen = dict(select_linears(model, cfg.targets, cfg.ignore))
    t0 = time.perf_counter()
    summary = CalibratedSummary(method=cfg.method, config=cfg.to_dict())
    summary.calibration = {"windows": int(calib.shape[0]), "shape": list(calib.shape), **spec.to_dict()}
    summary.untied_lm_head = _untie_if_needed(model, list(chosen))
    dev = _device(model)
    batches = _batches(calib, spec.batch_size, dev)
    kw = _model_kwargs(calib)
    found = _decoder_layers(model, arch)
    if spec.sequential and found is not None:
        _sequential(model, found, chosen, cfg, pairs, batches, kw, summary, progress)
    else:
        _whole_model(model, found, arch, chosen, cfg, pairs, batches, kw, summary, progress)
    summary.seconds = time.perf_counter() - t0
    log.info("%s", summary)
    model.llmquant_config = cfg
    return summary


def _install(model, results, chosen, cfg, summary) -> None:
    from ..modules import replace_module

    for n, (q, scale, zero, w) in results.items():
        qlin, row = make_quant_linear(n, chosen[n], q, scale, zero, cfg, weight=w)
        summary.layers.append(row)
        replace_module(model, n, qlin)
        del chosen[n]  # drop the float linear: its memory goes as soon as the model lets go of it


def _simulate(chosen, results, cfg) -> None:
    """Give the float linears their dequantized weights (what the quantized layer computes), in place."""
    from ..schemes import dequantize

    for n, (q, scale, zero, _) in results.items():
        lin = chosen[n]
        lin.weight.data = dequantize(q, scale, zero, cfg.weight).to(lin.weight.dtype).to(lin.weight.device)


def _sequential(model, found, chosen, cfg, pairs, batches, kw, summary, progress) -> None:
    path, layers = found
    xs, kwargs = _capture(model, layers[0], batches, kw)
    inside = set()
    bar = tqdm(range(len(layers)), desc=f"{cfg.method} {cfg.weight.name}", disable=not progress, unit="layer")
    for i in bar:
        t = time.perf_counter()
        layer, prefix = layers[i], f"{path}.{i}"
        lin = {n: m for n, m in chosen.items() if n.startswith(prefix + ".")}
        inside |= set(lin)
        ys = []  # float outputs, kept for the first ERROR_WINDOWS windows only (memory)
        with StatsCollector(lin) as col:
            for x, k in zip(xs, kwargs):
                y = _run(layer, x, k)
                _check(y, f"{prefix} (float)")
                ys.append(y if sum(t.shape[0] for t in ys if t is not None) < ERROR_WINDOWS else None)
                del y
        results = quantize_block(layer, prefix, lin, col, cfg, pairs)
        del col
        _simulate(chosen, results, cfg)  # propagate through x @ dequant(W)^T, then swap in the QuantLinears
        num = den = 0.0
        for j, (x, k) in enumerate(zip(xs, kwargs)):
            yq = _run(layer, x, k)
            _check(yq, f"{prefix} (quantized)")
            if ys[j] is not None:
                num += float((yq.float() - ys[j].float()).pow(2).sum())
                den += float(ys[j].float().pow(2).sum())
            xs[j] = yq  # the next layer sees the quantized layer's outputs
            ys[j] = None
        _install(model, results, chosen, cfg, summary)
        nlin = len(lin)
        del results, lin
        err = num / max(den, 1e-30)
        summary.layer_errors.append(err)
        bar.set_postfix(layer=i, rel_mse=f"{err:.2e}", s=f"{time.perf_counter() - t:.1f}")
        log.info("%s: %d linears, output rel. MSE %.3e, %.1fs", prefix, nlin, err, time.perf_counter() - t)
    rest = {n: m for n, m in chosen.items() if n not in inside}
    if rest:
        log.warning("%s are outside the decoder layers: quantized with RTN", sorted(rest))
        _install(model, quantize_block(model, "", rest, StatsCollector({}), cfg.with_(method="rtn"), ()), chosen, cfg, summary)


def _whole_model(model, found, arch, chosen, cfg, pairs, batches, kw, summary, progress) -> None:
    col = StatsCollector(chosen)
    stop = None
    if found is not None and arch is not None and all(n.startswith(found[0] + ".") for n in chosen):
        try:  # nothing after the last layer is quantized: skip the final norm and the logits
            stop = model.get_submodule(arch.final_norm).register_forward_pre_hook(_raise_stop)
        except AttributeError:
            stop = None
    try:
        with col:
            for b in tqdm(batches, desc=f"{cfg.method} calibration", disable=not progress, leave=False):
                try:
                    _check(_run(model, b, kw), "the model output")
                except _Stop:
                    pass
    finally:
        if stop is not None:
            stop.remove()
    if found is not None:
        path, layers = found
        blocks = [(f"{path}.{i}", layer) for i, layer in enumerate(layers)]
    else:
        blocks = [("", model)]
    done = set()
    for prefix, block in tqdm(blocks, desc=f"{cfg.method} {cfg.weight.name}", disable=not progress):
        lin = {n: m for n, m in chosen.items() if (not prefix or n.startswith(prefix + ".")) and n not in done}
        done |= set(lin)
        _install(model, quantize_block(block, prefix, lin, col, cfg, pairs), chosen, cfg, summary)
    rest = {n: m for n, m in chosen.items() if n not in done}
    if rest:
        _install(model, quantize_block(model, "", rest, col, cfg, ()), chosen, cfg, summary)
