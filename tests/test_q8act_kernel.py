"""packed_q8act (C++: activations rounded to int8 per block of 32, integer dot products) against an exact
float64 reference that rounds x the same way, on both instruction-set paths; fusion, prefill, selection, and
greedy tokens of a tiny model against the reference kernel with the same activation rounding."""

import copy
import os
import shutil

import pytest
import torch

import llmquant
from llmquant import kernels
from llmquant.algorithms import ALGORITHMS
from llmquant.errors import LLMQuantError
from llmquant.kernels import native, packed_cpu, packed_q8act
from llmquant.modules import QuantLinear
from llmquant.runtime.lean import LeanModel
from llmquant.schemes import PRESETS, QuantScheme, compute_qparams, dequantize, quantize_to_int

from conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

ACT = PRESETS["gguf:Q8_0-act"]
CPU = torch.device("cpu")


def _ext():
    """The compiled module; where it cannot be built, the kernel must be absent (and then only because this
    machine has no compiler or no AVX2: with both, a failed build fails here, loudly)."""
    ext = native.load()
    if ext is None:
        has_compiler = shutil.which(os.environ.get("CXX", "c++")) is not None
        assert not (has_compiler and native.cpu_has_avx2()), native.why_unavailable()
    return ext


def _qlin(scheme, n=97, k=256, bias=True, seed=0, act=None):
    torch.manual_seed(seed)
    w = torch.randn(n, k)
    q, s, z = ALGORITHMS["rtn"](w, scheme, name="t")
    return QuantLinear.from_quantized(q, s, z, scheme, bias=torch.randn(n) if bias else None, activation_scheme=act)


