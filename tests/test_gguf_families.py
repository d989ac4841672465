"""GGUF export of every decoder family llama.cpp runs: llama.cpp itself (the prebuilt wheel cyllama) loads a
tiny random model of each family, float and RTN-quantized, and computes the logits transformers / llmquant
compute; a family or a config llama.cpp cannot run is refused with one clean error and nothing written."""

import pytest
import torch

import llmquant
from llmquant.errors import ExportError
from llmquant.eval.llama_cpp import emulate_llama_cpp, llama_cpp_logits
from llmquant.kernels import set_kernel
from llmquant.models import model_types_with

from families import make_family
from test_llama_cpp import IDS, _kl, _logits  # the same 48 token ids, the same measures

pytestmark = pytest.mark.usefixtures("one_thread")

# llama.cpp scales Gemma's attention by 1/sqrt(head_dim) (the config's default query_pre_attn_scalar, 256, is
# refused below); Gemma 3 gets 6 layers so that layer 5 is global, as llama.cpp's fixed pattern has it (an
# all-sliding model leaves llama.cpp a global KV cache of no layers, which it cannot allocate)
_GEMMA2 = {"query_pre_attn_scalar": 16}
_GEMMA3 = {"query_pre_attn_scalar": 16, "num_hidden_layers": 6}
#: case -> (family, config overrides); the layouts llama.cpp branches on get a case each
CASES = {
    "llama": ("llama", {}),
    # Llama 3.1's rope scaling (rope_freqs.weight, computed from the config) with a short original context,
    # so that most frequencies are scaled; linear scaling (rope.scaling.* keys)
    "llama-rope-llama3": ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                                         "rope_theta": 10000.0}}),
    "llama-rope-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}),
    "mistral-full-attention": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma2": ("gemma2", _GEMMA2),
    "gemma3_text": ("gemma3_text", _GEMMA3),
    "gemma3_text-untied": ("gemma3_text", dict(_GEMMA3, tie_word_embeddings=False)),
    "gemma3_text-linear-rope": ("gemma3_text", {**_GEMMA3, "rope_parameters": {  # Gemma 3 4B and up
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "olmo2-tied": ("olmo2", {"tie_word_embeddings": True}),
    "stablelm": ("stablelm", {}),
    "stablelm-parallel-qkv-bias": ("stablelm", {"use_parallel_residual": True, "use_qkv_bias": True}),
    "gpt_neox": ("gpt_neox", {}),
    "gpt_neox-sequential": ("gpt_neox", {"use_parallel_residual": False}),
    "falcon": ("falcon", {}),
    "falcon-40b-layout": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "gpt2": ("gpt2", {}),
}
NOT_QUANTIZABLE: set = set()  # every family quantizes (GPT-2's Conv1D as the nn.Linear it computes)




def _model(case):
    family, overrides = CASES[case]
    return make_family(family, vocab_size=400, **overrides)  # the tiny BPE tokenizer's 400 tokens


@pytest.mark.parametrize("case", list(CASES))
def test_llama_cpp_computes_float_export(case, tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """Float (F32) export: KL(transformers || llama.cpp) below 1e-4 and max |logit diff| below 0.05 on 48
    positions, logits of magnitude ~7 (measured: KL 1e-7..4e-6, max diff 0.004..0.03; the rest is llama.cpp's
    f16 KV cache and its tanh GELU for GPT-NeoX / Falcon's erf GELU). A wrong row order, norm offset, missing
    soft-cap or window puts KL at 0.1..1.5."""
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    m = _model(case)
    ref = _logits(m)
    rep = llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "m.gguf", float_type="F32", progress=False)
    assert not rep.inexact and set(rep.type_counts()) == {"F32"}
    got = llama_cpp_logits(tmp_path / "m.gguf", IDS)
    assert got.shape == tuple(ref.shape)
    assert _kl(ref, got) < 1e-4
    assert float((torch.as_tensor(got) - ref).abs().max()) < 0.05


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] not in NOT_QUANTIZABLE])
def test_llama_cpp_computes_quantized_export(case, tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """RTN onto gguf:Q4_0, written as Q4_0 blocks bit for bit: KL(llmquant emulating llama.cpp's Q8_0
    activation rounding || llama.cpp) below 0.005 (measured 1e-4..1.2e-3), and at least 10x closer than the
    float model is to the file (float: 0.02..0.25 away), so the quantized values are what llama.cpp runs."""
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    m = _model(case)
    fl = _logits(m)
    llmquant.quantize(m, "gguf:Q4_0", progress=False)
    set_kernel(m, "reference")
    rep = llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "m.gguf", progress=False)
    assert not rep.inexact and rep.type_counts()["Q4_0"] > 0
    got = llama_cpp_logits(tmp_path / "m.gguf", IDS)
    ours = _logits(emulate_llama_cpp(m))
    assert _kl(ours, got) < 0.005
    assert _kl(fl, got) > 10 * _kl(ours, got)


