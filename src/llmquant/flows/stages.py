"""The layer-by-layer methods as pipeline stages: RTN, GPTQ, AWQ.

A stage sees one block (a decoder layer, or the whole model) through a :class:`LayerContext`: its
linears, their input statistics, and the input scales earlier stages folded into them. ``transform``
may change the block's float weights (AWQ folds its scales); ``quantize`` returns each linear's integer
codes and qparams (RTN's format) and the float weight they approximate. In a composition every stage
transforms and the last one quantizes, so ``["awq", "gptq"]`` is AWQ's scales, then GPTQ on the scaled
weights with the Hessian of the scaled inputs.
"""

from __future__ import annotations

import logging
import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..algorithms import rtn_quantize
from ..algorithms.awq import awq_clip_quantize, awq_search_scale
from ..algorithms.fold import fold_scale_modules
from ..algorithms.gptq import gptq_quantize
from ..modules import QuantLinear
from ..resources import trim_memory
from ..schemes import FloatFormat, QuantConfig, QuantScheme
from .distributed import share
from .folds import FoldPlan, fold_plan, layer_pairs  # noqa: F401  (layer_pairs: re-exported)
from .stats import StatsCollector
from .summary import LayerSummary, layer_row

log = logging.getLogger(__name__)

#: a layer's output error (relative MSE against the float layer) is measured on the first this many
#: calibration windows by default: keeping every window's float output would double the activation memory
ERROR_WINDOWS = 16

#: full linear name -> (codes, scale, zero, the float weight the codes approximate)
Result = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]


