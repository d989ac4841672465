"""The lean runtime: same greedy tokens as transformers' generate, batching, stops, sampling, streaming."""

import pytest
import torch

import llmquant
from llmquant.errors import GenerationError, UnsupportedModelError
from llmquant.kernels import set_kernel
from llmquant.runtime import GenerationStats, LeanModel
from llmquant.schemes import QuantConfig

from conftest import make_tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_greedy(model, ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_matches_transformers(seed):
    m = make_tiny_llama(vocab_size=512, seed=seed)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(seed))
    ours = llmquant.generate(m, ids, 16, use_eos=False)
    assert torch.equal(ours, _hf_greedy(m, ids, 16))


def _tiny(cfg_name, **kw):
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("cfg", ["Qwen2Config", "Qwen3Config", "MistralConfig"])
def test_other_families_match_transformers(cfg):
    m = _tiny(cfg, **({"head_dim": 16} if cfg == "Qwen3Config" else {}))
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
    assert torch.equal(llmquant.generate(m, ids, 12, use_eos=False), _hf_greedy(m, ids, 12))


def test_left_padded_batch_equals_single_runs():
    m = make_tiny_llama(vocab_size=512)
    a = torch.randint(0, 512, (1, 5), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1), b])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    out = llmquant.generate(m, batch, 10, attention_mask=mask, use_eos=False)
    assert torch.equal(out[0], llmquant.generate(m, a, 10, use_eos=False)[0])
    assert torch.equal(out[1], llmquant.generate(m, b, 10, use_eos=False)[0])


def test_stop_tokens_and_streaming():
    m = make_tiny_llama(vocab_size=512)
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(4))
    full = llmquant.generate(m, ids, 12, use_eos=False)
    stop = int(full[0, 3])
    first = int((full[0] == stop).nonzero()[0])
    seen = []
    out = llmquant.generate(m, ids, 12, use_eos=False, stop_tokens=[stop], callback=lambda i, t: seen.append(int(t[0])))
    assert out.shape == (1, first + 1) and int(out[0, -1]) == stop
    assert seen == out[0].tolist() and torch.equal(out[0], full[0, : first + 1])


def test_sampling():
    m = make_tiny_llama(vocab_size=512)
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(5))
    greedy = llmquant.generate(m, ids, 10, use_eos=False)
    kw = dict(do_sample=True, temperature=0.7, use_eos=False)
    s1 = llmquant.generate(m, ids, 10, seed=7, **kw)
    assert torch.equal(s1, llmquant.generate(m, ids, 10, seed=7, **kw))  # seeded: reproducible
    assert torch.equal(llmquant.generate(m, ids, 10, seed=8, top_k=1, **kw), greedy)  # top-1 is greedy
    assert torch.equal(llmquant.generate(m, ids, 10, seed=9, top_p=1e-6, **kw), greedy)  # smallest nucleus
    hot = torch.cat([llmquant.generate(m, ids, 10, seed=s, do_sample=True, temperature=50.0, use_eos=False) for s in range(3)])
    assert len(set(hot.flatten().tolist())) > 10  # a hot distribution actually samples
    with pytest.raises(GenerationError):
        llmquant.generate(m, ids, 4, do_sample=True, temperature=0)


def test_quantized_model_through_packed_kernel():
    m = make_tiny_llama(vocab_size=512, hidden=128)
    llmquant.quantize(m, "W4G32", progress=False)
    lean = LeanModel(m)
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(6))
    stats = GenerationStats()
    fast = llmquant.generate(m, ids, 12, use_eos=False, lean=lean, stats=stats)
    assert "packed_avx2" in stats.kernels and stats.new_tokens == 12 and stats.threads == torch.get_num_threads()
    # logits of the lean path (fused packed kernel) vs the model's own forward on the reference kernel
    cache = lean.new_cache(2, 8)
    lean_logits = lean(ids, cache, all_logits=True)
    set_kernel(m, "reference")
    with torch.no_grad():
        ref_logits = m(ids).logits
    # 16 tokens at once: unfused and fused linears take fbgemm's fp16-weight GEMM (grouped weights rounded
    # to fp16, 2^-11 relative each; measured 1.3e-3 of the largest logit through the tiny model)
    assert (lean_logits - ref_logits).abs().max() <= 4e-3 * ref_logits.abs().max()
    assert torch.equal(llmquant.generate(m, ids, 12, use_eos=False), fast)


