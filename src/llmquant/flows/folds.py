"""Where the scale-folding methods (AWQ, SmoothQuant) may fold: the (source, consuming linears) pairs of one
decoder layer and each source norm's kind.

Pairs are declared (a method's own parameters, an :class:`~llmquant.models.ArchSpec` given by the user, or
the family's entry in :data:`llmquant.models.ARCHS`) and then checked against a trace of the model's first
decoder layer of each structure (:mod:`llmquant.models.trace`): a declared pair whose fold would change the layer's output,
or a declared norm kind the norm does not have, is an :class:`ArchitectureMismatchError`. With nothing
declared, the trace's own pairs are used, so a family without an entry still gets its folds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import ArchitectureMismatchError, MappingError, UnsupportedArchitectureError
from ..models import arch_for
from ..models.trace import decoder_layers, is_norm, trace_layer
from ..schemes.names import matches

log = logging.getLogger(__name__)

Pairs = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class FoldPlan:
    """``pairs``: (source, (consumer, ...)) inside one decoder layer (exact paths or ``re:`` patterns);
    ``offsets``: each source norm's weight offset by its path in the layer (``norm_offset`` for others);
    ``traced``: the pairs were found or checked by a trace of the model."""

    pairs: Pairs
    offsets: dict[str, float] = field(default_factory=dict)
    norm_offset: float = 0.0
    traced: bool = False
    # decoder layers of another structure than layer 0 (a dense MLP among MoE blocks, ...): their own pairs
    by_layer: dict[int, Pairs] = field(default_factory=dict)

    def offset(self, source: str) -> float:
        """The weight offset of ``source`` (a path inside the layer), for :func:`fold_scale_modules`."""
        return self.offsets.get(source, self.norm_offset)

    def pairs_of(self, index: int) -> Pairs:
        """The pairs of decoder layer ``index``."""
        return self.by_layer.get(index, self.pairs)


def _fmt(pairs) -> str:
    return "; ".join(f"{s} -> {list(d)}" for s, d in pairs) or "none"


def _structure(layer: nn.Module) -> tuple:
    return tuple((n, type(m).__name__) for n, m in layer.named_modules())


def fold_plan(model: nn.Module, arch=None, norm_to_linears=None, linear_to_linears=None, *, what: str,
              hint: str, linear_pairs: bool = True) -> FoldPlan:
    """The fold pairs of ``model`` (see the module docs). ``arch``: the record to use (default: the table's);
    ``norm_to_linears``/``linear_to_linears``: a method's own declared pairs, which take precedence;
    ``hint``: how the user passes pairs, for the error when none can be found. Decoder layers come in
    structures (most models: one); one layer of each is traced, and a declared pair whose source a
    structure lacks does not apply to its layers."""
    declared = arch or arch_for(model)
    n2l = norm_to_linears if norm_to_linears is not None else (declared.norm_to_linears if declared else ())
    l2l = linear_to_linears if linear_to_linears is not None else (declared.linear_to_linears if declared else ())
    pairs = tuple(n2l or ()) + (tuple(l2l or ()) if linear_pairs else ())
    found = decoder_layers(model, declared)
    first: dict[tuple, int] = {}  # layer structure -> the first layer that has it
    layer_kind = [first.setdefault(_structure(lay), i) for i, lay in enumerate(found[1])] if found else [0]
    plans = {k: _kind_plan(model, declared, pairs, linear_pairs, k, what, hint, multi=len(first) > 1)
             for k in dict.fromkeys(layer_kind)}
    base = plans[layer_kind[0]]
    offsets = {src: off for p in plans.values() for src, off in p.offsets.items()}
    by_layer = {i: plans[k].pairs for i, k in enumerate(layer_kind) if k != layer_kind[0]}
    if not any(p.pairs for p in plans.values()):
        raise UnsupportedArchitectureError(f"{what}: none of the pairs {_fmt(pairs)} applies to any decoder layer of "
                                           f"{type(model).__name__}; {hint}")
    return FoldPlan(base.pairs, offsets, base.norm_offset, base.traced, by_layer)


def _kind_plan(model, declared, pairs, linear_pairs, index, what, hint, multi) -> FoldPlan:
    """The plan of decoder layer ``index`` (and the layers of its structure)."""
    trace = trace_layer(model, declared, index)
    mt = getattr(getattr(model, "config", None), "model_type", None)
    who = f"{type(model).__name__} (model_type {mt!r})"
    if pairs and multi and trace is not None:  # pairs whose source this structure lacks are not its
        names = {n for n, _ in trace.layer.named_modules() if n}
        pairs = tuple((src, dsts) for src, dsts in pairs if any(matches(n, (src,)) for n in names))
        if not pairs:
            return FoldPlan((), traced=True)
    if not pairs:
        if trace is None:
            raise UnsupportedArchitectureError(f"{what} needs to know which norm feeds which linears in {who}, and "
                                               f"the model cannot be traced to find out: {hint}")
        t_n2l, t_l2l, offsets = trace.discover()
        pairs = t_n2l + (t_l2l if linear_pairs else ())
        if not pairs:
            raise UnsupportedArchitectureError(f"{what}: tracing {who} finds no norm or linear whose output reaches "
                                               f"only linears, so there is nowhere to fold a scale; {hint}")
        log.info("%s: fold pairs of %s found by tracing its decoder layer %d: %s", what, who, index, _fmt(pairs))
        return FoldPlan(pairs, offsets, traced=True)
    norm_offset = declared.norm_offset if declared is not None else 0.0
    if trace is None:
        if declared is None:
            log.warning("%s: %s cannot be traced; its norms are taken to scale by their weight (no offset)", what, who)
        return FoldPlan(pairs, norm_offset=norm_offset)
    offsets = {}
    for src, dsts in layer_pairs(trace.layer, pairs, what):
        if not trace.fold_holds(src, dsts):
            found = trace.discover()
            raise ArchitectureMismatchError(
                f"{what}: the pair {src} -> {list(dsts)} does not hold in {who}: scaling {src}'s output and undoing "
                f"it in those linears changes the decoder layer's output, so the output reaches more than them "
                f"(a residual add, an activation, other linears, a router). Tracing the layer finds: "
                f"{_fmt(found[0] + found[1])}; pass those pairs, or none to use them")
        if is_norm(trace.modules[src]):
            probed = trace.norm_offset(src)
            if probed is None:
                raise ArchitectureMismatchError(f"{what}: {src} of {who} does not scale its output channels by its "
                                                "weight, so no scale can be folded into it; choose other pairs")
            if declared is not None and abs(probed - norm_offset) > 1e-3:
                raise ArchitectureMismatchError(
                    f"{what}: the record of {who} says its norms scale by {norm_offset:g} + weight, but {src} "
                    f"scales by {probed:g} + weight; fix norm_offset in its entry (llmquant.models.arch)")
            offsets[src] = probed
    return FoldPlan(pairs, offsets, norm_offset, traced=True)


def layer_pairs(layer: nn.Module, pairs, what: str = "the norm -> linears mapping") -> list[tuple[str, tuple[str, ...]]]:
    """``pairs`` (source, (consumers, ...)) resolved against one decoder layer's module names: each entry is
    an exact path inside the layer or a ``re:`` regex matching the whole path (llm-compressor's style:
    ``("re:.*input_layernorm", ("re:.*(q|k|v)_proj",))``). A source must name exactly one module and each
    consumer pattern at least one; consumers keep the layer's module order."""
    names = [n for n, _ in layer.named_modules() if n]
    out = []
    for src, dsts in pairs:
        found = [n for n in names if matches(n, (src,))]
        if len(found) != 1:
            raise MappingError(f"{what}: source {src!r} matches {len(found)} modules of the layer "
                               f"({found[:3]}); it must match exactly one")
        missing = [d for d in dsts if not any(matches(n, (d,)) for n in names)]
        if missing:
            raise MappingError(f"{what}: {missing[:3]} match no module of the layer (modules: {names[:6]} ...)")
        out.append((found[0], tuple(n for n in names if matches(n, dsts))))
    return out
