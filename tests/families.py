"""Tiny random models of every decoder family the test matrix covers, built from transformers configs."""

from __future__ import annotations

import torch

_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128)
_GQA = dict(num_key_value_heads=2)
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

#: family -> (transformers config class, its arguments beyond the common ones)
FAMILIES = {
    "llama": ("LlamaConfig", _GQA),
    "mistral": ("MistralConfig", dict(_GQA, sliding_window=8)),
    "qwen2": ("Qwen2Config", _GQA),
    "qwen3": ("Qwen3Config", dict(_GQA, head_dim=16)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(_GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_GQA, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32)),
    "mixtral": ("MixtralConfig", dict(_GQA, num_local_experts=4, num_experts_per_tok=2)),
    "gemma2": ("Gemma2Config", dict(_GQA, head_dim=16, sliding_window=4)),
    "gemma3_text": ("Gemma3TextConfig", dict(_GQA, head_dim=16, sliding_window=4)),
    "phi3": ("Phi3Config", _GQA),
    "olmo2": ("Olmo2Config", _GQA),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "falcon": ("FalconConfig", {}),
    "gpt2": ("GPT2Config", {}),
    "opt": ("OPTConfig", dict(ffn_dim=128, word_embed_proj_dim=64)),
    "stablelm": ("StableLmConfig", _GQA),
}


def make_family(name: str, seed: int = 0, **overrides):
    """A tiny random model of family ``name`` (hidden 64, 2 layers, vocab 256) with weights larger than the
    init's, so quantization error shows in the logits, and every norm's weight and bias away from 1 / 0."""
    import transformers

    cls, kw = FAMILIES[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls)(**{**_COMMON, **_IDS, **kw, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() >= 2 else p.add_(0.1 * torch.randn_like(p))
    return model
