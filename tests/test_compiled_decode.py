"""The lean runtime's compiled decode step (C++, one call per token) against its Python step: logits per step
for float, weight-only packed, int8-activation and Python-fallback linears, q/k norms, biases, GQA; batches
(left-padded, per-row positions and key masks); greedy tokens; the switch; the fallback when the extension is
unavailable."""

import pytest
import torch

import llmquant
from llmquant.kernels import native, set_kernel
from llmquant.runtime import LeanModel, compiled
from llmquant.schemes import QuantConfig

from conftest import make_tiny_llama
from families import make_family

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(native.load() is None, reason="the compiled extension cannot be built here")]

PROMPT, STEPS = 5, 12


def _quantized(family: str, scheme: str | None, kernel: str | None = None, **overrides):
    if family == "mistral":  # its tiny config's window (8) is shorter than the steps here
        overrides.setdefault("sliding_window", 64)
    m = make_family(family, **overrides)
    if scheme is not None:
        llmquant.quantize(m, QuantConfig(weight=scheme, head=scheme), progress=False)
    set_kernel(m, kernel)
    return m


@torch.inference_mode()
def _decode_logits(model, compiled_on: bool, vocab: int, seed: int = 3) -> torch.Tensor:
    """Logits of STEPS one-token steps (fixed tokens) after a PROMPT-token prompt, from a fresh LeanModel."""
    lean = LeanModel(model, compiled=compiled_on)
    ids = torch.randint(3, vocab, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(seed))
    cache = lean.new_cache(1, PROMPT + STEPS)
    lean(ids[:, :PROMPT], cache)
    out = [lean(ids[:, i:i + 1], cache) for i in range(PROMPT, PROMPT + STEPS)]
    assert (lean.compiled_step() is not None) == compiled_on
    return torch.cat(out, 1)[0]  # (STEPS, vocab)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# Tolerances, relative to the largest logit: the steps differ by fp32 summation order (about 1e-6 through the
# tiny models); packed_avx2 rounds each activation row to int16 per chunk of 256 (a step of 2^-15 of the chunk's
# largest value), so a 1e-7 difference upstream moves a few values by a whole int16 step (measured up to 1.1e-4).
FP32, INT16 = 1e-5, 5e-4
# (family, scheme, kernel, whether every linear runs natively, tolerance)
CASES = [
    ("llama", None, None, True, FP32),  # fp32 nn.Linear: at::linear
    ("llama", "W8", None, True, INT16),  # packed_avx2, 8 bits per channel
    ("llama", "W4G32", None, True, INT16),
    ("llama", "gguf:Q4_0", None, True, INT16),
    ("llama", "gguf:Q5_0", None, True, INT16),  # 5-bit codes widened to a byte at load
    ("llama", "W3G32", None, True, INT16),
    ("qwen3", "gguf:Q4_0", None, True, INT16),  # q/k norms
    ("qwen3", None, None, True, FP32),
    ("qwen2", "W4G32", None, True, INT16),  # q/k/v biases (stacked bias of a fused call)
    ("mistral", "W8", None, True, INT16),
    ("llama", "gguf:Q4_0", "fbgemm_fp16", False, FP32),  # a kernel without a native spec: its Python callable
    ("llama", "W4G32", "dequant_cached", False, FP32),
]


@pytest.mark.parametrize("family,scheme,kernel,native_only,tol", CASES)
def test_logits_match_python_step(family, scheme, kernel, native_only, tol):
    m = _quantized(family, scheme, kernel)
    py = _decode_logits(m, False, 256)
    c = _decode_logits(m, True, 256)
    assert _rel(c, py) <= tol
    lean = LeanModel(m)
    lean.new_cache(1, 4)
    assert lean.compiled_step().needs_python == (not native_only)


