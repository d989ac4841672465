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
from tqdm.auto import tqdm

from ...algorithms import ALGORITHMS
from ...errors import SchemeError
from ...models import tied_lm_head
from ...modules import FloatEmbedding, FloatLinear, QuantEmbedding, QuantLinear, replace_module
from ...schemes import FloatFormat, Plan, QuantConfig, resolve_plan
from ...schemes.formats import format_bytes, format_name
from ..pipeline import run_stages
from ..stages import LayerContext, Stage
from ..summary import QuantSummary, layer_row

log = logging.getLogger(__name__)


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the input embedding and output head (selected by exact name only)."""
    out = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, getter, lambda: None)()
        if mod is not None:
            out += [n for n, m in model.named_modules() if m is mod][:1]
    return tuple(out)


def plan_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Every module a plan can name, in model order: the Linears and the Embeddings."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


def _untie(model: nn.Module, emb_name: str, head_name: str) -> None:
    head = model.get_submodule(head_name)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
    log.info("%s and %s were tied; they get different formats, so they are untied", emb_name, head_name)


@torch.no_grad()
def apply_plan(model: nn.Module, plan, *, progress: bool = True) -> QuantSummary:
    """Quantize ``model`` in place as ``plan`` (a Plan, its dict, or a .json path) says; returns a summary."""
    plan: Plan = resolve_plan(plan)
    if plan.method not in ALGORITHMS:
        raise SchemeError(f"plan method {plan.method!r} is not available here; known: {', '.join(ALGORITHMS)}")
    algo = ALGORITHMS[plan.method]
    heads = head_names(model)
    assign = {n: f for n, f in plan.resolve(plan_targets(model), heads).items() if f != FloatFormat("float32")}
    shared_from: dict[str, str] = {}  # embedding name -> head name whose tensors it shares
    untied = False
    if tied_lm_head(model) and len(heads) == 2:
        emb, head = heads
        if emb in assign and head in assign and assign[emb] == assign[head]:
            shared_from[emb] = head
            if hasattr(model.config, "tie_word_embeddings"):
                model.config.tie_word_embeddings = False  # sharing is done by the modules; keep HF from re-tying
        elif emb in assign or head in assign:
            _untie(model, emb, head)
            untied = True
    t0 = time.perf_counter()
    # the linears that are neither the head nor the embedding run on the pipeline's data-free path (layer by
    # layer); the embedding and the head (tied or not) are made here, the head before an embedding sharing it
    stage = PlanStage(QuantConfig(method="plan", method_params=plan), assign, algo)
    layer_linears = [n for n, m in model.named_modules() if n in assign and n not in heads and isinstance(m, nn.Linear)]
    summary = QuantSummary(method=f"plan:{plan.method}", config=plan.to_dict(), untied_lm_head=untied)
    if layer_linears:
        inner = run_stages(model, stage.cfg, progress=progress, stages=[stage], names=layer_linears)
        summary.layers, summary.peak_memory_mb = inner.layers, inner.peak_memory_mb
        del model.llmquant_config  # a plan model's recipe is its plan (model.llmquant_plan)
    built: dict[str, nn.Module] = {}
    order = [n for n in assign if n not in shared_from and n not in layer_linears] + list(shared_from)
    for name in tqdm(order, desc="apply plan (embedding, head)", disable=not progress, leave=False):
        fmt, mod = assign[name], model.get_submodule(name)
        if name in shared_from:
            src = built[shared_from[name]]
            new = (QuantEmbedding.sharing(src, mod.padding_idx) if isinstance(src, QuantLinear)
                   else FloatEmbedding(mod.num_embeddings, mod.embedding_dim, src.weight.dtype, mod.padding_idx))
            if isinstance(new, FloatEmbedding):
                new.weight = src.weight
            replace_module(model, name, new)
            continue
        new, row = build_module(name, mod, fmt, algo)
        summary.layers.append(row)
        built[name] = new
        replace_module(model, name, new)
    position = {n: k for k, n in enumerate(assign)}
    summary.layers.sort(key=lambda r: position[r.name])
    summary.seconds = time.perf_counter() - t0
    if shared_from:
        log.info("tied %s shares the stored tensors of %s", ", ".join(shared_from), ", ".join(shared_from.values()))
    log.info("%s", summary)
    model.llmquant_plan = plan
    return summary


def run_plan(model: nn.Module, cfg: QuantConfig, calib=None, progress: bool = True) -> QuantSummary:
    """The ``plan`` method's handler: ``cfg.method_params`` is the :class:`Plan`."""
    return apply_plan(model, cfg.method_params, progress=progress)


def build_module(name: str, mod: nn.Module, fmt, algo):
    """The module that stores ``mod`` (a Linear or an Embedding) in format ``fmt``, and its summary row."""
    w = mod.weight
    if isinstance(fmt, FloatFormat):
        new = (FloatLinear.from_linear(mod, fmt.torch_dtype) if isinstance(mod, nn.Linear)
               else FloatEmbedding.from_embedding(mod, fmt.torch_dtype))
        deq, kernel = new.weight.float(), f"float-{fmt.name}"
    else:
        q, scale, zero = algo(w, fmt, name=name)
        bias = mod.bias if isinstance(mod, nn.Linear) else None
        qlin = QuantLinear.from_quantized(q, scale, zero, fmt, bias=bias).to(w.device)
        if isinstance(mod, nn.Linear):
            new, kernel = qlin, qlin.kernel.name
        else:
            new, kernel = QuantEmbedding.sharing(qlin, mod.padding_idx), "embedding-dequant"
        deq = qlin.dequantize_weight(dtype=torch.float32, device=w.device)
    bias = getattr(mod, "bias", None)
    nbytes = format_bytes(fmt, *w.shape) + (0 if bias is None else bias.numel() * bias.element_size())
    return new, layer_row(name, w, deq, new, orig=mod, scheme=format_name(fmt), kernel=kernel, packed_bytes=nbytes,
                          bits_per_weight=8 * format_bytes(fmt, *w.shape) / w.numel())


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
