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

Stages that quantize each linear from its own input statistics (GPTQ, importance-weighted RTN / HQQ:
:func:`per_linear`) fold (2)-(5) into one pass by default (``CalibSpec(true_sequential=True)``,
:mod:`llmquant.flows.staged`): each linear is quantized once every batch has reached it, the linears after
it see its quantized outputs, and the pass's outputs feed layer i + 1 (about 0.85x the two-pass time).

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
from ..resources import PeakMemory, trim_memory, trims_deferred
from . import budget, distributed
from ..schemes import CalibSpec, QuantConfig, dequantize
from ..schemes.primitives import all_finite
from .passes import TailSkip, _Stop, _raise_stop, _run, decoder_layers, model_device, record_layer_inputs
from .stages import (ERROR_WINDOWS, LayerContext, Result, RTNStage, Stage, per_linear, rtn_result,  # noqa: F401
                     run_block)
from .staged import staged_pass
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
class ResumePoint:
    """Where an interrupted run stopped: ``done`` decoder layers are finished (their modules are already
    rebuilt in the model, on the meta device), with their summary rows and output errors; ``inputs()``
    yields the next layer's inputs per calibration batch (None for data-free methods); ``rng``: the torch
    RNG state after the last finished layer."""

    done: int
    rows: list
    errors: list[float]
    inputs: Callable[[], object] | None
    rng: torch.Tensor | None = None


class Checkpointer:
    """Per-layer checkpoints (the protocol :class:`llmquant.io.OutputFolder` implements)."""

    def resume_point(self, model: nn.Module, path: str, total: int) -> ResumePoint | None:
        return None

    def checkpoint(self, model: nn.Module, index: int, path: str, total: int, xs, summary: QuantSummary) -> None:
        """Called after layer ``index`` is finished and written; ``xs``: layer ``index + 1``'s inputs."""


@dataclass
class Hooks:
    """Points where streaming, distributed runs and resume attach to the pipeline."""

    source: LayerSource = field(default_factory=LayerSource)
    reduce_stats: Callable[[StatsCollector], None] | None = None  # e.g. all-reduce of the sums across ranks
    on_layer_done: list[Callable[[int, str, nn.Module, QuantSummary], None]] = field(default_factory=list)
    checkpoint: Checkpointer = field(default_factory=Checkpointer)  # resume from the last finished layer


def _check(t: torch.Tensor, where: str) -> None:
    if not all_finite(t):
        raise CalibrationError(f"NaN/Inf in the activations of {where} on the calibration data; "
                               "the model overflows (try float32, or other calibration text)")


def _install(model, results: Result, chosen, stage: Stage, summary) -> None:
    for n, r in results.items():
        new, row = stage.build(n, chosen[n], r)
        summary.layers.append(row)
        replace_module(model, n, new)
        del chosen[n]  # drop the float linear: its memory goes as soon as the model lets go of it


def _simulate(chosen, results: Result, stage: Stage) -> None:
    """Give the float linears their dequantized weights (what the quantized layer computes), in place."""
    for n, (q, scale, zero, w) in results.items():
        lin = chosen[n]
        fmt = stage.scheme(n)
        deq = w.to(fmt.torch_dtype) if q is None else dequantize(q, scale, zero, fmt)  # no codes: a float format
        lin.weight.data = deq.to(lin.weight.dtype).to(lin.weight.device)


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
    sink = getattr(model, "llmquant_layer_sink", None)  # an output being written: each layer goes when done
    hooks = hooks or Hooks(source=source or LayerSource(), on_layer_done=[sink.layer_done] if sink is not None else [],
                           checkpoint=sink if sink is not None else Checkpointer(),
                           reduce_stats=distributed.reduce_stats if distributed.active() is not None else None)
    stages = stages or make_stages(cfg)
    if calibrated_stages(stages) and (not isinstance(calib, torch.Tensor) or calib.dim() < 2 or calib.shape[0] < 1):
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
    with PeakMemory() as mem:
        _drive(model, cfg, calib, stages, chosen, arch, source, whole_model, summary, progress, hooks)
    summary.peak_memory_mb = mem.peak_mb
    summary.seconds = time.perf_counter() - t0
    log.info("%s", summary)
    model.llmquant_config = cfg
    return summary


