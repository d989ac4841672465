"""The per-family record: one entry per model type, pairs and GGUF tensor names derived from module paths."""

import pytest

from llmquant.models import (
    ARCHS,
    ArchSpec,
    GGUFSpec,
    LayerModules,
    RuntimeSpec,
    arch_for,
    arch_for_gguf,
    gguf_tensor_names,
    gguf_to_hf_name,
    hf_to_gguf_name,
    model_types_with,
    permute_heads_for,
)


def test_each_model_type_has_one_record():
    types = [t for spec in ARCHS for t in spec.model_types]
    assert len(types) == len(set(types))
    assert all(arch_for(t).model_types == spec.model_types for spec in ARCHS for t in spec.model_types)
    assert arch_for("no-such-family") is None and arch_for(None) is None


def test_llama_facts_derive_from_its_module_paths():
    spec = arch_for("llama")
    assert spec.norm_to_linears == (
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    )
    assert spec.linear_to_linears == (("mlp.up_proj", ("mlp.down_proj",)),)
    assert hf_to_gguf_name(spec, "model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
    assert hf_to_gguf_name(spec, "lm_head.weight") == "output.weight"
    assert hf_to_gguf_name(spec, "model.layers.3.self_attn.q_proj.bias") is None  # llama's GGUF map has no biases
    assert permute_heads_for(spec, "model.layers.3.self_attn.k_proj.weight") == "num_key_value_heads"
    assert permute_heads_for(spec, "model.layers.3.self_attn.v_proj.weight") is None
    for hf, gg in gguf_tensor_names(spec):  # the map is one-to-one both ways
        assert gguf_to_hf_name(spec, gg.format(i=5)) == hf.format(i=5)
    assert arch_for_gguf("llama") is spec and arch_for_gguf("qwen3") is arch_for("qwen3")
    assert hf_to_gguf_name(arch_for("qwen3"), "model.layers.0.self_attn.k_norm.weight") == "blk.0.attn_k_norm.weight"
    assert hf_to_gguf_name(arch_for("qwen2"), "model.layers.0.self_attn.v_proj.bias") == "blk.0.attn_v.bias"
    assert model_types_with("runtime") == ["llama", "mistral", "qwen2", "qwen3"]
    assert model_types_with("gguf") == ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "olmo2",
                                        "gpt_neox", "falcon", "stablelm", "gpt2"]


def test_gguf_names_of_families_without_llama_modules():
    """GGUF names from a record's layer_tensors / model_tensors: weight and bias both map, one-to-one."""
    neox, gpt2 = arch_for("gpt_neox"), arch_for("gpt2")
    assert hf_to_gguf_name(neox, "gpt_neox.layers.1.attention.query_key_value.bias") == "blk.1.attn_qkv.bias"
    assert hf_to_gguf_name(neox, "gpt_neox.final_layer_norm.bias") == "output_norm.bias"
    assert hf_to_gguf_name(gpt2, "transformer.wpe.weight") == "position_embd.weight"
    assert hf_to_gguf_name(arch_for("gemma2"), "model.layers.0.post_feedforward_layernorm.weight") == "blk.0.post_ffw_norm.weight"
    for hf, gg in gguf_tensor_names(gpt2):
        assert gguf_to_hf_name(gpt2, gg.format(i=5)) == hf.format(i=5)


def test_a_new_family_is_one_data_entry():
    mods = LayerModules(input_norm="ln1", post_norm="ln2", q="attn.wq", k="attn.wk", v="attn.wv", o="attn.wo",
                        gate="ffn.w1", up="ffn.w3", down="ffn.w2")
    spec = ArchSpec(model_types=("toy",), layers="net.blocks", modules=mods, runtime=RuntimeSpec(),
                    gguf=GGUFSpec(arch="llama", metadata=(), biases=("q",)))
    assert spec.norm_to_linears == (("ln1", ("attn.wq", "attn.wk", "attn.wv")), ("ln2", ("ffn.w1", "ffn.w3")))
    assert spec.linear_to_linears == (("ffn.w3", ("ffn.w2",)),)
    assert hf_to_gguf_name(spec, "net.blocks.2.ffn.w2.weight") == "blk.2.ffn_down.weight"
    assert gguf_to_hf_name(spec, "blk.1.attn_q.bias") == "net.blocks.1.attn.wq.bias"
    with pytest.raises(ValueError, match="need modules"):
        ArchSpec(model_types=("bad",), runtime=RuntimeSpec())


def test_grouped_qkv_order():
    """Per-group [q..., k, v] rows (GPT-NeoX: one group per head; Falcon: per kv head) become q | k | v."""
    from llmquant.models import grouped_qkv_order

    assert grouped_qkv_order(6, 2, 2) == [0, 3, 1, 4, 2, 5]  # [q0 k0 v0 q1 k1 v1], head_dim 1
    assert grouped_qkv_order(4, 2, 1) == [0, 1, 2, 3]  # multi-query: already q q k v
    assert grouped_qkv_order(8, 4, 2) == [0, 1, 4, 5, 2, 6, 3, 7]  # [q0 q1 k0 v0 q2 q3 k1 v1]
