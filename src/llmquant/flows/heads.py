"""The input embedding and the output head: stored in a format of their own (``QuantConfig.head``).

On a small model they are a large share of the file (SmolLM2-135M: the tied 49152 x 576 table is 113 MB of
its 538 MB in fp32), and at decode the head is the largest single matmul. Weight-only methods therefore
quantize them by default (``head="auto"``): int8 in blocks of 32 with fp16 scales, llama.cpp's Q8_0 grid
(what llama.cpp's own 4-bit presets give this tensor when its width is not a multiple of 256), or int8 per
row when the width is not a multiple of 32. Round-to-nearest: the head's weight error is small at 8 bits
and calibrating it would need the whole model's outputs.

A tied pair given one format stays tied: the head is a :class:`QuantLinear` and the embedding a
:class:`QuantEmbedding` reading the same packed tensors (saved once, written once to GGUF). Given different
formats (a head the method quantized itself), they are untied first.

Also the one place that builds a Linear or an Embedding in a given format (:func:`build_module`, which
mixed-precision plans use for every layer).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..algorithms import ALGORITHMS
from ..errors import SchemeError
from ..models import tied_lm_head
from ..modules import FloatEmbedding, FloatLinear, QuantEmbedding, QuantLinear, replace_module
from ..modules.float_modules import embed_scale_of
from ..schemes import FloatFormat
from ..schemes.formats import FP32, format_bytes, format_name, resolve_format
from ..schemes.methods import method_default
from .summary import QuantSummary, layer_row

log = logging.getLogger(__name__)

#: ``head="auto"``: the format for a tied or untied embedding / head of this width
AUTO_HEAD = "gguf:Q8_0"
AUTO_HEAD_RAGGED = "W8"  # widths that are not a multiple of Q8_0's 32-value blocks


_FLOAT_HEADS = (nn.Linear, nn.Embedding, FloatLinear, FloatEmbedding)  # stored bf16/fp16 (a streamed checkpoint)


def _float_head(mod: nn.Module) -> bool:
    """A float Linear or Embedding (a family's own subclass too: Gemma's scaled embedding) or llmquant's
    bf16/fp16 storage of one; not a quantized module."""
    return isinstance(mod, _FLOAT_HEADS) and not isinstance(mod, (QuantLinear, QuantEmbedding))


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the input embedding and output head (selected by exact name only)."""
    out = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        mod = getattr(model, getter, lambda: None)()
        if mod is not None:
            out += [n for n, m in model.named_modules() if m is mod][:1]
    return tuple(out)


def untie(model: nn.Module, emb_name: str, head_name: str) -> None:
    head = model.get_submodule(head_name)
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
    log.info("%s and %s were tied; they get different formats, so they are untied", emb_name, head_name)


def head_format(cfg, width: int):
    """The format ``cfg.head`` gives an embedding / head of ``width`` columns, or None to leave it as it is."""
    spec = cfg.head
    if spec == "auto" and cfg.targets:
        return None  # modules named by the user: those and no others
    if spec == "auto":
        # weight-only methods: int8; a method that quantizes activations (W8A8) leaves them as they are
        spec = method_default(cfg.method, "head", "int8") if cfg.activation is None else "fp32"
        if spec == "int8":
            spec = AUTO_HEAD if width % 32 == 0 else AUTO_HEAD_RAGGED
    fmt = resolve_format(spec)
    return None if fmt == FP32 else fmt


@torch.no_grad()
def quantize_heads(model: nn.Module, cfg, summary: QuantSummary) -> None:
    """Store the embedding and the output head as ``cfg.head`` says, in place; their rows go in ``summary``.
    A module the method already replaced (a quantized head) is left alone."""
    heads = [n for n in head_names(model) if _float_head(model.get_submodule(n))]
    if not heads:
        return
    width = model.get_submodule(heads[0]).weight.shape[1]
    fmt = head_format(cfg, width)
    if fmt is None:
        return
    if any(model.get_submodule(n).weight.is_meta for n in heads):
        raise SchemeError("the embedding / head weights are not loaded; quantize with head='fp32' or load them")
    build_heads(model, {n: fmt for n in heads}, ALGORITHMS["rtn"], summary)
    summary.head = {"format": format_name(fmt), "modules": heads, "tied": len(heads) == 2 and tied_lm_head(model)}


def build_heads(model: nn.Module, assign: dict, algo, summary: QuantSummary) -> bool:
    """Replace the embedding / head modules named in ``assign`` (name -> format) by stored ones; a tied pair
    with one format keeps sharing one tensor, with two formats (or one left out) it is untied. Returns
    whether it untied them."""
    heads = head_names(model)
    shared_from: dict[str, str] = {}  # embedding name -> head name whose tensors it shares
    untied = False
    if tied_lm_head(model) and len(heads) == 2:
        emb, head = heads
        if emb in assign and head in assign and assign[emb] == assign[head]:
            shared_from[emb] = head
            if hasattr(model.config, "tie_word_embeddings"):
                model.config.tie_word_embeddings = False  # sharing is done by the modules; keep HF from re-tying
        elif emb in assign or head in assign:
            untie(model, emb, head)
            untied = True
    built: dict[str, nn.Module] = {}
    order = [n for n in assign if n not in shared_from] + list(shared_from)
    for name in order:
        fmt, mod = assign[name], model.get_submodule(name)
        if name in shared_from:
            src = built[shared_from[name]]
            es = embed_scale_of(mod)
            new = (QuantEmbedding.sharing(src, mod.padding_idx, es) if isinstance(src, QuantLinear)
                   else FloatEmbedding(mod.num_embeddings, mod.embedding_dim, src.weight.dtype, mod.padding_idx, es))
            if isinstance(new, FloatEmbedding):
                new.weight = src.weight
            replace_module(model, name, new)
            continue
        new, row = build_module(name, mod, fmt, algo)
        summary.layers.append(row)
        built[name] = new
        replace_module(model, name, new)
    if shared_from:
        log.info("tied %s shares the stored tensors of %s", ", ".join(shared_from), ", ".join(shared_from.values()))
    return untied


def build_module(name: str, mod: nn.Module, fmt, algo, ref=None):
    """The module that stores ``mod`` (a Linear or an Embedding) in format ``fmt``, and its summary row;
    ``ref``: the float weight its SQNR is taken against when it is not ``mod``'s (a calibrated run's)."""
    w = mod.weight
    linear = isinstance(mod, (nn.Linear, FloatLinear))
    if isinstance(fmt, FloatFormat):
        new = (FloatLinear.from_linear(mod, fmt.torch_dtype) if linear
               else FloatEmbedding.from_embedding(mod, fmt.torch_dtype))
        deq, kernel = new.weight.float(), f"float-{fmt.name}"
    else:
        q, scale, zero = algo(w, fmt, name=name)
        bias = mod.bias if linear else None
        qlin = QuantLinear.from_quantized(q, scale, zero, fmt, bias=bias).to(w.device)
        if linear:
            new, kernel = qlin, qlin.kernel.name
        else:
            new, kernel = QuantEmbedding.sharing(qlin, mod.padding_idx, embed_scale_of(mod)), "embedding-rows"
        deq = qlin.dequantize_weight(dtype=torch.float32, device=w.device)
    bias = getattr(mod, "bias", None)
    nbytes = format_bytes(fmt, *w.shape) + (0 if bias is None else bias.numel() * bias.element_size())
    return new, layer_row(name, w if ref is None else ref, deq, new, orig=mod, scheme=format_name(fmt), kernel=kernel, packed_bytes=nbytes,
                          bits_per_weight=8 * format_bytes(fmt, *w.shape) / w.numel())