def _drive(model, cfg, calib, stages, chosen, arch, source, whole_model, summary, progress, hooks) -> None:
    found = decoder_layers(model, arch)
    if not calibrated_stages(stages):
        _data_free(model, found, chosen, cfg, stages, summary, progress, hooks)
    else:
        spec = cfg.calibration or CalibSpec()
        summary.calibration = {"windows": int(calib.shape[0]), "shape": list(calib.shape), **spec.to_dict()}
        batch = min([s.calib_batch for s in stages if s.calib_batch] or [spec.batch_size])
        batches = [b.to(model_device(model)) for b in calib.split(batch)]
        kw = {"use_cache": False} if not calib.is_floating_point() else {}
        if spec.sequential and not whole_model and found is not None:
            _sequential(model, found, chosen, cfg, stages, batches, kw, summary, progress, hooks)
        elif any(s.needs_targets for s in stages):
            raise CalibrationError(f"{'+'.join(cfg.methods)} trains each decoder layer on its own inputs: it needs "
                                   "CalibSpec(sequential=True) and a model with decoder layers")
        elif source is not None:
            raise CalibrationError("a streamed model is calibrated layer by layer only: keep CalibSpec(sequential=True)"
                                   " and the quantized linears inside the decoder layers (ignore lm_head), or load "
                                   "the model whole")
        else:
            _whole_model(model, found, arch, chosen, cfg, stages, batches, kw, summary, progress)
    if source is not None:
        del model.llmquant_layer_source  # every layer has been read: the model is whole (and quantized)


def _compute(spec: CalibSpec, device: torch.device):
    """The layer passes' arithmetic (``CalibSpec.compute``): bfloat16 autocast, or as the model is."""
    if spec.compute == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def calibrated_stages(stages: list[Stage]) -> bool:
    return any(s.needs_data for s in stages)


def _data_free(model, found, chosen, cfg, stages, summary, progress, hooks) -> None:
    """Stages that need no data (RTN, dynamic, plans): each linear on its own, layer by layer, in model order."""
    layers = [] if found is None else [(f"{found[0]}.{i}", layer) for i, layer in enumerate(found[1])]
    budget.decide(model, [lay for _, lay in layers], chosen, stages, None, summary)
    names = list(chosen)
    start = _resume(hooks, model, found, chosen, summary) if layers else 0
    with tqdm(total=len(names), initial=len(names) - len(chosen), desc=f"quantize ({'+'.join(cfg.methods)}, "
              f"{stages[-1].label})", disable=not progress, leave=False) as bar:
        for i, (prefix, layer) in enumerate(layers[start:], start):
            lin = {n: m for n, m in chosen.items() if n.startswith(prefix + ".")}
            hooks.source.load(i, prefix, layer)
            for n, m in lin.items():  # one linear at a time: its codes and temporaries only
                ctx = LayerContext(layer, prefix, {n: m}, StatsCollector({}), cfg)
                _install(model, run_block(stages, ctx), chosen, stages[-1], summary)
            _layer_done(hooks, model, found, i, layer, None, summary)
            bar.update(len(lin))
        rest = {n: chosen[n] for n in names if n in chosen}  # outside the decoder layers (lm_head, any module)
        if rest:
            _install(model, run_block(stages, LayerContext(model, "", rest, StatsCollector({}), cfg, in_layer=False)),
                     chosen, stages[-1], summary)
            bar.update(len(rest))
    order = {n: k for k, n in enumerate(names)}
    summary.layers.sort(key=lambda r: order.get(r.name, -1))


