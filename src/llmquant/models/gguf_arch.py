"""GGUF (llama.cpp) facts per architecture, as data: tensor names HF <-> GGUF, the metadata keys and the
config attributes they come from, and the q/k row permutation llama.cpp's converter applies.

Adding an architecture is adding an entry to ``GGUF_ARCHS``. Names follow llama.cpp's
``convert_hf_to_gguf.py`` / ``gguf-py/gguf/tensor_mapping.py``; ``{i}`` is the decoder layer index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GGUFArch:
    model_types: tuple[str, ...]  # Hugging Face config.model_type values
    arch: str  # GGUF general.architecture
    # (HF parameter name, GGUF tensor name); per-layer entries use {i}
    tensors: tuple[tuple[str, str], ...]
    # (GGUF key without the "<arch>." prefix, candidate config attributes (first found wins), value kind)
    metadata: tuple[tuple[str, tuple[str, ...], str], ...]
    # HF parameter name -> config attribute holding the head count its rows are permuted with. llama.cpp's
    # llama converter reorders q/k rows from HF's rotate-half layout to interleaved rope pairs.
    permute_rows: tuple[tuple[str, str], ...] = ()


_LLAMA_LAYER = (
    ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
)
_GLOBAL = (
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
)
_BIASES = (
    ("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias"),
    ("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias"),
    ("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias"),
)
_QK_NORM = (
    ("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    ("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
)
_META = (
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

GGUF_ARCHS: list[GGUFArch] = [
    GGUFArch(
        model_types=("llama", "mistral"),
        arch="llama",
        tensors=_GLOBAL + _LLAMA_LAYER,
        metadata=_META,
        permute_rows=(
            ("model.layers.{i}.self_attn.q_proj.weight", "num_attention_heads"),
            ("model.layers.{i}.self_attn.k_proj.weight", "num_key_value_heads"),
        ),
    ),
    GGUFArch(model_types=("qwen2",), arch="qwen2", tensors=_GLOBAL + _LLAMA_LAYER + _BIASES, metadata=_META),
    GGUFArch(model_types=("qwen3",), arch="qwen3", tensors=_GLOBAL + _LLAMA_LAYER + _QK_NORM, metadata=_META),
]


def gguf_arch_for(model_type: str | None) -> GGUFArch | None:
    for a in GGUF_ARCHS:
        if model_type in a.model_types:
            return a
    return None


def gguf_arch_by_name(arch: str) -> GGUFArch | None:
    return next((a for a in GGUF_ARCHS if a.arch == arch), None)


def supported_model_types() -> list[str]:
    return [t for a in GGUF_ARCHS for t in a.model_types]


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def hf_to_gguf_name(arch: GGUFArch, hf_name: str) -> str | None:
    """The GGUF tensor name of a Hugging Face parameter, or None if the architecture has no place for it."""
    for hf, gg in arch.tensors:
        m = _template_regex(hf).match(hf_name)
        if m:
            return gg.format(i=m.group("i")) if "{i}" in gg else gg
    return None


def gguf_to_hf_name(arch: GGUFArch, gguf_name: str) -> str | None:
    for hf, gg in arch.tensors:
        m = _template_regex(gg).match(gguf_name)
        if m:
            return hf.format(i=m.group("i")) if "{i}" in hf else hf
    return None


def permute_heads_for(arch: GGUFArch, hf_name: str) -> str | None:
    """Config attribute with the head count ``hf_name``'s rows are permuted by, or None."""
    for hf, attr in arch.permute_rows:
        if _template_regex(hf).match(hf_name):
            return attr
    return None


def rope_row_order(rows: int, n_head: int) -> list[int]:
    """Row order llama.cpp's llama converter writes q/k in: GGUF row r holds HF row ``order[r]``.

    HF keeps, per head, the first halves of the rope pairs then the second halves; llama.cpp interleaves
    them (``reshape(n_head, 2, rows/n_head/2).swapaxes(1, 2)``)."""
    half = rows // n_head // 2
    return [h * 2 * half + j * half + p for h in range(n_head) for p in range(half) for j in range(2)]


def config_value(config, attrs: tuple[str, ...]):
    """The first of ``attrs`` (dotted paths into dicts/attributes) the config has, else None."""
    for path in attrs:
        obj = config
        for part in path.split("."):
            obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None
