"""packed_avx2 (C++ int4/int8 kernel) against the reference path, fusion, selection and fallback."""

import pytest
import torch

from llmquant import kernels
from llmquant.algorithms import ALGORITHMS
from llmquant.kernels import native, packed_cpu
from llmquant.modules import QuantLinear
from llmquant.schemes import PRESETS, QuantScheme

SCHEMES = ["W8", "W8G128", "W4", "W4G32", "W4G64", "W4G128A", "gguf:Q8_0", "gguf:Q4_1",
           # codes of other widths, widened to a byte each at load: 3/2 bits, llama.cpp's 5-bit types
           "W3G32", "W2G32", "gguf:Q5_0", "gguf:Q5_1", "gguf:Q5_K",
           # groups of 16 (two per block of 32 on the 8-bit path)
           "gguf:Q6_K", "gguf:Q3_K", "gguf:Q2_K"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _qlin(scheme, n=96, k=256, bias=True, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k)
    q, s, z = ALGORITHMS["rtn"](w, scheme, name="t")
    return QuantLinear.from_quantized(q, s, z, scheme, bias=torch.randn(n) if bias else None)


def _run(m, x, kernel):
    m.kernel_override = kernel
    return m(x)


def test_extension_builds_here():
    # the test machine has a compiler and AVX2: the fast path must be there, not silently missing
    assert native.load() is not None, native.why_unavailable()


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_matches_reference(name, rows):
    scheme = PRESETS[name]
    m = _qlin(scheme)
    x = torch.randn(2, rows, 256)
    ref = _run(m, x, "reference")
    y = _run(m, x, "packed_avx2")
    assert m.prepared_kernel.name == "packed_avx2"
    assert y.shape == ref.shape and y.dtype == ref.dtype
    # same weights; activations rounded to int16 per 256 values: errors ~2^-16 of the inputs. From 16 rows
    # on (prefill) fbgemm's fp16-weight GEMM runs: exact integer codes for per-channel schemes, weights
    # rounded to fp16 (2^-11 relative) for grouped ones; both far below any weight quantization step.
    tol = 2e-3 if rows * 2 >= 16 and scheme.granularity == "group" else 1e-4
    assert (y - ref).abs().max() <= tol * ref.abs().max()


def test_per_tensor_and_ragged_group():
    for scheme in (QuantScheme(bits=8, granularity="tensor"), QuantScheme(bits=4, group_size=96)):  # 256 = 2x96 + 64
        m = _qlin(scheme, bias=False)
        x = torch.randn(5, 256)
        ref = _run(m, x, "reference")
        assert (_run(m, x, "packed_avx2") - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_bf16_activations():
    m = _qlin(PRESETS["W4G64"])
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    ref = _run(m, x.float(), "reference")
    y = _run(m, x, "packed_avx2")
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_fused_call_equals_separate_calls():
    mods = [_qlin(PRESETS["W4G32"], n=n, seed=i) for i, n in enumerate((64, 32, 32))]
    mods[1] = _qlin(QuantScheme(bits=4, group_size=32, symmetric=False), n=32, seed=5)  # asym among sym
    kernel = kernels.KERNELS["packed_avx2"]
    states = []
    for m in mods:
        m.kernel_override = "packed_avx2"
        k, st = m.prepare_kernel(torch.device("cpu"), torch.float32)
        assert k is kernel and isinstance(st, packed_cpu.PackedState)
        states.append(st)
    fused = kernel.fuse(mods, states)
    assert fused is not None
    # other widths or bit widths do not fuse: the caller runs the modules one by one
    other = _qlin(PRESETS["W8"], n=32, seed=9)
    other.kernel_override = "packed_avx2"
    assert kernel.fuse(mods + [other], states + [other.prepare_kernel(torch.device("cpu"), torch.float32)[1]]) is None
    assert kernels.KERNELS["fbgemm_fp16"].fuse(mods, states) is None  # the default: no fusion
    run3 = QuantLinear.fused_runner(mods, torch.device("cpu"), torch.float32)
    for rows in (1, 2, 17):
        x = torch.randn(rows, 256)
        sep = torch.cat([m(x) for m in mods], -1)
        assert torch.equal(torch.cat(run3(x), -1), fused(x))
        # from LARGE_M rows a single module runs fbgemm's fp16-weight GEMM, the fused call an fp32 dequant
        atol = 1e-5 if rows < packed_cpu.LARGE_M else 2e-3 * float(sep.abs().max())
        assert torch.allclose(fused(x), sep, rtol=0, atol=atol)


def test_unsupported_formats_fall_through():
    m16 = _qlin(QuantScheme(bits=4, group_size=16))  # 4-bit codes in groups of 16: not this kernel
    m72 = _qlin(PRESETS["W4"], k=72)  # in_features not a multiple of 32
    for m in (m16, m72):
        assert not packed_cpu.PackedAVX2().supports(m, torch.device("cpu"))
        assert kernels.select(m, torch.device("cpu")).name == "fbgemm_fp16"
    assert kernels.select(_qlin(PRESETS["W4G64"]), torch.device("cpu")).name == "packed_avx2"


def test_clean_fallback_when_extension_unavailable(monkeypatch):
    saved = dict(native._state)
    try:
        native._state.clear()
        monkeypatch.setenv("LLMQUANT_NATIVE", "0")
        assert native.load() is None
        assert "LLMQUANT_NATIVE" in native.why_unavailable()
        m = _qlin(PRESETS["W4G64"])
        assert kernels.select(m, torch.device("cpu")).name == "fbgemm_fp16"
        x = torch.randn(1, 256)
        y = _run(m, x, None)
        assert m.prepared_kernel.name == "fbgemm_fp16"
        ref = _run(m, x, "reference")
        assert (y - ref).abs().max() <= 1e-3 * ref.abs().max()
    finally:
        native._state.clear()
        native._state.update(saved)


@pytest.mark.parametrize("name", ["W8", "W4G64", "gguf:Q4_1"])
def test_prefill_under_bf16_autocast(name):
    """Opt-in fast prefill: under llmquant.autocast("bf16") many-token inputs run a bf16 GEMM with the
    dequantized weight rounded to bf16 once, exactly what autocast does for a float Linear."""
    import llmquant

    m = _qlin(PRESETS[name])
    x = torch.randn(2, 20, 256)
    w = m.dequantize_weight(dtype=torch.float32)
    with llmquant.autocast("bf16"):
        y = _run(m, x, "packed_avx2")
        expect = torch.nn.functional.linear(x, w, m.bias)  # autocast's own bf16 Linear on the float weight
        one = _run(m, x[:, :1], "packed_avx2")  # decode rows keep the fp32 weight-only path
    assert m.prepared_kernel.name == "packed_avx2" and y.dtype == expect.dtype == torch.bfloat16
    assert (y.float() - expect.float()).abs().max() <= 1e-2 * expect.float().abs().max()
    assert one.dtype == torch.float32
    assert m.kernel_state.prefill["bf16"][0].dtype == torch.bfloat16  # kept for the next prompt
    m.reset_kernel()
    assert m.kernel_state is None and m.prepared_kernel is None
