"""Architecture facts as data: one :class:`~llmquant.models.spec.ArchSpec` per model family in ``ARCHS``,
found by :func:`arch_for` (a model, or its ``config.model_type``).

Adding a model family is adding an entry here, never an if/else on model names. What each field means is
in :mod:`llmquant.models.spec`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from .spec import ArchSpec, GGUFSpec, LayerModules, RuntimeSpec, config_value

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
def _rope(c) -> dict:
    rp = config_value(c, ("rope_parameters", "rope_scaling")) or {}
    return rp if isinstance(rp, dict) else {}


def _rope_type(c) -> str:
    rp = _rope(c)
    return rp.get("rope_type", rp.get("type", "default")) or "default"


def _llama3_rope_factors(c):
    """Llama 3.1's frequency-dependent rope scaling as llama.cpp takes it: one factor per rotary frequency
    (``rope_freqs.weight``; llama.cpp divides each frequency by its factor). Long wavelengths are slowed by
    ``factor``, short ones kept, those between interpolated smoothly (Meta's reference formula)."""
    import math

    import numpy as np

    if _rope_type(c) != "llama3":
        return None
    rp = _rope(c)
    dim = config_value(c, ("head_dim",)) or c.hidden_size // c.num_attention_heads
    base = config_value(c, ("rope_parameters.rope_theta", "rope_theta"))
    factor, lo, hi = rp["factor"], rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _linear_factor(c):
    return _rope(c).get("factor") if _rope_type(c) == "linear" else None


_LLAMA_ROPE = ("rope unscaled, linearly scaled, or scaled as Llama 3.1 does (rope_type 'default', 'linear' or "
               "'llama3'; llmquant writes no other scaling)",
               lambda m: _rope_type(m.config) in ("default", "linear", "llama3"))
_LINEAR_ROPE_META = (("rope.scaling.type", lambda c: "linear" if _linear_factor(c) else None, "str"),
                     ("rope.scaling.factor", _linear_factor, "f32"))
_LINEAR_ROPE = ("rope unscaled or linearly scaled (rope_type 'default' or 'linear'; llmquant writes no other "
                "scaling)", lambda m: _rope_type(m.config) in ("default", "linear"))
_LLAMA_GGUF = GGUFSpec(
    arch="llama",
    metadata=_LLAMA_META + _LINEAR_ROPE_META,
    permute_rows=(("q", "num_attention_heads"), ("k", "num_key_value_heads")),
    requires=(_LLAMA_ROPE,),
    computed_tensors=(("rope_freqs.weight", _llama3_rope_factors),),
)


def _full_attention(m) -> bool:
    """No layer attends through a sliding window shorter than the context."""
    c = m.config
    kinds = getattr(c, "layer_types", None)
    if kinds is not None and "sliding_attention" not in kinds:
        return True
    window = getattr(c, "sliding_window", None)
    return window is None or window >= c.max_position_embeddings


_NO_SWA = ("no sliding window shorter than the context (llama.cpp runs this family with full attention)", _full_attention)

# --- GGUF facts of the other families llama.cpp runs (each checked by loading a tiny model in llama.cpp) ---
_THETA = ("rope_parameters.rope_theta", "rope_theta")


def _head_dim(c) -> int:
    return config_value(c, ("head_dim",)) or c.hidden_size // c.num_attention_heads


def _rope_dims(c) -> int:
    """Rotary dimensions per head: partial rotary (Phi, StableLM, GPT-NeoX) rotates a fraction of each head."""
    factor = config_value(c, ("rope_parameters.partial_rotary_factor", "partial_rotary_factor", "rotary_pct"))
    return int((1.0 if factor is None else factor) * _head_dim(c))


def _plain_rope(m) -> bool:
    rp = config_value(m.config, ("rope_parameters", "rope_scaling")) or {}
    entries = list(rp.values()) if rp and all(isinstance(v, dict) for v in rp.values()) else [rp]
    return all(e.get("rope_type", e.get("type", "default")) == "default" for e in entries)


_PLAIN_ROPE = ("rope without scaling (rope_type 'default'; llmquant writes no rope-scaling keys)", _plain_rope)
_TIED = ("the output head tied to the embedding (llama.cpp reads this family's head from token_embd only)",
         lambda m: tied_lm_head(m))


def _swa_every(n: int):
    """llama.cpp's fixed sliding-window pattern: layer i slides iff i % n < n - 1."""
    def ok(m) -> bool:
        kinds = getattr(m.config, "layer_types", None) or ()
        if getattr(m.config, "sliding_window", None) is None and "sliding_attention" not in kinds:
            return True  # no window written: llama.cpp attends fully everywhere
        return all((t == "sliding_attention") == (i % n < n - 1) for i, t in enumerate(kinds))
    return (f"sliding-window attention on every layer but each {n}th (config.layer_types; llama.cpp's fixed pattern)", ok)


def _meta(*keys, eps="attention.layer_norm_rms_epsilon", eps_attrs=("rms_norm_eps",), theta=_THETA):
    """The metadata llama.cpp's loaders read for every family, plus ``keys`` (a key given again overrides)."""
    base = (
        ("context_length", ("max_position_embeddings", "n_positions"), "u32"),
        ("embedding_length", ("hidden_size",), "u32"),
        ("block_count", ("num_hidden_layers",), "u32"),
        ("feed_forward_length", ("intermediate_size",), "u32"),
        ("attention.head_count", ("num_attention_heads",), "u32"),
        ("attention.head_count_kv", ("num_key_value_heads", "num_attention_heads"), "u32"),
        (eps, eps_attrs, "f32"),
        ("rope.freq_base", theta, "f32"),
        ("vocab_size", ("vocab_size",), "u32"),
    )
    return tuple({k: (k, src, kind) for k, src, kind in base + keys}.values())


# Gemma 2/3: llama.cpp scales attention by 1/sqrt(head_dim); its Gemma 2 reads the head from token_embd
_GEMMA_TENSORS = (
    ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
    ("post_attention_layernorm", "post_attention_norm"), ("pre_feedforward_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
    ("post_feedforward_layernorm", "post_ffw_norm"),
)
_GEMMA_REQ = (
    ("query_pre_attn_scalar equal to head_dim (llama.cpp scales attention scores by 1/sqrt(head_dim))",
     lambda m: m.config.query_pre_attn_scalar == _head_dim(m.config)),
)
_HEAD_DIM_META = (("attention.key_length", _head_dim, "u32"), ("attention.value_length", _head_dim, "u32"))
_GEMMA2_GGUF = GGUFSpec(
    arch="gemma2",
    metadata=_meta(*_HEAD_DIM_META, ("attention.sliding_window", ("sliding_window",), "u32"),
                   ("attn_logit_softcapping", ("attn_logit_softcapping",), "f32"),
                   ("final_logit_softcapping", ("final_logit_softcapping",), "f32")),
    layer_tensors=_GEMMA_TENSORS,
    requires=_GEMMA_REQ + (
        _PLAIN_ROPE,
        _TIED,
        _swa_every(2),
        ("attention and final-logit soft-capping both set (llama.cpp's Gemma 2 always caps)",
         lambda m: m.config.attn_logit_softcapping is not None and m.config.final_logit_softcapping is not None),
    ),
)
def _gemma3_linear_rope(m) -> bool:
    """Gemma 3's rope: unscaled on sliding layers; unscaled or linearly scaled (4B and up) on global ones."""
    rp = getattr(m.config, "rope_parameters", None) or {}
    full, sliding = rp.get("full_attention", rp), rp.get("sliding_attention", {})
    return sliding.get("rope_type", "default") == "default" and full.get("rope_type", "default") in ("default", "linear")


def _linear_rope_factor(c):
    full = (getattr(c, "rope_parameters", None) or {}).get("full_attention", {})
    return full.get("factor") if full.get("rope_type") == "linear" else None


_GEMMA3_GGUF = GGUFSpec(
    arch="gemma3",
    metadata=_meta(*_HEAD_DIM_META, ("attention.sliding_window", ("sliding_window",), "u32"),
                   ("final_logit_softcapping", ("final_logit_softcapping",), "f32"),
                   ("rope.scaling.type", lambda c: "linear" if _linear_rope_factor(c) else None, "str"),
                   ("rope.scaling.factor", _linear_rope_factor, "f32"),
                   theta=("rope_parameters.full_attention.rope_theta",) + _THETA),
    layer_tensors=_GEMMA_TENSORS + (("self_attn.q_norm", "attn_q_norm"), ("self_attn.k_norm", "attn_k_norm")),
    requires=_GEMMA_REQ + (
        ("rope unscaled, or linearly scaled on the global layers only", _gemma3_linear_rope),
        _swa_every(6),
        ("no attention soft-capping (llama.cpp's Gemma 3 has none)", lambda m: m.config.attn_logit_softcapping is None),
        ("sliding layers with rope_theta 10000 (llama.cpp's fixed value for Gemma 3)",
         lambda m: config_value(m.config, ("rope_parameters.sliding_attention.rope_theta", "rope_local_base_freq"))
         in (None, 10000.0)),
    ),
)
_PHI3_GGUF = GGUFSpec(
    arch="phi3",
    metadata=_meta(("rope.dimension_count", _rope_dims, "u32"),
                   ("rope.scaling.original_context_length", ("original_max_position_embeddings",), "u32")),
    layer_tensors=(("input_layernorm", "attn_norm"), ("self_attn.qkv_proj", "attn_qkv"),
                   ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
                   # gate and up fused, gate first: llama.cpp's fused SwiGLU splits ffn_up the same way
                   ("mlp.gate_up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")),
    requires=(_PLAIN_ROPE, _NO_SWA),
)
_OLMO2_GGUF = GGUFSpec(
    arch="olmo2",
    head_required=True,
    metadata=_meta(),
    layer_tensors=(("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                   ("self_attn.o_proj", "attn_output"), ("self_attn.q_norm", "attn_q_norm"),
                   ("self_attn.k_norm", "attn_k_norm"), ("post_attention_layernorm", "post_attention_norm"),
                   ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down"),
                   ("post_feedforward_layernorm", "post_ffw_norm")),
    requires=(_PLAIN_ROPE,),
)
_LAYERNORM_EPS = {"eps": "attention.layer_norm_epsilon", "eps_attrs": ("layer_norm_eps", "layer_norm_epsilon")}
# StableLM: parallel residual blocks have no post_attention_layernorm, which llama.cpp reads as parallel
_STABLELM_GGUF = GGUFSpec(
    arch="stablelm",
    head_required=True,
    metadata=_meta(("rope.dimension_count", _rope_dims, "u32"),
                   ("use_parallel_residual", ("use_parallel_residual",), "bool"), **_LAYERNORM_EPS),
    layer_tensors=(("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                   ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                   ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"),
                   ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")),
    requires=(_PLAIN_ROPE,
              ("no per-head q/k layer norms (qk_layernorm=False; llmquant does not stack them as llama.cpp wants)",
               lambda m: not getattr(m.config, "qk_layernorm", False))),
)

_GELU = ("a GELU MLP (llama.cpp computes the tanh approximation)",
         lambda m: config_value(m.config, ("hidden_act", "activation_function", "activation"))
         in ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh"))
_GPTNEOX_GGUF = GGUFSpec(
    arch="gptneox",
    head_required=True,
    metadata=_meta(("rope.dimension_count", _rope_dims, "u32"),
                   ("use_parallel_residual", ("use_parallel_residual",), "bool"), **_LAYERNORM_EPS),
    layer_tensors=(("input_layernorm", "attn_norm"), ("attention.query_key_value", "attn_qkv"),
                   ("attention.dense", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
                   ("mlp.dense_h_to_4h", "ffn_up"), ("mlp.dense_4h_to_h", "ffn_down")),
    grouped_qkv=(("attention.query_key_value", ("num_attention_heads",), ("num_attention_heads",)),),
    requires=(_PLAIN_ROPE, _GELU),
)
_GPT2_GGUF = GGUFSpec(
    arch="gpt2",
    metadata=_meta(("feed_forward_length", lambda c: c.n_inner or 4 * c.n_embd, "u32"), **_LAYERNORM_EPS),
    model_tensors=(("transformer.wpe", "position_embd"),),
    layer_tensors=(("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
                   ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")),
    transposed=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),  # Conv1D
    requires=(_GELU, (("attention scores scaled by 1/sqrt(head_dim) alone (scale_attn_weights=True, "
                       "scale_attn_by_inverse_layer_idx=False)"),
                      lambda m: m.config.scale_attn_weights and not m.config.scale_attn_by_inverse_layer_idx)),
)


def _falcon_kv_heads(c) -> int:
    """Falcon's key/value head count: num_kv_heads in the new decoder layout, else 1 (multi-query) or one
    per query head."""
    return c.num_kv_heads if c.new_decoder_architecture else (1 if c.multi_query else c.num_attention_heads)


_FALCON_GGUF = GGUFSpec(
    arch="falcon",
    metadata=_meta(("attention.head_count_kv", _falcon_kv_heads, "u32"),
                   ("feed_forward_length", ("ffn_hidden_size",), "u32"), **_LAYERNORM_EPS),
    # Falcon-40B's two norms: llama.cpp feeds attention from attn_norm_2 and the MLP from attn_norm
    layer_tensors=(("input_layernorm", "attn_norm"), ("ln_mlp", "attn_norm"), ("ln_attn", "attn_norm_2"),
                   ("self_attention.query_key_value", "attn_qkv"), ("self_attention.dense", "attn_output"),
                   ("mlp.dense_h_to_4h", "ffn_up"), ("mlp.dense_4h_to_h", "ffn_down")),
    grouped_qkv=(("self_attention.query_key_value", ("num_attention_heads",), _falcon_kv_heads),),
    requires=(_PLAIN_ROPE, _GELU,
              ("attention and MLP in parallel (parallel_attn=True; llama.cpp has no sequential Falcon block)",
               lambda m: m.config.parallel_attn or m.config.new_decoder_architecture),
              ("rotary positions (alibi=False)", lambda m: not m.config.alibi),
              ("linears without biases (bias=False)", lambda m: not m.config.bias)),
)

_GATED = LayerModules()  # Llama's decoder layer: input/post-attention norms, q/k/v/o, gate/up/down
_QKV = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),)
_UP_DOWN = (("mlp.up_proj", ("mlp.down_proj",)),)
_GEMMA_PAIRS = _QKV + (("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),)

ARCHS: list[ArchSpec] = [
    ArchSpec(model_types=("llama",), modules=_GATED, runtime=RuntimeSpec(), gguf=_LLAMA_GGUF),
    ArchSpec(
        model_types=("mistral",),
        modules=_GATED,
        runtime=RuntimeSpec(sliding_window_attr="sliding_window"),
        gguf=dataclasses.replace(_LLAMA_GGUF, requires=(_NO_SWA,)),
    ),
    ArchSpec(
        model_types=("qwen2",),
        modules=_GATED,
        runtime=RuntimeSpec(),
        gguf=GGUFSpec(arch="qwen2", metadata=_LLAMA_META + _LINEAR_ROPE_META, biases=("q", "k", "v"),
                      requires=(_LINEAR_ROPE,)),
    ),
    ArchSpec(
        model_types=("qwen3",),
        modules=LayerModules(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
        runtime=RuntimeSpec(),
        gguf=GGUFSpec(arch="qwen3", metadata=_LLAMA_META + _LINEAR_ROPE_META, requires=(_LINEAR_ROPE,)),
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
        gguf=_PHI3_GGUF,
    ),
    # Gemma 2/3: RMSNorms scale by (1 + weight); norms before and after attention and MLP, and the one
    # feeding the MLP is pre_feedforward_layernorm (post_attention_layernorm's output joins the residual)
    ArchSpec(model_types=("gemma2",), norm_to_linears=_GEMMA_PAIRS, linear_to_linears=_UP_DOWN, norm_offset=1.0,
             gguf=_GEMMA2_GGUF),
    ArchSpec(model_types=("gemma3_text",), norm_to_linears=_GEMMA_PAIRS, linear_to_linears=_UP_DOWN, norm_offset=1.0,
             gguf=_GEMMA3_GGUF),
    # mixture-of-experts: post_attention_layernorm feeds the router and the experts, so only attention folds
    ArchSpec(model_types=("mixtral", "qwen3_moe"), norm_to_linears=_QKV),
    ArchSpec(model_types=("qwen2_moe",), norm_to_linears=_QKV,
             linear_to_linears=(("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",)),),
             float_modules=("mlp.shared_expert_gate",)),
    # OLMo 2 normalizes after attention and MLP: its linears read the residual stream, no norm feeds them
    ArchSpec(model_types=("olmo2",), linear_to_linears=_UP_DOWN, gguf=_OLMO2_GGUF),
    ArchSpec(
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        gguf=_GPTNEOX_GGUF,
        norm_to_linears=(("input_layernorm", ("attention.query_key_value",)),
                         ("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
    ),
    # Falcon and StableLM blocks are parallel (one norm, or two, feeding attention and MLP) or sequential
    # depending on the config: their pairs come from tracing the model
    ArchSpec(model_types=("falcon",), layers="transformer.h", embed="transformer.word_embeddings",
             final_norm="transformer.ln_f", gguf=_FALCON_GGUF),
    ArchSpec(model_types=("stablelm",), gguf=_STABLELM_GGUF),
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
        gguf=_GPT2_GGUF,
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
    if out is None or inp is None:
        return False
    for attr in ("weight", "qweight"):  # float modules, or packed ones sharing their codes (QuantEmbedding.sharing)
        a, b = getattr(out, attr, None), getattr(inp, attr, None)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a is b or (a.data_ptr() == b.data_ptr() and a.numel() == b.numel())
    return False


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows, or None when it does not say."""
    cfg = getattr(model, "config", None)
    for k in ("max_position_embeddings", "n_positions", "max_seq_len"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None