def _resume(hooks: Hooks, model, found, chosen, summary, xs=None, shared=None) -> int:
    """Continue an interrupted run (``hooks.checkpoint`` knows): the finished layers' rows and errors go in
    the summary, their linears leave ``chosen``, ``xs`` gets the next layer's inputs; returns the index of
    the first layer to do. ``shared``: a distributed run's (group, this rank's global batch indices, every
    batch's input shape): rank 0 reads the checkpoint and hands each rank its batches' inputs."""
    path, layers = found
    group = shared[0] if shared else None
    point = hooks.checkpoint.resume_point(model, path, len(layers))
    if group is not None:
        done = group.broadcast(None if point is None else (point.done, point.inputs is not None), 0,
                               "the checkpoint to resume from")
        if done is None:
            return 0
        if group.rank != 0:
            point = ResumePoint(done[0], [], [], (lambda: None) if done[1] else None)
    if point is None:
        return 0
    finished = tuple(f"{path}.{i}." for i in range(point.done))
    for n in [n for n in chosen if n.startswith(finished)]:
        del chosen[n]
    summary.layers.extend(point.rows)
    summary.layer_errors.extend(point.errors)
    if xs is not None and point.done < len(layers):
        if group is not None:  # rank 0 reads every batch's inputs and sends each rank its own
            got_all = list(point.inputs()) if group.rank == 0 and point.inputs is not None else None
            shapes = shared[2]
            if group.rank == 0 and (got_all is None or [tuple(x.shape) for x in got_all] != [tuple(t) for t in shapes]):
                got_all = None
            ok = group.broadcast(got_all is not None, 0, "the checkpoint's layer inputs")
            if not ok:
                raise CalibrationError("the checkpoint's layer inputs do not match this run's calibration batches")
            dtype = group.broadcast(got_all[0].dtype if group.rank == 0 else None, 0, "the checkpoint's layer inputs")
            mine = group.from_rank0(got_all, shared[1], shapes, dtype, "the checkpoint's layer inputs")
            for j, x in enumerate(mine):
                xs[j] = x
        else:
            got = 0
            for j, x in enumerate(point.inputs() if point.inputs is not None else ()):
                if j >= len(xs) or tuple(x.shape) != tuple(xs[j].shape):
                    raise CalibrationError("the checkpoint's layer inputs do not match this run's calibration batches")
                xs[j], got = x, got + 1
            if got != len(xs):
                raise CalibrationError("the checkpoint holds no layer inputs for this run's calibration batches")
    rng = point.rng
    if group is not None:
        rng = group.broadcast(rng, 0, "the checkpoint's random state")
    if rng is not None:
        torch.set_rng_state(rng)
    summary.resumed_after = point.done
    return point.done