def test_prefill_bf16(monkeypatch):
    """The prompt's forward under bf16 autocast (fused packed linears take a cached bf16 weight), decode fp32."""
    from llmquant.kernels import packed_cpu

    m = make_tiny_llama(vocab_size=512, hidden=128)
    llmquant.quantize(m, QuantConfig(weight="W8", head="fp32"), progress=False)
    lean = LeanModel(m, compiled=False)  # decode steps in Python, where the spy below sees their calls
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(7))
    exact = lean(ids, lean.new_cache(1, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = lean(ids, lean.new_cache(1, 24))
    assert fast.dtype == torch.bfloat16  # the float head under autocast
    assert (fast.float() - exact).abs().max() <= 0.05 * exact.abs().max()  # bf16 activations: ~2^-8 relative
    assert not torch.equal(fast.float(), exact)  # the bf16 path did run
    # generate(prefill_bf16=True): every packed call of the prompt (24 rows) runs under bf16 autocast, every
    # decode call (1 row) in fp32; without the flag none does
    calls = []
    run_fused = packed_cpu.run_fused

    def spy(states, x, *args):
        calls.append((x.shape[:-1].numel(), packed_cpu.autocast_bf16(x)))
        return run_fused(states, x, *args)

    monkeypatch.setattr(packed_cpu, "run_fused", spy)
    out = llmquant.generate(m, ids, 6, use_eos=False, lean=lean, prefill_bf16=True)
    assert out.shape == (1, 6)
    prompt = [bf16 for rows, bf16 in calls if rows == 24]
    decode = [bf16 for rows, bf16 in calls if rows == 1]
    assert len(prompt) == 4 * 2 and all(prompt)  # per layer: q/k/v, o, gate/up, down
    assert len(decode) == 4 * 2 * 5 and not any(decode)
    calls.clear()
    plain = llmquant.generate(m, ids, 6, use_eos=False, lean=lean)
    assert calls and not any(bf16 for _, bf16 in calls)
    assert torch.equal(plain, llmquant.generate(m, ids, 6, use_eos=False))


def test_rotated_w8a8_through_lean():
    """Dynamic W8A8 with a Hadamard rotation: the lean runtime rotates each input as the module's forward does."""
    m = make_tiny_llama(vocab_size=512, hidden=128)
    llmquant.quantize_dynamic(m, weight_bits=8, rotation=64, progress=False)
    lean = LeanModel(m)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = m(ids).logits
    assert (lean(ids, lean.new_cache(1, 12), all_logits=True) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_errors():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(UnsupportedModelError, match="Llama-family"):
        LeanModel(gpt2)
    # generate falls back to the model's own forward for a family the lean runtime does not run
    assert torch.equal(llmquant.generate(gpt2, torch.tensor([1, 2]), 3, use_eos=False), _hf_greedy(gpt2, torch.tensor([[1, 2]]), 3))
    m = make_tiny_llama(vocab_size=512)
    with pytest.raises(GenerationError, match="tokenizer"):
        llmquant.generate(m, "hello", 2)
    with pytest.raises(GenerationError):
        llmquant.generate(m, torch.tensor([1, 2]), 0)


@pytest.mark.integration
def test_default_model_text_prompt_matches_transformers(default_model_and_tokenizer):
    model, tok = default_model_and_tokenizer
    prompt = "The for statement is used to"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    ours = llmquant.generate(model, prompt, 8, use_eos=False)
    assert torch.equal(ours, _hf_greedy(model, ids, 8))


def test_streamed_bf16_model_generates_as_its_forward(tmp_path, monkeypatch):
    """A model quantized from a streamed bf16 checkpoint keeps its embedding/head in bf16 (FloatEmbedding /
    FloatLinear computing in fp32): the lean runtime computes in fp32 too, and its greedy tokens are the
    model forward's, whether the head is upcast once and kept or a block of rows per call (large heads);
    prefill without a kept fp16 weight copy (past the budget) gives the same tokens."""
    import llmquant.kernels.packed_cpu as packed
    import llmquant.runtime.lean as lean

    make_tiny_llama(vocab_size=1000, layers=2, tie=False).to(torch.bfloat16).save_pretrained(str(tmp_path / "m"))
    model, _ = llmquant.load_model(tmp_path / "m", stream=True)
    llmquant.quantize(model, QuantConfig(weight="W4G32", head="fp32"), progress=False, output=tmp_path / "q")
    q, _ = llmquant.load(tmp_path / "q")
    assert type(q.lm_head).__name__ == "FloatLinear" and q.lm_head.weight.dtype == torch.bfloat16
    prompt = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(3))
    ids, ref = prompt, []
    with torch.no_grad():
        for _ in range(6):
            nxt = q(ids).logits[:, -1].argmax(-1, keepdim=True)
            ref.append(int(nxt))
            ids = torch.cat([ids, nxt], 1)
    assert llmquant.generate(q, prompt, max_new_tokens=6, use_eos=False)[0].tolist() == ref
    monkeypatch.setattr(lean, "_UPCAST_KEPT_MAX", 0)
    monkeypatch.setattr(packed, "PREFILL_CACHE_BYTES", 0)
    set_kernel(q, None)  # prepared again: no prefill copy may be kept now
    assert llmquant.generate(q, prompt, max_new_tokens=6, use_eos=False)[0].tolist() == ref
    assert not any(getattr(getattr(m, "kernel_state", None), "prefill", {}).get("fp16") for m in q.modules())


def test_prefill_budget_follows_machine_memory(monkeypatch):
    """The prefill-copy budget: the environment's MB when set, else an eighth of the memory limit (the
    machine's, or a cgroup's lower one), never below 512 MB."""
    import llmquant.kernels.packed_cpu as packed
    from llmquant import resources

    total = resources.memory_limit_bytes()
    assert total > 1e9  # this machine's memory is known
    monkeypatch.delenv("LLMQUANT_PREFILL_CACHE_MB", raising=False)
    assert packed._prefill_budget() == max(512_000_000, total // 8)
    monkeypatch.setattr(packed, "memory_limit_bytes", lambda: 2_000_000_000)
    assert packed._prefill_budget() == 512_000_000
    monkeypatch.setattr(packed, "memory_limit_bytes", lambda: 64_000_000_000)
    assert packed._prefill_budget() == 8_000_000_000
    monkeypatch.setenv("LLMQUANT_PREFILL_CACHE_MB", "100")
    assert packed._prefill_budget() == 100_000_000
