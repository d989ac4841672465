"""Architecture facts as data: where the decoder layers are, and which norm (or linear) feeds which linears.

Adding a model family is adding an entry here, never an if/else on model names. ``norm_to_linears`` and
``linear_to_linears`` are paths relative to one decoder layer: a scale folded into the source (a norm's
weight, or a linear's output rows) can be undone in the inputs of the listed linears, which is what
SmoothQuant and AWQ need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class ArchSpec:
    model_types: tuple[str, ...]
    layers: str  # path of the ModuleList of decoder layers
    embed: str  # input embedding
    final_norm: str
    lm_head: str = "lm_head"
    norm_to_linears: tuple[tuple[str, tuple[str, ...]], ...] = ()
    linear_to_linears: tuple[tuple[str, tuple[str, ...]], ...] = ()


_LLAMA_PAIRS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
# v feeds o only when each head's values map to their own slice of o's input: true without GQA
# replication of v's rows, so only the up -> down pair is listed for all of these.
_LLAMA_LIN = (("mlp.up_proj", ("mlp.down_proj",)),)

ARCHS: list[ArchSpec] = [
    ArchSpec(
        model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite"),
        layers="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        norm_to_linears=_LLAMA_PAIRS,
        linear_to_linears=_LLAMA_LIN,
    ),
    ArchSpec(
        model_types=("phi3",),
        layers="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        norm_to_linears=(("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
    ),
    ArchSpec(
        model_types=("opt",),
        layers="model.decoder.layers",
        embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        norm_to_linears=(
            ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",)),
        ),
    ),
    ArchSpec(
        model_types=("gpt2",),
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        norm_to_linears=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),
    ),
]


def arch_for(model: nn.Module) -> ArchSpec | None:
    """The spec for ``model`` (by ``config.model_type``), or None for models llmquant has no facts on."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    for spec in ARCHS:
        if mt in spec.model_types:
            return spec
    return None


def tied_lm_head(model: nn.Module) -> bool:
    """True when the output projection shares its weight tensor with the input embedding."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if get_out is None or get_in is None:
        return False
    out, inp = get_out(), get_in()
    if out is None or inp is None or not hasattr(out, "weight") or not hasattr(inp, "weight"):
        return False
    return out.weight is inp.weight or out.weight.data_ptr() == inp.weight.data_ptr()


@dataclass(frozen=True)
class DecoderLayout:
    """What the lean runtime (:mod:`llmquant.runtime`) needs to run a pre-norm, RoPE, GQA decoder with a
    SwiGLU MLP without the model's own forward: module paths (relative to the model or to one decoder
    layer) and the config attributes that hold the shapes. ``q_norm``/``k_norm`` are used when a layer has
    them (Qwen3). A family whose forward differs in other ways (multipliers, layers without RoPE, sliding
    windows shorter than the sequence) is not listed, and the runtime refuses it with a clear error."""

    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    lm_head: str = "lm_head"
    input_norm: str = "input_layernorm"
    post_norm: str = "post_attention_layernorm"
    qkv: tuple[str, str, str] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o: str = "self_attn.o_proj"
    gate_up: tuple[str, str] = ("mlp.gate_proj", "mlp.up_proj")
    down: str = "mlp.down_proj"
    q_norm: str = "self_attn.q_norm"
    k_norm: str = "self_attn.k_norm"
    act_attr: str = "hidden_act"  # config attribute naming the MLP activation
    sliding_window_attr: str | None = None  # config attribute: attention window (None: full attention)


DECODER_LAYOUTS: list[DecoderLayout] = [
    DecoderLayout(model_types=("llama", "qwen2", "qwen3")),
    DecoderLayout(model_types=("mistral",), sliding_window_attr="sliding_window"),
]


def decoder_layout_for(model: nn.Module) -> DecoderLayout | None:
    """The lean-runtime layout for ``model``, or None when its family is not one the runtime runs."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    for spec in DECODER_LAYOUTS:
        if mt in spec.model_types:
            return spec

def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows, or None when it does not say."""
    cfg = getattr(model, "config", None)
    for k in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