@pytest.mark.parametrize("scheme", ["gguf:Q4_0", "W8"])
def test_packed_q8act_logits(scheme):
    """Int8 activation rounding: an fp32-order difference can move one activation across a rounding boundary
    of its block (a code step, 1/127 of the block's largest value), so steps agree closely, not to fp32."""
    m = _quantized("llama", scheme, "packed_q8act")
    py = _decode_logits(m, False, 256)
    c = _decode_logits(m, True, 256)
    lean = LeanModel(m)
    lean.new_cache(1, 4)
    assert not lean.compiled_step().needs_python
    assert _rel(c, py) <= 2e-2
    assert torch.equal(c.argmax(-1), py.argmax(-1))


@pytest.mark.parametrize("scheme", ["gguf:Q6_K", "gguf:Q2_K"])
def test_k_quants_in_groups_of_16(scheme):
    """Q6_K / Q2_K (groups of 16, codes widened to a byte) run natively; k-quants need rows of 256."""
    m = _quantized("llama", scheme, None, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                   num_key_value_heads=2)
    assert _rel(_decode_logits(m, True, 256), _decode_logits(m, False, 256)) <= INT16
    lean = LeanModel(m)
    lean.new_cache(1, 4)
    assert not lean.compiled_step().needs_python


def test_gqa_and_wider_heads():
    """8 query heads on 2 kv heads, head_dim 32, more layers, a longer cache."""
    m = _quantized("llama", "W4G32", None, num_attention_heads=8, num_key_value_heads=2, hidden_size=256,
                   intermediate_size=320, num_hidden_layers=3)
    assert _rel(_decode_logits(m, True, 256), _decode_logits(m, False, 256)) <= INT16


@pytest.mark.parametrize("scheme,kernel,tol", [("gguf:Q4_0", None, INT16), ("W8", None, INT16),
                                               ("gguf:Q8_0", "packed_q8act", 2e-2)])
def test_one_b_head_layout(scheme, kernel, tol):
    """The ~1B benchmark checkpoint's attention layout (bench_streaming.py --shape 1b: 32 query heads on 4 kv
    heads, head_dim 64, intermediate 2.75 x hidden) at a tenth of its width: 16 heads on 2 kv heads (groups
    of 8), head_dim 64; every linear native, logits and greedy tokens as the Python step's."""
    m = _quantized("llama", scheme, kernel, num_attention_heads=16, num_key_value_heads=2, hidden_size=1024,
                   intermediate_size=2816, num_hidden_layers=2)
    lean = LeanModel(m)
    lean.new_cache(1, 4)
    assert (lean.n_heads, lean.n_kv, lean.head_dim) == (16, 2, 64)
    assert not lean.compiled_step().needs_python
    c, py = _decode_logits(m, True, 256), _decode_logits(m, False, 256)
    assert _rel(c, py) <= tol
    assert torch.equal(c.argmax(-1), py.argmax(-1))
    if kernel is None:  # weight-only: whole greedy runs agree too
        ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(2))
        on = llmquant.generate(m, ids, 16, use_eos=False, lean=LeanModel(m, compiled=True))
        off = llmquant.generate(m, ids, 16, use_eos=False, lean=LeanModel(m, compiled=False))
        assert torch.equal(on, off)


def test_greedy_tokens_identical():
    m = make_tiny_llama(vocab_size=512, hidden=128)
    llmquant.quantize(m, "gguf:Q4_0", progress=False)
    ids = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(5))
    on = llmquant.generate(m, ids, 24, use_eos=False, lean=LeanModel(m, compiled=True))
    off = llmquant.generate(m, ids, 24, use_eos=False, lean=LeanModel(m, compiled=False))
    assert torch.equal(on, off)


def test_ragged_width_mixes_native_and_python_linears():
    """Width 72: packed_avx2 takes only down_proj (160 inputs); the other linears (fbgemm_fp16) run through
    their Python callables within the same step."""
    m = make_tiny_llama(vocab_size=300)
    llmquant.quantize(m, "W8", progress=False)
    assert _rel(_decode_logits(m, True, 300), _decode_logits(m, False, 300)) <= INT16
    lean = LeanModel(m)
    lean.new_cache(1, 4)
    assert lean.compiled_step().needs_python