def _x_hat(x):
    """x rounded as llama.cpp's Q8_0 blocks (llmquant's gguf:Q8_0-act scheme): (values, codes, scales)."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    s, z = compute_qparams(x2, ACT)
    q = quantize_to_int(x2, s, z, ACT)
    return dequantize(q, s, z, ACT).reshape(x.shape), q, s


def _exact(m, x):
    """The integer dot products and scales in float64: (y, sum |x_hat| |W| per output for the tolerance)."""
    xh = _x_hat(x)[0].double()
    w = m.dequantize_weight(dtype=torch.float64)
    b = 0 if m.bias is None else m.bias.double()
    return xh @ w.T + b, xh.abs() @ w.abs().T


def _isas(ext):
    """The instruction sets to test here: AVX2 always, VNNI where the CPU has it."""
    return ["avx2", "vnni"] if ext.q8_best_isa() == 1 else ["avx2"]


def _schemes():
    out = []
    for bits in (4, 8):
        for sym in (True, False):
            for gs in (32, 64, 128, None):
                gran = "channel" if gs is None else "group"
                out.append(QuantScheme(bits=bits, symmetric=sym, granularity=gran, group_size=gs))
    return out + [PRESETS[p] for p in ("gguf:Q8_0", "gguf:Q4_0", "gguf:Q4_1", "gguf:Q4_K",
                                       "gguf:Q5_0", "gguf:Q5_1", "gguf:Q5_K", "W3G32", "W2G64",
                                       "gguf:Q6_K", "gguf:Q3_K", "gguf:Q2_K")] + [QuantScheme(bits=8, group_size=16)]


def test_extension_builds_and_reports_isa():
    ext = _ext()
    if ext is None:
        assert not packed_q8act.PackedQ8Act().supports(_qlin(PRESETS["W4G64"]), CPU)
        return
    assert ext.q8_best_isa() in (0, 1)
    if ext.q8_best_isa() == 0:  # no AVX512-VNNI here: asking for it is an error, not a silent AVX2 run
        with pytest.raises(RuntimeError, match="VNNI"):
            ext.q8gemm(torch.zeros(1, 32), [torch.zeros(16, dtype=torch.uint8)], [torch.ones(1, 1)],
                       [torch.zeros(1, 1)], 4, 32, 1, [0])


def test_rounding_is_the_q8_0_activation_scheme():
    ext = _ext()
    if ext is None:
        return
    x = torch.randn(5, 256) * torch.tensor([1e-7, 1e-3, 1.0, 50.0, 3e4]).unsqueeze(1)
    x[2, :32] = 0.0  # an all-zero block
    x[2, 32:64] = torch.arange(32) * 0.25 - 4.0  # amax 4 -> d = fp16(4 / 127); plus ties at d = 0.5 below
    x[2, 64:96] = torch.tensor([63.5] + [0.25, 0.75, -0.25, -0.75, 1.25] * 6 + [0.0])  # d = 0.5: x / d = k + 0.5
    codes, scales = ext.q8_quantize(x.contiguous())
    _, q, s = _x_hat(x)
    assert torch.equal(scales, s.float())
    live = s.float().repeat_interleave(32, 1) > 0  # an underflowed scale: the block is 0 whatever its codes
    assert torch.equal(codes[live], q.to(torch.int8)[live])
    assert torch.equal(codes[2, 65:71], torch.tensor([0, 2, 0, -2, 2, 0], dtype=torch.int8))  # half to even
    assert (codes[~live] == 0).all() and (~live).any()


@pytest.mark.parametrize("scheme", _schemes(), ids=lambda s: f"b{s.bits}{'s' if s.symmetric else 'a'}{s.group_size or 'ch'}"
                         + ("k" if s.super_group else "") + ("z" if s.zero_point == "min" else ""))
def test_matches_exact_integer_reference(scheme, monkeypatch):
    ext = _ext()
    if ext is None:
        return
    k = 320 if scheme.group_size == 128 else 256  # 320 = 2 x 128 + 64: a ragged last group
    m = _qlin(scheme, k=k)
    for isa in _isas(ext):
        monkeypatch.setenv("LLMQUANT_Q8ACT_ISA", isa)
        m.kernel_override = "packed_q8act"
        m.reset_kernel()
        for rows in (1, 2, 3, 4):
            x = torch.randn(rows, k) * 3
            y = m(x)
            assert m.prepared_kernel.name == "packed_q8act" and m.kernel_state.isa == packed_q8act.ISAS[isa]
            ref, mag = _exact(m, x)
            # exact int32 dot products per block; what is left is fp32 scaling and summation order (measured
            # ~2e-7 of sum |x_hat| |W|); one activation code off would be ~1e-4
            assert y.dtype == torch.float32 and y.shape == ref.shape
            assert ((y.double() - ref).abs() <= 2e-6 * mag + 1e-6).all(), ((y.double() - ref).abs() / mag).max()


@pytest.mark.parametrize("scheme", _schemes(), ids=lambda s: f"b{s.bits}{'s' if s.symmetric else 'a'}{s.group_size or 'ch'}"
                         + ("k" if s.super_group else "") + ("z" if s.zero_point == "min" else ""))
@pytest.mark.parametrize("layout", ["rows", "tiled", "tiled8"])
def test_many_rows_match_exact_integer_reference(scheme, layout, monkeypatch):
    """Many rows of x in one call (prefill): on VNNI the 8-output-row tiles (lanes = weight rows, the weight
    blocks transposed once per chunk of 256 rows of x), the segment's last rows by the row kernel; the same
    exact integer block sums as the reference, also across a chunk boundary and with 2 threads. ``tiled``
    keeps codes widened from 2-6 bits at 6 bits in the tiles, ``tiled8`` at 8."""
    ext = _ext()
    if ext is None:
        return
    k = 320 if scheme.group_size == 128 else 256
    m = _qlin(scheme, n=61, k=k, bias=False)  # 7 tiles of 8 rows and 5 rows left
    monkeypatch.setenv("LLMQUANT_Q8ACT_LAYOUT", layout)
    for isa in _isas(ext):
        monkeypatch.setenv("LLMQUANT_Q8ACT_ISA", isa)
        m.kernel_override = "packed_q8act"
        m.reset_kernel()
        m(torch.randn(1, k))
        # every group size takes the tiled layout on VNNI (groups of 16: two scales per block of 32)
        st = m.kernel_state
        assert (st.tiled is not None) == (layout != "rows" and isa == "vnni")
        if st.tiled is not None:
            assert st.tiled[3] == (6 if layout == "tiled" and scheme.bits <= 6 and scheme.bits not in (4, 8) else st.bits)
        args = packed_q8act.q8gemm_args([m.kernel_state])
        for rows in (1, 3, 8, 13, 260):
            x = torch.randn(rows, k) * 3
            x[rows // 2, :32] = 0.0  # an all-zero block
            y = ext.q8gemm(x, *args)
            ref, mag = _exact(m, x)
            assert ((y.double() - ref).abs() <= 2e-6 * mag + 1e-6).all(), ((y.double() - ref).abs() / mag).max()
            torch.set_num_threads(2)
            try:
                assert torch.equal(ext.q8gemm(x, *args), y)
            finally:
                torch.set_num_threads(1)


def test_isa_paths_and_layouts_agree_and_threads_do_not_change_results(monkeypatch):
    """The row layout: both instruction sets compute the same int32 block sums, then the same fp32 operations
    (equal bit for bit). The tiled layout (VNNI): the same block sums added in another order (equal to
    rounding); the number of threads changes neither."""
    ext = _ext()
    if ext is None:
        return
    m = _qlin(PRESETS["gguf:Q8_0"], n=301)
    x = torch.randn(3, 256)
    m.kernel_override = "packed_q8act"
    outs = {}
    for layout in ("rows", "tiled"):
        monkeypatch.setenv("LLMQUANT_Q8ACT_LAYOUT", layout)
        for isa in _isas(ext):
            monkeypatch.setenv("LLMQUANT_Q8ACT_ISA", isa)
            m.reset_kernel()
            outs[layout, isa] = y = m(x)
            assert (m.kernel_state.tiled is not None) == (layout == "tiled" and isa == "vnni")
            torch.set_num_threads(2)
            try:
                assert torch.equal(m(x), y)  # rows are split between threads, each computed as on one
            finally:
                torch.set_num_threads(1)
    assert torch.equal(outs["rows", "avx2"], outs["rows", _isas(ext)[-1]])
    for y in outs.values():
        torch.testing.assert_close(y, outs["rows", "avx2"], rtol=1e-6, atol=1e-5)
    monkeypatch.setenv("LLMQUANT_Q8ACT_LAYOUT", "columns")
    m.reset_kernel()
    with pytest.raises(LLMQuantError, match="LLMQUANT_Q8ACT_LAYOUT"):
        m(x)


def test_isa_switch(monkeypatch):
    monkeypatch.setenv("LLMQUANT_Q8ACT_ISA", "sse")
    with pytest.raises(LLMQuantError, match="LLMQUANT_Q8ACT_ISA"):
        packed_q8act.isa_from_env()
    monkeypatch.setenv("LLMQUANT_Q8ACT_ISA", "AVX2")
    assert packed_q8act.isa_from_env() == 0
    monkeypatch.delenv("LLMQUANT_Q8ACT_ISA")
    assert packed_q8act.isa_from_env() == -1


def test_fused_call_equals_separate_calls():
    if _ext() is None:
        return
    mods = [_qlin(PRESETS["W4G32"], n=n, seed=i) for i, n in enumerate((64, 33, 32))]
    mods[1] = _qlin(QuantScheme(bits=4, group_size=32, symmetric=False), n=33, seed=5)  # asym among sym
    kernel = kernels.KERNELS["packed_q8act"]
    states = []
    for m in mods:
        m.kernel_override = "packed_q8act"
        k, st = m.prepare_kernel(CPU, torch.float32)
        assert k is kernel
        states.append(st)
    fused = kernel.fuse(mods, states)
    assert fused is not None
    other = _qlin(PRESETS["W8"], n=32, seed=9)  # other bits: not fused
    other.kernel_override = "packed_q8act"
    assert kernel.fuse(mods + [other], states + [other.prepare_kernel(CPU, torch.float32)[1]]) is None
    for rows in (1, 4, 17):
        x = torch.randn(rows, 256)
        sep = torch.cat([m(x) for m in mods], -1)
        if rows < packed_cpu.LARGE_M:
            assert torch.equal(fused(x), sep)  # each output row is computed alike, fused or not
        else:  # prefill: a fused fp32 dequant against fbgemm's fp16-weight GEMM per module
            assert torch.allclose(fused(x), sep, rtol=0, atol=2e-3 * float(sep.abs().max()))


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_prefill_on_the_input_the_module_sees(mode, monkeypatch):
    """Prefill with LLMQUANT_Q8ACT_PREFILL=fp32 (or without VNNI): packed_avx2's path on the input as the
    module's activation scheme sees it. int8 (the default) on VNNI: the int8 kernel, exact block sums."""
    ext = _ext()
    if ext is None:
        return
    monkeypatch.setenv("LLMQUANT_Q8ACT_PREFILL", mode)
    int8 = mode == "int8" and ext.q8_best_isa() == 1
    x = torch.randn(2, 10, 256)  # 20 rows: prefill
    m = _qlin(PRESETS["W4G64"])
    m.kernel_override = "packed_avx2"
    expect = m(x)
    m.kernel_override = "packed_q8act"
    y = m(x)
    assert m.prepared_kernel.name == "packed_q8act"
    if int8:  # weight-only module, int8 prefill: the integer reference
        ref, mag = _exact(m, x.reshape(-1, 256))
        assert ((y.reshape(-1, y.shape[-1]).double() - ref).abs() <= 2e-6 * mag + 1e-6).all()
    else:
        assert torch.equal(y, expect)
    a = _qlin(PRESETS["gguf:Q4_0"], act=ACT)  # activations rounded as llama.cpp: prefill rounds them too
    a.kernel_override = "reference"
    ref = a(x)
    a.kernel_override = "packed_q8act"
    y = a(x)
    assert (y - ref).abs().max() <= 1e-5 * ref.abs().max()
    monkeypatch.setenv("LLMQUANT_Q8ACT_PREFILL", "fp16")
    with pytest.raises(LLMQuantError, match="LLMQUANT_Q8ACT_PREFILL"):
        a(x)