@pytest.mark.parametrize("family", ["opt", "mixtral", "qwen2_moe"])
def test_family_without_gguf_facts_refused(family, tmp_path, tiny_bpe_tokenizer):
    """OPT (llama.cpp has no OPT architecture) and the fused-expert MoE families: one ExportError naming the
    supported families, nothing written."""
    m = make_family(family, vocab_size=400)
    with pytest.raises(ExportError, match="GGUF export knows no tensor names") as e:
        llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "m.gguf", progress=False)
    assert all(t in str(e.value) for t in model_types_with("gguf"))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("family,overrides,needs", [
    ("gemma2", {}, "query_pre_attn_scalar equal to head_dim"),
    ("gemma2", dict(_GEMMA2, tie_word_embeddings=False), "output head tied"),
    ("gemma2", dict(_GEMMA2, final_logit_softcapping=None), "soft-capping both set"),
    ("gemma3_text", dict(_GEMMA3, attn_logit_softcapping=20.0), "no attention soft-capping"),
    ("gemma3_text", {**_GEMMA3, "rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6},
                                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "linearly scaled on the global layers only"),
    ("mistral", {}, "no sliding window shorter than the context"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 32}}, "scaled as Llama 3.1 does"),
    ("qwen2", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 32}}, "rope unscaled or linearly scaled"),
    ("phi3", {"sliding_window": 8}, "no sliding window shorter than the context"),
    ("stablelm", {"qk_layernorm": True}, "per-head q/k layer norms"),
    ("falcon", {"alibi": True}, "alibi=False"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=False"),
])
def test_config_llama_cpp_cannot_run_refused(family, overrides, needs, tmp_path, tiny_bpe_tokenizer):
    """A supported family whose config asks for what llama.cpp does not compute: one ExportError saying
    what is needed, nothing written."""
    m = make_family(family, vocab_size=400, **overrides)
    with pytest.raises(ExportError, match="cannot run this") as e:
        llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "m.gguf", progress=False)
    assert needs in str(e.value)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["gemma2", "gpt2", "gpt_neox", "falcon-40b-layout"])
def test_gguf_reader_undoes_the_export(case, tmp_path, tiny_bpe_tokenizer):
    """The streaming GGUF reader gives back the Hugging Face tensors: rows regrouped back, GPT-2's Conv1D
    weights transposed back (exact), Gemma's stored 1 + w less 1 (float32 rounding of the sum: < 1e-6)."""
    from llmquant.io.gguf_import import GGUFCheckpoint

    m = _model(case)
    llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "m.gguf", float_type="F32", progress=False)
    ckpt = GGUFCheckpoint(tmp_path / "m.gguf", m.config)
    sd = m.state_dict()
    names = set(ckpt.tensors) & set(sd)  # the reader also offers a Falcon norm under its other layout's name
    assert len(names) >= len(sd) - 1  # a tied head is read from the embedding
    for name in names:
        got = ckpt.tensor(name)
        if "norm" in name and case == "gemma2":
            assert torch.allclose(got, sd[name], atol=1e-6, rtol=0) and not torch.equal(got, sd[name] + 1), name
        else:
            assert torch.equal(got, sd[name]), name
