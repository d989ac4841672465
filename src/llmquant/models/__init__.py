"""Per-architecture facts as data: one record per model family (decoder-layer paths, norm -> linear pairs,
lean-runtime and GGUF facts), plus tied embeddings and context length."""

from .arch import ARCHS, arch_for, arch_for_gguf, context_length, model_types_with, tied_lm_head
from .trace import decoder_layers, fused_expert_params, is_linear, trace_layer
from .spec import (
    ArchSpec,
    GGUFSpec,
    LayerModules,
    RuntimeSpec,
    config_value,
    gguf_tensor_names,
    gguf_to_hf_name,
    gguf_value_change,
    grouped_qkv_order,
    hf_to_gguf_name,
    permute_heads_for,
    resolve,
    rope_row_order,
    row_order_for,
)

__all__ = [
    "ARCHS",
    "ArchSpec",
    "GGUFSpec",
    "LayerModules",
    "RuntimeSpec",
    "arch_for",
    "arch_for_gguf",
    "config_value",
    "decoder_layers",
    "fused_expert_params",
    "is_linear",
    "trace_layer",
    "context_length",
    "gguf_tensor_names",
    "gguf_to_hf_name",
    "gguf_value_change",
    "grouped_qkv_order",
    "hf_to_gguf_name",
    "model_types_with",
    "permute_heads_for",
    "resolve",
    "rope_row_order",
    "row_order_for",
    "tied_lm_head",
]
