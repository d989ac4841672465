"""llama.cpp itself (the prebuilt wheel cyllama) loads the GGUF files llmquant writes and computes the logits
llmquant computes for the same model, k-quants and llama.cpp's Q4_K_M mixture included."""

import numpy as np
import pytest
import torch

import llmquant
from llmquant.eval.llama_cpp import emulate_llama_cpp, llama_cpp_logits
from llmquant.kernels import set_kernel

from conftest import make_tiny_llama

IDS = [(7 * i) % 400 for i in range(48)]


def _kl(p_logits, q_logits):
    p = torch.as_tensor(p_logits).double().log_softmax(-1)
    q = torch.as_tensor(q_logits).double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _logits(m):
    with torch.no_grad():
        return m(torch.tensor([IDS])).logits[0]


@pytest.mark.parametrize("config", ["gguf:Q2_K", "gguf:Q3_K", "gguf:Q4_K", "gguf:Q5_K", "gguf:Q6_K", "gguf:Q4_K_M"])
def test_llama_cpp_computes_our_quantized_model(config, tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """KL(llmquant || llama.cpp) on 48 positions of a tiny random model, llmquant emulating llama.cpp's 8-bit
    activation rounding (Q8_K for k-quant weights, Q8_0 for the rest): at most 0.01 (measured 0.003-0.005;
    the rest is llama.cpp's own arithmetic: f16 KV cache, fused kernels). The same model in float is 0.15
    (Q6_K) to 5.8 (Q2_K) away, so a wrong block layout could not pass."""
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    m = make_tiny_llama(vocab_size=400, hidden=256, layers=2)
    fl = _logits(m)
    if config.endswith("_M"):
        llmquant.quantize(m, config, progress=False)
    else:  # down_proj has 160 inputs, no whole super-block: Q8_0 there
        llmquant.quantize(m, llmquant.QuantConfig(weight=config, ignore=("lm_head", "re:.*down_proj")), progress=False)
        llmquant.quantize(m, "gguf:Q8_0", progress=False)
    set_kernel(m, "reference")
    rep = llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "m.gguf", progress=False)
    assert not rep.inexact
    got = llama_cpp_logits(tmp_path / "m.gguf", IDS)
    ours = _logits(emulate_llama_cpp(m))
    assert got.shape == tuple(ours.shape)
    assert _kl(ours, got) < 0.01
    assert _kl(fl, got) > 10 * _kl(ours, got)


def test_rtn_kquant_matches_llama_cpp_quantizer(tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """llama.cpp's own quantizer (llama_model_quantize through the wheel) and llmquant's RTN onto the same
    k-quant grid, on the same fp32 tensor: llmquant's squared error is within 4% of llama.cpp's (measured
    1.000 for Q6_K, 1.008-1.027 for the others; the difference: llmquant rounds the group scales against the
    fp16 super-scale and searches Q3_K's group scales as Q6_K's)."""
    from gguf import GGUFReader, quants

    import cyllama.llama.llama_cpp as cpp
    from llmquant.algorithms import rtn_quantize
    from llmquant.schemes import PRESETS, dequantize

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    m = make_tiny_llama(vocab_size=400, hidden=256, layers=2)
    llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "f32.gguf", float_type="F32", progress=False)
    w = torch.from_numpy(np.asarray(
        [t for t in GGUFReader(str(tmp_path / "f32.gguf")).tensors if t.name == "blk.0.ffn_up.weight"][0].data).copy())
    # llama.cpp file types whose mixture leaves ffn_up on the base type: Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K
    for name, ftype in (("Q2_K", 10), ("Q3_K", 12), ("Q4_K", 15), ("Q5_K", 17), ("Q6_K", 18)):
        p = cpp.LlamaModelQuantizeParams()
        p.ftype, p.nthread = ftype, 1
        out = tmp_path / f"{name}.gguf"
        cpp.model_quantize(str(tmp_path / "f32.gguf"), str(out), p)
        t = [t for t in GGUFReader(str(out)).tensors if t.name == "blk.0.ffn_up.weight"][0]
        assert t.tensor_type.name == name
        theirs = torch.from_numpy(quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape))
        s = PRESETS[f"gguf:{name}"]
        ours = dequantize(*rtn_quantize(w, s), s)
        ratio = float(((ours - w) ** 2).mean() / ((theirs - w) ** 2).mean())
        assert 0.97 < ratio < 1.04, (name, ratio)


def test_batched_decode_equals_one_sequence_at_a_time(tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """llama.cpp's batched decode (one sequence id per prompt, one KV cache; the benchmarks' llama.cpp side of
    batched serving) gives each sequence the greedy tokens its logits give alone."""
    from llmquant.eval.llama_cpp import LlamaCpp

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    m = make_tiny_llama(vocab_size=400, hidden=256, layers=2)
    llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "m.gguf", float_type="F32", progress=False)
    prompts = [IDS[i:i + 12] for i in (0, 5, 17)]
    with LlamaCpp(tmp_path / "m.gguf") as cpp:
        out, tps = cpp.batched_decode(prompts, 6)
        assert tps > 0 and [len(o) for o in out] == [6, 6, 6]
        for p, o in zip(prompts, out):
            assert cpp.logits(p + o[:-1]).argmax(-1)[len(p) - 1:].tolist() == o
        with pytest.raises(ValueError, match="one length"):
            cpp.batched_decode([IDS[:3], IDS[:4]], 4)