def test_switch_off_runs_python_path(monkeypatch):
    m = _quantized("llama", "W4G32")
    monkeypatch.setenv(compiled.ENV, "0")
    lean = LeanModel(m)
    lean.new_cache(1, 4)
    assert not lean.compiled and lean.compiled_step() is None
    assert torch.equal(_decode_logits(m, False, 256), _decode_logits_env_default(m))


@torch.inference_mode()
def _decode_logits_env_default(model) -> torch.Tensor:
    lean = LeanModel(model)  # compiled=None: the environment decides
    ids = torch.randint(3, 256, (1, PROMPT + STEPS), generator=torch.Generator().manual_seed(3))
    cache = lean.new_cache(1, PROMPT + STEPS)
    lean(ids[:, :PROMPT], cache)
    return torch.cat([lean(ids[:, i:i + 1], cache) for i in range(PROMPT, PROMPT + STEPS)], 1)[0]


def test_extension_unavailable_falls_back(monkeypatch, caplog):
    m = _quantized("llama", None)
    expected = _decode_logits(m, False, 256)
    monkeypatch.setattr(native, "load", lambda: None)
    monkeypatch.setattr(native, "why_unavailable", lambda: "disabled by the test")
    with caplog.at_level("DEBUG", logger="llmquant.runtime.compiled"):
        got = _decode_logits_env_default(m)
    assert torch.equal(got, expected)
    assert "extension is unavailable (disabled by the test)" in caplog.text


def test_bf16_model_falls_back(caplog):
    m = _quantized("llama", None).to(torch.bfloat16)
    lean = LeanModel(m)
    lean.new_cache(1, 4)
    with caplog.at_level("DEBUG", logger="llmquant.runtime.compiled"):
        assert lean.compiled_step() is None
    assert "computes in fp32" in caplog.text


@torch.inference_mode()
def _batched_logits(model, compiled_on: bool, batch: int = 3, seed: int = 4) -> torch.Tensor:
    """Per-step logits (batch, STEPS, vocab) of a left-padded batch (row r padded by 2r tokens) decoded with
    fixed tokens, each row with its own RoPE positions and key mask, as generate() drives the runtime. With
    the compiled step on, the Python step's linears are made to fail after the prompt: every decode step must
    run compiled."""
    lean = LeanModel(model, compiled=compiled_on)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (batch, PROMPT + STEPS), generator=g)
    mask = torch.ones(batch, PROMPT, dtype=torch.bool)
    for r in range(batch):
        mask[r, :min(2 * r, PROMPT - 1)] = False
    cache = lean.new_cache(batch, PROMPT + STEPS)
    key_mask = torch.ones(batch, cache.max_len, dtype=torch.bool)
    key_mask[:, :PROMPT] = mask
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    lean(ids[:, :PROMPT], cache, key_mask, positions)
    if compiled_on:
        def fail(x):
            raise AssertionError("a decode step ran in Python")

        for L in lean.layers:
            L.qkv = L.gate_up = L.o = L.down = fail
    pos = positions[:, -1:]
    out = []
    for i in range(PROMPT, PROMPT + STEPS):
        pos = pos + 1
        out.append(lean(ids[:, i:i + 1], cache, key_mask, pos))
    return torch.cat(out, 1)


@pytest.mark.parametrize("family,scheme,kernel,tol", [
    ("llama", None, None, FP32), ("llama", "W4G32", None, INT16), ("qwen3", "gguf:Q4_0", None, INT16),
    ("qwen2", "W4G32", None, INT16), ("llama", "gguf:Q4_0", "packed_q8act", 2e-2),
    ("llama", "W8", "packed_q8act", 2e-2)])