def _layer_done(hooks: Hooks, model, found, i: int, layer, xs, summary, shared=None) -> None:
    """Layer ``i`` is finished: written (``on_layer_done``), checkpointed with the next layer's inputs
    ``xs``, and its weights released. ``shared`` (a distributed run that checkpoints): the other ranks send
    rank 0 their inputs, so the checkpoint holds every batch's."""
    prefix = f"{found[0]}.{i}"
    for cb in hooks.on_layer_done:
        cb(i, prefix, layer, summary)
    if shared is not None and xs is not None and i + 1 < len(found[1]):
        group, idx, shapes = shared
        xs = group.to_rank0(list(xs), idx, shapes, xs[0].dtype, "sending the next layer's inputs to rank 0")
    hooks.checkpoint.checkpoint(model, i, found[0], len(found[1]), xs, summary)
    hooks.source.release(i, prefix, layer)


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
    group = distributed.active()
    if group is not None and any(s.needs_targets for s in stages):
        from ..errors import UnsupportedError

        raise UnsupportedError(f"{'+'.join(cfg.methods)} trains each decoder layer on every calibration batch: it "
                               "does not split over processes yet; run it in one process (no --workers / torchrun)")
    gidx, local = distributed.split(batches)  # a distributed run: this rank's share of the batches
    if group is not None and not local:
        raise CalibrationError(f"{len(batches)} calibration batches cannot be shared by {group.world} ranks: give "
                               f"at least {group.world} batches (more windows, or a smaller batch size)")
    float_prop = any(s.propagate_float for s in stages)
    targets = any(s.needs_targets for s in stages)
    spec = cfg.calibration or CalibSpec()
    staged = spec.true_sequential and not float_prop and not targets and all(per_linear(s) for s in stages)
    spill, staged = budget.decide(model, layers, chosen, stages, local, summary, staged)
    summary.true_sequential = staged
    store = (lambda: budget.SpilledList()) if spill else list
    xs, kwargs = record_layer_inputs(model, layers, local, kw, store=store())
    shared = None
    if group is not None and isinstance(xs[0], torch.Tensor):
        shapes = [(b.shape[0], *xs[0].shape[1:]) for b in batches]
        if group.broadcast(getattr(hooks.checkpoint, "resumable", False), 0, "the checkpoint settings"):
            shared = (group, gidx, shapes)
    start = _resume(hooks, model, found, chosen, summary, xs, shared)
    # a float pass whose outputs go unused may stop at the last linear's input, unless a stage watches more
    skip_tail = all(type(s).observe is Stage.observe for s in stages)
    bf16 = spec.compute == "bfloat16"  # the statistics' products too
    # the layer's output error is measured on the batches holding the first error_windows windows
    sizes = [b.shape[0] for b in batches]
    want, err_batches = min(s.error_windows for s in stages), 0
    if staged:  # the float outputs cost a forward of their own here: fewer windows
        want = min(want, STAGED_ERROR_WINDOWS)
    while err_batches < len(sizes) and sum(sizes[:err_batches]) < want:
        err_batches += 1
    err = [g < err_batches for g in gidx]
    inside = set()
    last = [time.perf_counter()]

    def clock(phase: str) -> None:  # the seconds since the last call go to ``phase``
        now = time.perf_counter()
        summary.phase_seconds[phase] = summary.phase_seconds.get(phase, 0.0) + now - last[0]
        last[0] = now

    bar = tqdm(range(start, len(layers)), initial=start, total=len(layers), desc=f"{'+'.join(cfg.methods)} "
               f"{stages[-1].label}", disable=not progress, unit="layer")
    for i in bar:
        t = time.perf_counter()
        clock("other")
        layer, prefix = layers[i], f"{path}.{i}"
        if group is not None:
            group.where = f"decoder layer {i} ({prefix})"
        hooks.source.load(i, prefix, layer)
        lin = {n: m for n, m in chosen.items() if n.startswith(prefix + ".")}
        inside |= set(lin)
        if staged:
            parts = _staged_layer(model, layer, prefix, lin, chosen, cfg, stages, spec, xs, kwargs[i], err, gidx,
                                  summary, hooks, group, clock)
            _finish_layer(model, found, i, layer, prefix, parts, len(lin), xs, summary, hooks, shared, bar, t, clock)
            continue

        def float_pass(keep: bool):
            ys = store()  # float outputs: all of them when they feed the next layer, else those the error needs
            # TailSkip's hooks come after the statistics hooks: batches whose outputs go unused stop early
            with TailSkip(lin) as tail, _compute(spec, model_device(model)):
                for j, (x, k) in enumerate(zip(xs, kwargs[i])):
                    if j and skip_tail and not (keep and (float_prop or targets or err[j])):
                        tail.run(layer, x, k)
                        ys.append(None)
                        continue
                    y = tail.full(layer, x, k)
                    _check(y, f"{prefix} (float)")
                    ys.append(y if keep and (float_prop or targets or err[j]) else None)
                    del y
            return ys

        ctx = LayerContext(layer, prefix, lin, StatsCollector(lin, bf16), cfg, rerun=lambda: float_pass(False))
        with _observing(stages, ctx):
            ys = float_pass(True)
        clock("float pass")
        if targets:
            ctx.inputs, ctx.kwargs, ctx.targets = xs, kwargs[i], ys
        if group is not None:
            group.check("the float pass")  # every rank is here; rank 0 names those that are not
        if hooks.reduce_stats is not None:
            hooks.reduce_stats(ctx.stats)
        ctx.stats.finish()
        for s in stages:
            s.reduce(ctx)
        clock("reduce")
        trim_memory()  # the float pass's freed intermediates go back to the system before the quantizer's own
        results = run_block(stages, ctx)
        summary.rtn_fallback.extend(ctx.rtn_fallback)
        del ctx
        clock("quantize")
        parts = []  # (global batch, error numerator, denominator)
        if float_prop:  # the quantized layer measures the error; the float outputs feed the next layer
            _install(model, results, chosen, stages[-1], summary)
        else:
            _simulate(chosen, results, stages[-1])  # propagate through x @ dequant(W)^T, then swap in the QuantLinears
        for j, (x, k) in enumerate(zip(xs, kwargs[i])):
            if float_prop and not err[j]:
                xs[j], ys[j] = ys[j], None
                continue
            with _compute(spec, model_device(model)):
                yq = _run(layer, x, k)
            _check(yq, f"{prefix} (quantized)")
            if ys[j] is not None:
                parts.append((gidx[j], (float((yq.float() - ys[j].float()).pow(2).sum()),
                                        float(ys[j].float().pow(2).sum()))))
            xs[j] = ys[j] if float_prop else yq  # the next layer sees the quantized layer's outputs
            ys[j] = None
        if not float_prop:
            _install(model, results, chosen, stages[-1], summary)
        clock("quantized pass")
        nlin = len(lin)
        del results, lin
        _finish_layer(model, found, i, layer, prefix, parts, nlin, xs, summary, hooks, shared, bar, t, clock)
    rest = {n: m for n, m in chosen.items() if n not in inside}
    if rest:
        log.warning("%s are outside the decoder layers: quantized with RTN", sorted(rest))
        _install(model, rtn_result(rest, stages[-1].scheme), chosen, stages[-1], summary)


