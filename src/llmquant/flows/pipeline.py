"""The layer-by-layer pipeline every layer-wise method runs on (RTN, GPTQ, AWQ and their compositions).

For each decoder layer i: (1) its weights are made available (``LayerSource.load``: in memory today; a
memory-mapped checkpoint can slot in here); (2) a float forward pass over the calibration inputs with
hooks gathers each linear's input statistics (``X^T X``, mean |X|) and the float outputs; (3) the
statistics are reduced (``Hooks.reduce_stats``: identity in one process; a sum across ranks when
distributed); (4) the stages transform and quantize the layer (:mod:`llmquant.flows.stages`); (5) the
calibration data runs through the quantized layer to make the inputs of layer i + 1 and the layer's
output error (relative MSE against the float layer on the same inputs, over the first
``Stage.error_windows`` windows); (6) the QuantLinears replace the float ones and ``Hooks.on_layer_done`` runs
(an output shard writer, a checkpoint for resume). Data-free stages (RTN) skip (2), (3) and (5).

Each layer is called with its own keyword arguments (attention mask, position embeddings...), recorded
for every layer in one pass in which the layers pass their input through: models whose layers alternate
sliding-window and full attention get each layer's own mask.

With ``CalibSpec(sequential=False)``, or for a model with no decoder layers (any ``nn.Module``), one float
pass over the whole model gathers the statistics of every linear at once ("whole-model" calibration).
Peak memory: the model plus one layer's activations for the calibration set.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import CalibrationError
from ..models import arch_for
from ..modules import replace_module, select_linears
from ..schemes import CalibSpec, QuantConfig, dequantize
from .stages import ERROR_WINDOWS, LayerContext, Result, RTNStage, Stage, rtn_result, run_block  # noqa: F401
from .stats import StatsCollector
from .summary import QuantSummary, untie_if_needed

log = logging.getLogger(__name__)



class LayerSource:
    """Where a layer's weights come from. In memory: they are already there. A streaming source loads
    layer ``i``'s tensors in ``load`` and frees them in ``release`` once the quantized layer is written."""

    def load(self, index: int, prefix: str, layer: nn.Module) -> None:
        pass

    def release(self, index: int, prefix: str, layer: nn.Module) -> None:
        pass


@dataclass
class Hooks:
    """Points where streaming, distributed runs and resume attach to the pipeline."""

    source: LayerSource = field(default_factory=LayerSource)
    reduce_stats: Callable[[StatsCollector], None] | None = None  # e.g. all-reduce of the sums across ranks
    on_layer_done: list[Callable[[int, str, nn.Module, QuantSummary], None]] = field(default_factory=list)


class _Stop(Exception):
    pass


def _raise_stop(*args):
    raise _Stop


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def decoder_layers(model: nn.Module, arch) -> tuple[str, nn.ModuleList] | None:
    """(path, ModuleList) of the decoder layers: from the architecture record, else the first list of
    repeated blocks holding linears; None for a model without such a list."""
    if arch is not None:
        try:
            return arch.layers, model.get_submodule(arch.layers)
        except AttributeError:
            pass
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and all(any(isinstance(c, nn.Linear) for c in b.modules()) for b in mod):
            return name, mod
    return None


def _run(module: nn.Module, x, kwargs: dict):
    out = module(x, **kwargs) if isinstance(x, torch.Tensor) else module(*x, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "logits", out) if not isinstance(out, torch.Tensor) else out