def test_batched_left_padded_matches_python_step(family, scheme, kernel, tol):
    """A batch of 3 left-padded sequences (RoPE positions and key mask per row) through the compiled step:
    the Python step's logits at every step, for float, packed_avx2 and packed_q8act linears, q/k norms, biases."""
    m = _quantized(family, scheme, kernel)
    c, py = _batched_logits(m, True), _batched_logits(m, False)
    assert _rel(c, py) <= tol
    assert torch.equal(c.argmax(-1), py.argmax(-1))


def test_batched_rows_are_independent():
    """Each row of an unpadded batch decodes as it would alone (float linears: fp32 order only)."""
    m = _quantized("llama", None)
    lean = LeanModel(m, compiled=True)
    ids = torch.randint(3, 256, (2, PROMPT + 4), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        cache = lean.new_cache(2, PROMPT + 4)
        lean(ids[:, :PROMPT], cache)
        both = torch.cat([lean(ids[:, i:i + 1], cache) for i in range(PROMPT, PROMPT + 4)], 1)
        for r in range(2):
            c1 = lean.new_cache(1, PROMPT + 4)
            lean(ids[r:r + 1, :PROMPT], c1)
            one = torch.cat([lean(ids[r:r + 1, i:i + 1], c1) for i in range(PROMPT, PROMPT + 4)], 1)
            assert _rel(both[r], one[0]) <= FP32


def test_batched_greedy_and_large_batches():
    """Left-padded generate() with the step on = off (weight-only int4: same tokens); a batch of MAX_BATCH
    rows (a prefill to the packed kernels) runs the Python step and agrees as well."""
    m = _quantized("llama", "W4G32")
    ids = torch.randint(3, 256, (3, 6), generator=torch.Generator().manual_seed(8))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0
    mask[2, :4] = 0
    kw = dict(use_eos=False, attention_mask=mask)
    on = llmquant.generate(m, ids, 10, lean=LeanModel(m, compiled=True), **kw)
    off = llmquant.generate(m, ids, 10, lean=LeanModel(m, compiled=False), **kw)
    assert torch.equal(on, off)
    big = torch.randint(3, 256, (compiled.MAX_BATCH, 4), generator=torch.Generator().manual_seed(9))
    lean = LeanModel(m, compiled=True)
    on = llmquant.generate(m, big, 3, use_eos=False, lean=lean)
    assert lean._step is None  # never built: no step was eligible
    assert torch.equal(on, llmquant.generate(m, big, 3, use_eos=False, lean=LeanModel(m, compiled=False)))


def test_step_checks_its_inputs():
    m = _quantized("llama", None)
    lean = LeanModel(m, compiled=True)
    cache = lean.new_cache(2, 8)
    step = lean.compiled_step()
    h = torch.zeros(2, lean.final_w.numel())
    with pytest.raises(RuntimeError, match="batch = h's rows"):
        step.step(h[:1], cache.k, cache.v, lean._cos, lean._sin, 0)
    with pytest.raises(RuntimeError, match="one entry per row"):
        step.step(h, cache.k, cache.v, lean._cos, lean._sin, 0, torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="key_mask"):
        step.step(h, cache.k, cache.v, lean._cos, lean._sin, 3, None, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="outside the table"):
        step.step(h, cache.k, cache.v, lean._cos, lean._sin, 0, torch.tensor([0, 99]))


def test_spec_runs_like_kernel():
    """One LinearSpec on its own equals the kernel's Python call on the same row."""
    m = _quantized("qwen2", "W4G32")
    attn = m.model.layers[0].self_attn
    mods = [attn.q_proj, attn.k_proj, attn.v_proj]
    from llmquant.modules import QuantLinear

    spec = QuantLinear.native_spec(mods, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 64)
    want = torch.cat(QuantLinear.fused_runner(mods, torch.device("cpu"), torch.float32)(x), -1)
    assert torch.equal(spec(x), want)