@dataclass
class LayerContext:
    """One block as the stages see it. ``input_scales[name]``: the per-input-channel scale folded into linear
    ``name`` (its inputs are X / s); ``rerun()`` runs the block's float forward over its calibration inputs
    again (hooks attached see them), for a stage that needs statistics after its transform."""

    block: nn.Module
    prefix: str  # the block's name ("" for the whole model)
    linears: dict[str, nn.Module]  # full name -> module
    stats: StatsCollector
    cfg: QuantConfig
    input_scales: dict[str, torch.Tensor] = field(default_factory=dict)
    rerun: Callable[[], None] | None = None
    in_layer: bool = True  # False for the linears left outside the decoder layers (no norm -> linear pairs there)
    # the block's calibration batches: inputs, keyword arguments and float outputs (when a stage needs_targets)
    inputs: list | None = None
    kwargs: list | None = None
    targets: list | None = None
    rtn_fallback: list = field(default_factory=list)  # linears quantized with RTN for want of calibration tokens
    tokens_seen: int = 0  # the most tokens any linear of the block saw (when ``linears`` is part of the block)

    def rel(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    def scaled(self, name: str, m: torch.Tensor) -> torch.Tensor:
        """A (K, K) input statistic of ``name`` for its scaled inputs X / s (the same m when unscaled)."""
        s = self.input_scales.get(name)
        if s is None:
            return m
        s = s.to(m.device)
        return m / s.unsqueeze(0) / s.unsqueeze(1)


class Stage:
    """A layer-by-layer method.

    ``needs_data``: it runs on calibration inputs; ``needs_gram``: it uses each linear's input statistics
    (``X^T X``, mean |X|, gathered by the pipeline); ``propagate_float``: the next layer is calibrated on
    the float layer's outputs instead of the quantized layer's; ``calib_batch``: windows per forward pass
    (None: the CalibSpec's); ``split_blocks``: under whole-model calibration, quantize block by block
    (False: the model is one block, e.g. when a transform needs a second whole-model pass);
    ``error_windows``: how many calibration windows the layer's output error is measured on.
    """

    needs_data = True
    needs_gram = True
    needs_targets = False  # the float layer's outputs on every calibration batch (ctx.targets), e.g. to train on
    propagate_float = False
    calib_batch: int | None = None
    split_blocks = True
    error_windows = ERROR_WINDOWS  # calibration windows the layer's output error is measured on (memory, time)
    per_linear = False  # quantize() treats each linear on its own statistics: a layer may go in one pass

    def __init__(self, cfg: QuantConfig, params=None) -> None:
        self.cfg, self.params = cfg, params

    @property
    def label(self) -> str:
        """What the progress bar says it makes."""
        return self.cfg.weight.name

    def scheme(self, name: str):
        """The format linear ``name`` is quantized to: the config's weight scheme (a plan's stage: each
        linear's own, which may be a float format)."""
        return self.cfg.weight

    def setup(self, model: nn.Module, arch) -> None:
        """Look up what the stage needs of the model (architecture facts) before the first layer."""

    def observe(self, ctx: LayerContext):
        """A context manager holding the stage's own hooks during the block's float pass."""
        return contextlib.nullcontext()

    def reduce(self, ctx: LayerContext) -> None:
        """After the block's float pass, with the input statistics summed: combine the stage's own
        statistics over the ranks of a distributed run (:mod:`llmquant.flows.distributed`; default: none)."""

    def transform(self, ctx: LayerContext) -> None:
        """Change the block's float weights before quantization (default: nothing)."""

    def quantize(self, ctx: LayerContext) -> Result:
        raise NotImplementedError

    def build(self, name: str, lin: nn.Module, result: tuple) -> tuple[nn.Module, LayerSummary]:
        """The module that replaces ``lin`` for ``quantize``'s result, and its summary row."""
        q, scale, zero, w = result[:4]
        return make_quant_linear(name, lin, q, scale, zero, self.cfg, weight=w, scheme=self.scheme(name))


def make_quant_linear(name, lin, q, scale, zero, cfg: QuantConfig, weight=None, activation=None, label=None,
                      scheme=None):
    """The QuantLinear for codes/qparams of ``lin`` and its summary row; ``weight``: the float weight the
    codes approximate when it is not ``lin.weight`` (e.g. AWQ-scaled), for the SQNR; ``activation``: the
    activation scheme when it is not ``cfg.activation``; ``scheme``: the weight scheme when it is not
    ``cfg.weight``."""
    w = lin.weight if weight is None else weight
    act = cfg.activation if activation is None else activation
    scheme = cfg.weight if scheme is None else scheme
    qlin = QuantLinear.from_quantized(q, scale, zero, scheme, bias=lin.bias, activation_scheme=act)
    qlin.to(lin.weight.device)
    return qlin, layer_row(name, w, None, qlin, orig=lin, scheme=label or scheme.name, codes=q)


def rtn_result(linears: dict[str, nn.Module], scheme_of: Callable[[str], object]) -> Result:
    """RTN codes for ``linears``, each onto ``scheme_of(name)`` (a stage's :meth:`Stage.scheme`); a float
    format (a plan's bf16/fp16 layer) gives no codes, only the float weight (rounded when it is installed)."""
    out: Result = {}
    for n, m in linears.items():
        w, fmt = m.weight.detach().float(), scheme_of(n)
        if isinstance(fmt, FloatFormat):
            out[n] = (None, None, None, w)
        else:
            out[n] = (*rtn_quantize(w, fmt, name=n), w)
    return out


class RTNStage(Stage):
    """Round to nearest (algorithms/rtn.py) with RTNParams' range search: needs no data, except for the
    importance-weighted search ("imse"), whose importance is each input's mean square ``diag(X^T X) / n``
    (of the scaled inputs after an earlier stage's fold)."""

    per_linear = True

    def __init__(self, cfg: QuantConfig, params=None) -> None:
        super().__init__(cfg, params)
        self.observer = getattr(params, "observer", "minmax")
        self.imatrix = getattr(params, "imatrix", None)
        self.needs_data = self.needs_gram = self.observer == "imse" and self.imatrix is None
        self.importance: dict | None = None  # from the imatrix file, by linear name

    def setup(self, model: nn.Module, arch) -> None:
        if self.imatrix is not None:
            self.importance = imatrix_importance(model, self.imatrix)

    def quantize(self, ctx: LayerContext) -> Result:
        if self.observer == "minmax":
            return rtn_result(ctx.linears, self.scheme)
        out: Result = {}
        for n, m in ctx.linears.items():
            if self.importance is not None:
                imp = self.importance.get(n)  # None: a weight the imatrix has no entry for, rounded by min-max
                if imp is not None and n in ctx.input_scales:  # an earlier stage folded scales in: X / s
                    imp = imp / ctx.input_scales[n].to(imp.device).pow(2)
            else:
                imp = ctx.scaled(n, ctx.stats.of(n).gram).diagonal() if self.needs_gram else None
            w = m.weight.detach().float()
            out[n] = (*rtn_weighted(w, self.scheme(n), n, self.observer, imp), w)
        return out


def rtn_weighted(w: torch.Tensor, fmt, name: str, observer: str, importance: torch.Tensor | None):
    """RTN with ``observer``'s range search; "imse" for a weight without importance (one an imatrix has no
    entry for) is min-max."""
    observer = "minmax" if observer == "imse" and importance is None else observer
    return rtn_quantize(w, fmt, name=name, observer=observer, importance=importance)


def imatrix_importance(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """Each linear's per-column importance from the imatrix file ``path``, as :func:`llmquant.quantize` read
    it onto the model (``model.llmquant_importance``: {path: {linear name: (in_features,) tensor}}); files are
    read above this layer (:mod:`llmquant.io.imatrix`)."""
    from ..errors import SchemeError

    found = getattr(model, "llmquant_importance", {}).get(path)
    if found is None:
        raise SchemeError(f"RTN's imatrix {path!r} is read by llmquant.quantize(); this entry point does not "
                          "read files: call llmquant.quantize(model, config)")
    return found


class GPTQStage(Stage):
    """GPTQ (algorithms/gptq.py); linears sharing an input share H and are solved in one call."""

    per_linear = True

    def quantize(self, ctx: LayerContext) -> Result:
        p = self.params
        jobs = []  # linears sharing an input and a format: one call (a plan's may differ in format)
        for names in ctx.stats.groups().values():
            by_scheme: dict = {}
            for n in names:
                if n in ctx.linears and isinstance(self.scheme(n), QuantScheme):
                    by_scheme.setdefault(self.scheme(n), []).append(n)
            jobs += by_scheme.values()

        def solve(names):
            w = torch.cat([ctx.linears[n].weight.detach().float() for n in names], 0)
            q, scale, zero = gptq_quantize(  # the Hessian is made for this call: GPTQ may work on it in place
                w, ctx.scaled(names[0], ctx.stats.of(names[0]).hessian), self.scheme(names[0]),
                damp=p.damp, block_size=p.block_size, act_order=p.act_order, static_groups=p.static_groups,
                observer=p.observer, name="+".join(names), consume_hessian=True,
            )
            del w
            trim_memory()  # GPTQ's K x K temporaries go back to the system before the next group's
            return q, scale, zero

        def cost(names):  # the column loop: rows x K^2, plus the K^3 inverse
            k = ctx.linears[names[0]].weight.shape[1]
            return sum(ctx.linears[n].weight.shape[0] for n in names) * k * k + k ** 3

        out: Result = {}
        for names, (q, scale, zero) in zip(jobs, share(jobs, solve, cost, "GPTQ")):
            r = 0
            for n in names:
                w = ctx.linears[n].weight.detach().float()
                k = w.shape[0]
                out[n] = (q[r : r + k], scale[r : r + k], None if zero is None else zero[r : r + k], w)
                r += k
        return out


class AWQStage(Stage):
    """AWQ (algorithms/awq.py): the scale search folded into each (source, linears) pair, then (as the last
    stage) the clipping search on the scaled weights."""

    plan: FoldPlan | None = None

    def setup(self, model: nn.Module, arch) -> None:
        p = self.params
        self.plan = fold_plan(
            model, arch, getattr(p, "norm_to_linears", None), getattr(p, "linear_to_linears", None), what="AWQ",
            hint="pass them as AWQParams(norm_to_linears=[['input_layernorm', ['self_attn.q_proj', ...]], ...]) "
                 "with paths inside one decoder layer, or add an entry to llmquant.models.arch")

    def transform(self, ctx: LayerContext) -> None:
        p, col = self.params, ctx.stats
        rel = {ctx.rel(n): n for n in ctx.linears}
        jobs = []  # (source, its linears' full names)
        index = int(ctx.prefix.rsplit(".", 1)[1]) if ctx.in_layer and ctx.prefix.rsplit(".", 1)[-1].isdigit() else 0
        for src, dsts in (layer_pairs(ctx.block, self.plan.pairs_of(index), "AWQ") if ctx.in_layer else ()):
            names = [rel[d] for d in dsts if d in rel]
            if not names or any(n not in col.owner for n in names):
                continue
            if len(names) != len(dsts):
                log.warning("AWQ pair %s -> %s: only %s are quantized; pair skipped", src, dsts, names)
                continue
            jobs.append((src, names))

        def search(job):
            st = col.of(job[1][0])
            return awq_search_scale([ctx.linears[n].weight for n in job[1]], st.gram, st.absmean,
                                    [self.scheme(n) for n in job[1]], grid=p.grid)

        def fold(job, found):
            (src, names), (s, alpha, losses) = job, found
            log.debug("AWQ %s%s -> %s: alpha %.2f, loss %.4g (RTN %.4g)", ctx.prefix and ctx.prefix + ".", src,
                      names, alpha, losses[alpha], losses[0.0])
            with torch.no_grad():  # a norm's weight and bias, or a linear's / Conv1D's output rows
                fold_scale_modules(ctx.block.get_submodule(src), [ctx.linears[n] for n in names], s,
                                   self.plan.offset(src))
            for n in names:
                ctx.input_scales[n] = s

        # a search reads its linears' weights; a fold changes its source and its linears. When no search reads
        # what an earlier pair's fold changes, the searches can all be made first (and dealt to the ranks of a
        # distributed run), else each waits for the folds before it
        changed, independent = set(), True
        for src, names in jobs:
            independent = independent and not (changed & set(names))
            changed |= {rel.get(src, src), *names}
        if independent:
            found = share(jobs, search, lambda j: sum(ctx.linears[n].weight.numel() for n in j[1]), "AWQ scales")
            for job, f in zip(jobs, found):
                fold(job, f)
        else:
            for job in jobs:
                fold(job, search(job))

    def quantize(self, ctx: LayerContext) -> Result:
        p = self.params
        names = [n for n in ctx.linears if n in ctx.stats.owner]
        floats = {n: ctx.linears[n] for n in names if not isinstance(self.scheme(n), QuantScheme)}  # a plan's bf16
        names = [n for n in names if n not in floats]

        def clip(n):
            g = ctx.scaled(n, ctx.stats.of(n).gram)
            return awq_clip_quantize(ctx.linears[n].weight.detach().float(), g, self.scheme(n), grid=p.clip_grid,
                                     max_shrink=p.max_shrink, clip=p.clip)

        done = share(names, clip, lambda n: ctx.linears[n].weight.numel(), "AWQ clipping")
        return {**rtn_result(floats, self.scheme),
                **{n: (*r, ctx.linears[n].weight.detach().float()) for n, r in zip(names, done)}}


#: a linear that saw fewer calibration tokens than this (and than a quarter of what the block's busiest linear
#: saw: a mixture-of-experts expert the router seldom chose) is quantized with RTN
MIN_CALIB_TOKENS = 16


def run_block(stages: list[Stage], ctx: LayerContext) -> Result:
    """Every stage's transform, then the last stage's quantize; linears that saw no calibration input, or
    too few tokens (:data:`MIN_CALIB_TOKENS`), fall back to RTN with a warning (when the stages need input
    statistics); their names go to ``ctx.rtn_fallback``."""
    out: Result = {}
    if any(s.needs_gram for s in stages):
        seen = {n: ctx.stats.of(n).n for n in ctx.linears if n in ctx.stats.owner}
        least = min(MIN_CALIB_TOKENS, max(max(seen.values(), default=0), ctx.tokens_seen) // 4)
        unseen = {n: m for n, m in ctx.linears.items() if seen.get(n, 0) < max(least, 1)}
        for n in unseen:
            log.warning("%s saw %d calibration tokens; quantized with RTN", n, seen.get(n, 0))
        ctx.rtn_fallback = list(unseen)
        for n in unseen:  # the stages work on the linears that saw enough
            ctx.stats.owner.pop(n, None)
        out.update(rtn_result(unseen, stages[-1].scheme))
    for s in stages:
        s.transform(ctx)
    out.update({n: r for n, r in stages[-1].quantize(ctx).items() if n not in out})
    return out


def per_linear(stage: Stage) -> bool:
    """Whether ``stage`` quantizes each linear from its own input statistics alone (no transform of the layer,
    no hooks of its own, no float targets): then the layer can be calibrated in one pass (:mod:`.staged`)."""
    return (stage.per_linear and type(stage).observe is Stage.observe and type(stage).transform is Stage.transform
            and not stage.propagate_float and not stage.needs_targets)