def _check(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise CalibrationError(f"NaN/Inf in the activations of {where} on the calibration data; "
                               "the model overflows (try float32, or other calibration text)")


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during the recording pass: keeps its call's keyword
    arguments (and layer 0's input), passes the hidden states through, stops after the last layer."""

    def __init__(self, layer: nn.Module, index: int, last: bool, sink: Callable) -> None:
        super().__init__()
        self.layer, self.index, self.last, self.sink = layer, index, last, sink

    def __getattr__(self, name):  # attributes the model reads off its layers (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        self.sink(self.index, h, kwargs)
        if self.last:
            raise _Stop
        return h


@torch.no_grad()
def record_layer_inputs(model, layers: nn.ModuleList, batches, kw) -> tuple[list, list[list[dict]]]:
    """Layer 0's inputs per batch, and each layer's keyword arguments per batch ([layer][batch])."""
    inputs: list = []
    kwargs: list[list[dict]] = [[] for _ in layers]

    def sink(i, h, k):
        if i == 0:
            inputs.append(h)
        prev = kwargs[i - 1][len(kwargs[i])] if i else None
        same = prev is not None and prev.keys() == k.keys() and all(prev[a] is k[a] for a in k)
        kwargs[i].append(prev if same else dict(k))  # share the dict when a layer gets the very same objects

    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, i, i == len(originals) - 1, sink)
    try:
        for b in batches:
            try:
                model(b, **kw)
            except _Stop:
                pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if len(inputs) != len(batches) or any(len(k) != len(batches) for k in kwargs):
        raise CalibrationError("the model did not call its decoder layers in order on the calibration data; "
                               "use CalibSpec(sequential=False) (one whole-model pass)")
    return inputs, kwargs


def _install(model, results: Result, chosen, stage: Stage, summary) -> None:
    for n, r in results.items():
        new, row = stage.build(n, chosen[n], r)
        summary.layers.append(row)
        replace_module(model, n, new)
        del chosen[n]  # drop the float linear: its memory goes as soon as the model lets go of it


def _simulate(chosen, results: Result, cfg) -> None:
    """Give the float linears their dequantized weights (what the quantized layer computes), in place."""
    for n, (q, scale, zero, _) in results.items():
        lin = chosen[n]
        lin.weight.data = dequantize(q, scale, zero, cfg.weight).to(lin.weight.dtype).to(lin.weight.device)


def make_stages(cfg: QuantConfig) -> list[Stage]:
    from .registry import get_method

    params = cfg.method_params if isinstance(cfg.method, tuple) else (cfg.method_params,)
    stages = []
    for name, p in zip(cfg.methods, params):
        factory = get_method(name).stage
        if factory is None:
            raise CalibrationError(f"method {name!r} does not run layer by layer")
        stages.append(factory(cfg, p))
    return stages


@torch.no_grad()
def run_stages(model: nn.Module, cfg: QuantConfig, calib=None, *, progress: bool = True,
               hooks: Hooks | None = None, stages: list[Stage] | None = None,
               names: list[str] | None = None, whole_model: bool = False) -> QuantSummary:
    """Quantize ``model``'s selected linears in place with ``cfg``'s layer-wise method(s). Calibrated stages
    need ``calib``: token ids (windows, seq_len) for a language model, or float inputs (n, ...).
    ``stages``: run these instead of the config's methods' (a handler's own, e.g. dynamic's); ``names``:
    the linears to quantize, when the handler selected them itself; ``whole_model``: one float pass over
    the whole model instead of layer by layer (also what ``CalibSpec(sequential=False)`` asks)."""
    source = getattr(model, "llmquant_layer_source", None)  # a streamed model: layers read as they are reached
    hooks = hooks or Hooks(source=source or LayerSource())
    stages = stages or make_stages(cfg)
    calibrated = any(s.needs_data for s in stages)
    if calibrated and (not isinstance(calib, torch.Tensor) or calib.dim() < 2 or calib.shape[0] < 1):
        raise CalibrationError("calibration data must be a tensor of token ids (windows, seq_len) or of inputs (n, ...)")
    arch = arch_for(model)
    for s in stages:
        s.setup(model, arch)
    if names is None:
        chosen = dict(select_linears(model, cfg.targets, cfg.ignore))
    else:
        chosen = {n: model.get_submodule(n) for n in names}
    t0 = time.perf_counter()
    summary = QuantSummary(method="+".join(cfg.methods), config=cfg.to_dict())
    summary.untied_lm_head = untie_if_needed(model, chosen)
    found = decoder_layers(model, arch)
    if not calibrated:
        _data_free(model, found, chosen, cfg, stages, summary, progress, hooks)
    else:
        spec = cfg.calibration or CalibSpec()
        summary.calibration = {"windows": int(calib.shape[0]), "shape": list(calib.shape), **spec.to_dict()}
        batch = min([s.calib_batch for s in stages if s.calib_batch] or [spec.batch_size])
        batches = [b.to(_device(model)) for b in calib.split(batch)]
        kw = {"use_cache": False} if not calib.is_floating_point() else {}
        if spec.sequential and not whole_model and found is not None:
            _sequential(model, found, chosen, cfg, stages, batches, kw, summary, progress, hooks)
        elif source is not None:
            raise CalibrationError("a streamed model is calibrated layer by layer only: keep CalibSpec(sequential=True)"
                                   " and the quantized linears inside the decoder layers (ignore lm_head), or load "
                                   "the model whole")
        else:
            _whole_model(model, found, arch, chosen, cfg, stages, batches, kw, summary, progress)
    if source is not None:
        del model.llmquant_layer_source  # every layer has been read: the model is whole (and quantized)
    summary.seconds = time.perf_counter() - t0
    log.info("%s", summary)
    model.llmquant_config = cfg
    return summary


def _data_free(model, found, chosen, cfg, stages, summary, progress, hooks) -> None:
    """Stages that need no data (RTN, dynamic, plans): each linear on its own, layer by layer, in model order."""
    layers = [] if found is None else [(f"{found[0]}.{i}", layer) for i, layer in enumerate(found[1])]
    names = list(chosen)
    with tqdm(total=len(names), desc=f"quantize ({'+'.join(cfg.methods)}, {stages[-1].label})", disable=not progress,
              leave=False) as bar:
        for i, (prefix, layer) in enumerate(layers):
            lin = {n: m for n, m in chosen.items() if n.startswith(prefix + ".")}
            hooks.source.load(i, prefix, layer)
            if not lin:
                hooks.source.release(i, prefix, layer)
                continue
            ctx = LayerContext(layer, prefix, lin, StatsCollector({}), cfg)
            _install(model, run_block(stages, ctx), chosen, stages[-1], summary)
            for cb in hooks.on_layer_done:
                cb(i, prefix, layer, summary)
            hooks.source.release(i, prefix, layer)
            bar.update(len(lin))
        rest = {n: chosen[n] for n in names if n in chosen}  # outside the decoder layers (lm_head, any module)
        if rest:
            _install(model, run_block(stages, LayerContext(model, "", rest, StatsCollector({}), cfg, in_layer=False)),
                     chosen, stages[-1], summary)
            bar.update(len(rest))
    order = {n: k for k, n in enumerate(names)}
    summary.layers.sort(key=lambda r: order[r.name])


@contextlib.contextmanager
def _observing(stages: list[Stage], ctx: LayerContext):
    """The pipeline's input statistics (when a stage uses them) and each stage's own hooks."""
    with contextlib.ExitStack() as stack:
        if any(s.needs_gram for s in stages):
            stack.enter_context(ctx.stats)
        for s in stages:
            stack.enter_context(s.observe(ctx))
        yield


def _sequential(model, found, chosen, cfg, stages, batches, kw, summary, progress, hooks) -> None:
    path, layers = found
    xs, kwargs = record_layer_inputs(model, layers, batches, kw)
    float_prop = any(s.propagate_float for s in stages)
    # the layer's output error is measured on the batches holding its first error_windows windows
    sizes = [x.shape[0] if isinstance(x, torch.Tensor) else x[0].shape[0] for x in xs]
    want, err_batches = min(s.error_windows for s in stages), 0
    while err_batches < len(sizes) and sum(sizes[:err_batches]) < want:
        err_batches += 1
    inside = set()
    bar = tqdm(range(len(layers)), desc=f"{'+'.join(cfg.methods)} {stages[-1].label}", disable=not progress, unit="layer")
    for i in bar:
        t = time.perf_counter()
        layer, prefix = layers[i], f"{path}.{i}"
        hooks.source.load(i, prefix, layer)
        lin = {n: m for n, m in chosen.items() if n.startswith(prefix + ".")}
        inside |= set(lin)

        def float_pass(keep: bool):
            ys = []  # float outputs: all of them when they feed the next layer, else those the error needs
            for j, (x, k) in enumerate(zip(xs, kwargs[i])):
                y = _run(layer, x, k)
                _check(y, f"{prefix} (float)")
                ys.append(y if keep and (float_prop or j < err_batches) else None)
                del y
            return ys

        ctx = LayerContext(layer, prefix, lin, StatsCollector(lin), cfg, rerun=lambda: float_pass(False))
        with _observing(stages, ctx):
            ys = float_pass(True)
        if hooks.reduce_stats is not None:
            hooks.reduce_stats(ctx.stats)
        results = run_block(stages, ctx)
        del ctx
        num = den = 0.0
        if float_prop:  # the quantized layer measures the error; the float outputs feed the next layer
            _install(model, results, chosen, stages[-1], summary)
        else:
            _simulate(chosen, results, cfg)  # propagate through x @ dequant(W)^T, then swap in the QuantLinears
        for j, (x, k) in enumerate(zip(xs, kwargs[i])):
            if float_prop and j >= err_batches:
                xs[j], ys[j] = ys[j], None
                continue
            yq = _run(layer, x, k)
            _check(yq, f"{prefix} (quantized)")
            if ys[j] is not None:
                num += float((yq.float() - ys[j].float()).pow(2).sum())
                den += float(ys[j].float().pow(2).sum())
            xs[j] = ys[j] if float_prop else yq  # the next layer sees the quantized layer's outputs
            ys[j] = None
        if not float_prop:
            _install(model, results, chosen, stages[-1], summary)
        nlin = len(lin)
        del results, lin
        err = num / max(den, 1e-30)
        summary.layer_errors.append(err)
        for cb in hooks.on_layer_done:
            cb(i, prefix, layer, summary)
        hooks.source.release(i, prefix, layer)
        bar.set_postfix(layer=i, rel_mse=f"{err:.2e}", s=f"{time.perf_counter() - t:.1f}")
        log.info("%s: %d linears, output rel. MSE %.3e, %.1fs", prefix, nlin, err, time.perf_counter() - t)
    rest = {n: m for n, m in chosen.items() if n not in inside}
    if rest:
        log.warning("%s are outside the decoder layers: quantized with RTN", sorted(rest))
        _install(model, rtn_result(rest, cfg), chosen, RTNStage(cfg), summary)


def _whole_model(model, found, arch, chosen, cfg, stages, batches, kw, summary, progress) -> None:
    stop = None
    if found is not None and arch is not None and all(n.startswith(found[0] + ".") for n in chosen):
        try:  # nothing after the last layer is quantized: skip the final norm and the logits
            stop = model.get_submodule(arch.final_norm).register_forward_pre_hook(_raise_stop)
        except AttributeError:
            stop = None

    def model_pass():
        for b in tqdm(batches, desc=f"{'+'.join(cfg.methods)} calibration", disable=not progress, leave=False):
            try:
                _check(_run(model, b, kw), "the model output")
            except _Stop:
                pass

    whole = LayerContext(model, "", dict(chosen), StatsCollector(chosen), cfg, rerun=model_pass)
    try:
        with _observing(stages, whole):
            model_pass()
        if not all(s.split_blocks for s in stages):  # the model is one block: transforms see every layer
            _install(model, run_block(stages, whole), chosen, stages[-1], summary)
            return
    finally:
        if stop is not None:
            stop.remove()
    col = whole.stats
    blocks = [(f"{found[0]}.{i}", layer) for i, layer in enumerate(found[1])] if found is not None else [("", model)]
    done = set()
    for prefix, block in tqdm(blocks, desc=f"{'+'.join(cfg.methods)} {stages[-1].label}", disable=not progress):
        lin = {n: m for n, m in chosen.items() if (not prefix or n.startswith(prefix + ".")) and n not in done}
        done |= set(lin)
        _install(model, run_block(stages, LayerContext(block, prefix, lin, col, cfg)), chosen, stages[-1], summary)
    rest = {n: m for n, m in chosen.items() if n not in done}
    if rest:
        _install(model, run_block(stages[-1:], LayerContext(model, "", rest, col, cfg, in_layer=False)), chosen,
                 stages[-1], summary)


class _Replay(nn.Module):
    """Stands in for a decoder layer in :func:`streamed_logits`' last pass: the hidden states pass through,
    except at the last layer, which gives the outputs the layer-by-layer pass computed."""

    def __init__(self, layer: nn.Module, out: list | None) -> None:
        super().__init__()
        self.layer, self.out, self.current = layer, out, 0

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return h if self.out is None else self.out[self.current]


def _unload(layer: nn.Module) -> None:
    """Put a streamed layer's weights back in the checkpoint (meta tensors), freeing their memory."""
    for mod in layer.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and not p.is_meta:
                mod._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)