def _finish_layer(model, found, i, layer, prefix, parts, nlin, xs, summary, hooks, shared, bar, t, clock) -> None:
    """Layer ``i`` is quantized: its output error (``parts``: (global batch, numerator, denominator)) goes in
    the summary, and it is written and checkpointed."""
    num = den = 0.0
    for a, b in distributed.sum_in_order(parts, "the layer's output error"):  # one process's order
        num += a
        den += b
    err_i = num / max(den, 1e-30)
    summary.layer_errors.append(err_i)
    _layer_done(hooks, model, found, i, layer, xs, summary, shared)
    clock("write")
    bar.set_postfix(layer=i, rel_mse=f"{err_i:.2e}", s=f"{time.perf_counter() - t:.1f}")
    log.info("%s: %d linears, output rel. MSE %.3e, %.1fs", prefix, nlin, err_i, time.perf_counter() - t)


#: a layer calibrated in one pass measures its output error on this many windows at most: the float outputs it
#: is compared with cost a forward pass of their own there
STAGED_ERROR_WINDOWS = 4


def _staged_layer(model, layer, prefix, lin, chosen, cfg, stages, spec, xs, kwargs, err, gidx, summary, hooks,
                  group, clock) -> list:
    """One decoder layer in one pass (:func:`.staged.staged_pass`): each linear quantized once every batch has
    reached it, on the outputs of the linears before it already quantized; ``xs`` becomes the layer's
    outputs. Returns the output error's parts (global batch, numerator, denominator). Linears that share an
    input (found on the float pass of the first batch) are quantized together when the first of them is
    reached, on its statistics: one GPTQ call and one Hessian inverse, as in the two-pass pipeline."""
    dev = model_device(model)
    shared = StatsCollector(lin, accumulate=False)
    with _compute(spec, dev):  # the float layer's outputs on the batches the output error is measured on
        with shared:
            y0 = _run(layer, xs[0], kwargs[0])
        ys = [y0 if err[0] else None] + [_run(layer, x, k) if err[j] else None
                                          for j, (x, k) in enumerate(zip(xs, kwargs)) if j]
        del y0
    together = {n: names for names in shared.groups().values() for n in names}
    where = group.where if group is not None else ""
    for y in ys:
        if y is not None:
            _check(y, f"{prefix} (float)")
    clock("float pass")
    col = StatsCollector(lin, spec.compute == "bfloat16")
    finished: set[str] = set()
    results: Result = {}
    order = list(lin)

    def most_tokens() -> int:  # what the layer's busiest linear saw so far (RTN fallback for starved experts)
        return max((st.n for st in col.stats.values()), default=0)

    def on_linear(name: str) -> list[str]:
        clock("quantized pass")
        if group is not None:  # "decoder layer 3 (model.layers.3) at mlp.down_proj"
            group.where = f"{where} at {name[len(prefix) + 1:]}"
        own = col.owner.get(name, name)
        if own not in finished:
            if hooks.reduce_stats is not None:  # the sums over every rank's batches, this input only
                view = StatsCollector({})
                view.owner = {name: own} if name in col.owner else {}
                view.stats = {own: col.stats[own]} if own in col.stats else {}
                hooks.reduce_stats(view)
                col.owner.update(view.owner)
                col.stats.update(view.stats)
                own = col.owner.get(name, name)
            if own in col.stats:
                col.stats[own].finish()
            finished.add(own)
        clock("reduce")
        names = [name]
        for other in together.get(name, ()):  # its input's other readers, not called yet
            if other != name and other not in col.owner and other not in results:
                col.owner[other] = own
                names.append(other)
        ctx = LayerContext(layer, prefix, {n: lin[n] for n in names}, col, cfg, tokens_seen=most_tokens())
        for s in stages:
            s.reduce(ctx)
        got = run_block(stages, ctx)
        summary.rtn_fallback.extend(ctx.rtn_fallback)
        _simulate(chosen, got, stages[-1])  # what the quantized linear computes, for the batches that go on
        results.update(got)
        clock("quantize")
        return names

    def choose(waited: list[str]) -> str | None:  # a distributed run: the first any rank waits on
        first = order.index(waited[0]) if waited else len(order)
        first = min(group.gather(first, "the next linear to quantize"))
        return order[first] if first < len(order) else None

    def batch(x, k):
        def run():
            with _compute(spec, dev):
                return _run(layer, x, k)
        return run

    with trims_deferred():  # the batches' activations are made again after each linear: keep the heap
        outs = staged_pass(lin, [batch(x, k) for x, k in zip(xs, kwargs)], col._hook, on_linear,
                           choose if group is not None else None)
    left = {n: m for n, m in lin.items() if n not in results}  # no batch called them (unrouted experts)
    if left:
        ctx = LayerContext(layer, prefix, left, col, cfg, tokens_seen=most_tokens())
        results.update(run_block(stages, ctx))  # RTN, with a warning, for want of calibration tokens
        summary.rtn_fallback.extend(ctx.rtn_fallback)
    parts = []
    for j, yq in enumerate(outs):
        _check(yq, f"{prefix} (quantized)")
        if ys[j] is not None:
            yf = ys[j].float()
            parts.append((gidx[j], (float((yq.float() - yf).pow(2).sum()), float(yf.pow(2).sum()))))
        xs[j], ys[j] = yq, None
    del outs
    _install(model, results, chosen, stages[-1], summary)
    clock("quantized pass")
    return parts


def _whole_model(model, found, arch, chosen, cfg, stages, batches, kw, summary, progress) -> None:
    group = distributed.active()
    _, batches = distributed.split(batches)
    if group is not None and not batches:
        raise CalibrationError(f"too few calibration batches for {group.world} ranks")
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
        distributed.reduce_stats(whole.stats)  # a distributed run: the sums over every rank's batches
        whole.stats.finish()
        for s in stages:
            s.reduce(whole)
        if not all(s.split_blocks for s in stages):  # the model is one block: transforms see every layer
            _install(model, run_block(stages, whole), chosen, stages[-1], summary)
            summary.rtn_fallback.extend(whole.rtn_fallback)
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
        bctx = LayerContext(block, prefix, lin, col, cfg)
        _install(model, run_block(stages, bctx), chosen, stages[-1], summary)
        summary.rtn_fallback.extend(bctx.rtn_fallback)
    rest = {n: m for n, m in chosen.items() if n not in done}
    if rest:
        _install(model, run_block(stages[-1:], LayerContext(model, "", rest, col, cfg, in_layer=False)), chosen,
                 stages[-1], summary)