def test_selection_is_opt_in_and_q8_0_act_modules_are_exact():
    ext = _ext()
    assert "packed_q8act" in kernels.KERNELS
    assert all("packed_q8act" not in order for order in kernels.PREFERENCE.values())
    m = _qlin(PRESETS["gguf:Q4_0"])
    assert kernels.select(m, CPU).name != "packed_q8act"  # never the automatic choice
    a = _qlin(PRESETS["gguf:Q4_0"], act=ACT)
    other = _qlin(PRESETS["gguf:Q4_0"], act=PRESETS["gguf:Q8_K-act"])  # blocks of 256: not this kernel
    assert not kernels.KERNELS["packed_q8act"].supports(other, CPU)
    if ext is None:
        return
    assert kernels.KERNELS["packed_q8act"].supports(a, CPU)
    x = torch.randn(3, 256)
    a.kernel_override = "reference"
    ref = a(x)
    a.kernel_override = "packed_q8act"
    assert (a(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_greedy_tokens_equal_the_reference_with_the_same_activation_rounding():
    """A tiny model under the lean runtime: packed_q8act on the weight-only model against the reference
    kernel on a copy whose linears carry the gguf:Q8_0-act activation scheme (what llama.cpp computes)."""
    if _ext() is None:
        return
    model = make_tiny_llama(hidden=64)  # widths 64 and 160: multiples of 32
    llmquant.quantize(model, "gguf:Q4_0", progress=False)
    emulated = copy.deepcopy(model)
    for mod in emulated.modules():
        if isinstance(mod, QuantLinear):
            mod.activation_scheme = ACT
    kernels.set_kernel(emulated, "reference")
    kernels.set_kernel(model, "packed_q8act")
    ids = torch.randint(0, 49152, (1, 8))  # 8 rows: the prompt pass runs the int8 kernel too
    got = llmquant.generate(model, ids, 24, use_eos=False)
    want = llmquant.generate(emulated, ids, 24, use_eos=False)
    assert {m.prepared_kernel.name for m in model.modules() if isinstance(m, QuantLinear)} == {"packed_q8act"}
    assert torch.equal(got, want)
    # and the logits: fp32 summation order apart, the same
    lean_a, lean_b = LeanModel(model), LeanModel(emulated)
    la = lean_a(ids, lean_a.new_cache(1, 8), all_logits=True)
    lb = lean_b(ids, lean_b.new_cache(1, 8), all_logits=True)
    assert (la - lb).abs().max() <= 1e-4 * lb.abs().max()