@torch.no_grad()
def streamed_logits(model: nn.Module, windows: torch.Tensor, fn: Callable[[int, torch.Tensor], None]) -> None:
    """The logits of a streamed model (``load_model(..., stream=True)``) on each window (n, seq_len), one
    window at a time to ``fn(i, logits)``, reading one decoder layer at a time and putting it back after:
    peak memory is one layer plus the windows' hidden states. The model's own head (final norm, output
    projection, any logit scaling) computes the logits, so they are those of the model's own forward."""
    source = getattr(model, "llmquant_layer_source", None)
    found = decoder_layers(model, arch_for(model))
    if source is None or found is None:
        raise CalibrationError("streamed_logits takes a model loaded with stream=True")
    path, layers = found
    dev = _device(model)
    batches = [w.unsqueeze(0).to(dev) for w in windows]
    xs, kwargs = record_layer_inputs(model, layers, batches, {"use_cache": False})
    for i in tqdm(range(len(layers)), desc="reference (streamed)", leave=False, unit="layer"):
        prefix = f"{path}.{i}"
        source.load(i, prefix, layers[i])
        for j, (x, k) in enumerate(zip(xs, kwargs[i])):
            xs[j] = _run(layers[i], x, k)
        _unload(layers[i])
        source.release(i, prefix, layers[i])
    originals = list(layers)
    replays = [_Replay(layer, xs if i == len(originals) - 1 else None) for i, layer in enumerate(originals)]
    for i, r in enumerate(replays):
        layers[i] = r
    try:
        for j, b in enumerate(batches):
            replays[-1].current = j
            fn(j, _run(model, b, {"use_cache": False}))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
