"""Architecture facts as data: one :class:`~llmquant.models.spec.ArchSpec` per model family in ``ARCHS``,
found by :func:`arch_for` (a model, or its ``config.model_type``).

Adding a model family is adding an entry here, never an if/else on model names. What each field means is
in :mod:`llmquant.models.spec`.
"""

from __future__ import annotations

import torch.nn as nn

from .spec import ArchSpec, GGUFSpec, LayerModules, RuntimeSpec

# GGUF metadata of llama.cpp's llama-like architectures: (key without "<arch>.", config attributes, kind)
_LLAMA_META = (
    ("context_length", ("max_position_embeddings",), "u32"),
    ("embedding_length", ("hidden_size",), "u32"),
    ("block_count", ("num_hidden_layers",), "u32"),
    ("feed_forward_length", ("intermediate_size",), "u32"),
    ("attention.head_count", ("num_attention_heads",), "u32"),
    ("attention.head_count_kv", ("num_key_value_heads", "num_attention_heads"), "u32"),
    ("attention.layer_norm_rms_epsilon", ("rms_norm_eps",), "f32"),
    ("rope.freq_base", ("rope_parameters.rope_theta", "rope_theta"), "f32"),
    ("rope.dimension_count", ("head_dim",), "u32"),
    ("attention.key_length", ("head_dim",), "u32"),
    ("attention.value_length", ("head_dim",), "u32"),
    ("vocab_size", ("vocab_size",), "u32"),
)
_LLAMA_GGUF = GGUFSpec(
    arch="llama",
    metadata=_LLAMA_META,
    permute_rows=(("q", "num_attention_heads"), ("k", "num_key_value_heads")),
)
_GATED = LayerModules()  # Llama's decoder layer: input/post-attention norms, q/k/v/o, gate/up/down
_QKV = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),)
_UP_DOWN = (("mlp.up_proj", ("mlp.down_proj",)),)

ARCHS: list[ArchSpec] = [
    ArchSpec(model_types=("llama",), modules=_GATED, runtime=RuntimeSpec(), gguf=_LLAMA_GGUF),
    ArchSpec(
        model_types=("mistral",),
        modules=_GATED,
        runtime=RuntimeSpec(sliding_window_attr="sliding_window"),
        gguf=_LLAMA_GGUF,
    ),
    ArchSpec(
        model_types=("qwen2",),
        modules=_GATED,
        runtime=RuntimeSpec(),
        gguf=GGUFSpec(arch="qwen2", metadata=_LLAMA_META, biases=("q", "k", "v")),
    ),
    ArchSpec(
        model_types=("qwen3",),
        modules=LayerModules(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
        runtime=RuntimeSpec(),
        gguf=GGUFSpec(arch="qwen3", metadata=_LLAMA_META),
    ),
    # Llama's modules, but a forward the lean runtime does not reproduce: SmolLM3 has layers without RoPE,
    # Granite scales embeddings, residuals, attention and logits by multipliers.
    ArchSpec(model_types=("smollm3",), modules=_GATED),
    ArchSpec(model_types=("granite",), modules=_GATED),
    ArchSpec(
        model_types=("phi3",),
        norm_to_linears=(
            ("input_layernorm", ("self_attn.qkv_proj",)),
            ("post_attention_layernorm", ("mlp.gate_up_proj",)),
        ),
    ),
    # Gemma 2/3: RMSNorms scale by (1 + weight); norms before and after attention and MLP, and the one
    # feeding the MLP is pre_feedforward_layernorm (post_attention_layernorm's output joins the residual)
    ArchSpec(
        model_types=("gemma2", "gemma3_text"),
        norm_to_linears=_QKV + (("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),),
        linear_to_linears=_UP_DOWN,
        norm_offset=1.0,
    ),
    # mixture-of-experts: post_attention_layernorm feeds the router and the experts, so only attention folds
    ArchSpec(model_types=("mixtral", "qwen3_moe"), norm_to_linears=_QKV),
    ArchSpec(model_types=("qwen2_moe",), norm_to_linears=_QKV,
             linear_to_linears=(("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",)),),
             float_modules=("mlp.shared_expert_gate",)),
    # OLMo 2 normalizes after attention and MLP: its linears read the residual stream, no norm feeds them
    ArchSpec(model_types=("olmo2",), linear_to_linears=_UP_DOWN),
    ArchSpec(
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="embed_out",
        norm_to_linears=(("input_layernorm", ("attention.query_key_value",)),
                         ("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
    ),
    # Falcon and StableLM blocks are parallel (one norm, or two, feeding attention and MLP) or sequential
    # depending on the config: their pairs come from tracing the model
    ArchSpec(model_types=("falcon",), layers="transformer.h", embed="transformer.word_embeddings",
             final_norm="transformer.ln_f"),
    ArchSpec(model_types=("stablelm",)),
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


def arch_for(model: nn.Module | str | None) -> ArchSpec | None:
    """The spec for ``model`` (by its ``config.model_type``, or a model_type string), or None for models
    llmquant has no facts on."""
    mt = model if isinstance(model, str) else getattr(getattr(model, "config", None), "model_type", None)
    return next((spec for spec in ARCHS if mt in spec.model_types), None)


def arch_for_gguf(name: str) -> ArchSpec | None:
    """The first spec whose GGUF ``general.architecture`` is ``name``, or None."""
    return next((spec for spec in ARCHS if spec.gguf is not None and spec.gguf.arch == name), None)


def model_types_with(facet: str) -> list[str]:
    """The model types whose spec has ``facet`` ("runtime" or "gguf"), in table order (for error messages)."""
    return [t for spec in ARCHS if getattr(spec, facet) is not None for t in spec.model_types]


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


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows, or None when it does not say."""
    cfg = getattr(model, "config", None)
    for k in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
