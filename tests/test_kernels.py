"""Kernel error (a kernel vs the float module holding the dequantized weight) separately from
quantization error (the quantized module vs the original, by SQNR)."""

import pytest
import torch
import torch.nn as nn

from llmquant import kernels
from llmquant.algorithms import rtn_quantize
from llmquant.modules import QuantLinear
from llmquant.schemes import PRESETS, QuantScheme, sqnr_db

SCHEMES = [
    PRESETS["W8"],
    PRESETS["W4G128"],
    PRESETS["W4G32A"],
    PRESETS["W3G32"],
    PRESETS["W2G32"],
    PRESETS["gguf:Q4_1"],
    QuantScheme(bits=8, granularity="tensor"),
    QuantScheme(bits=6, symmetric=False, granularity="channel"),
    PRESETS["gguf:Q4_0"],  # negative scales (signed extreme on code -8)
    QuantScheme(bits=4, symmetric=False, granularity="channel", zero_point="min"),  # float minimum per row
]


def _module(scheme, k=200, n=96, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    q, s, z = rtn_quantize(lin.weight, scheme)
    return lin, QuantLinear.from_quantized(q, s, z, scheme, bias=lin.bias)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("kernel", ["reference", "dequant_cached", "fbgemm_fp16"])
@pytest.mark.parametrize("shape", [(1, 200), (3, 7, 200), (512, 200)])
def test_kernel_matches_dequantized_reference(scheme, kernel, shape):
    lin, ql = _module(scheme)
    ref = nn.Linear(200, 96)
    with torch.no_grad():
        ref.weight.copy_(ql.dequantize_weight())
        ref.bias.copy_(lin.bias)
    ql.kernel_override = kernel
    x = torch.randn(*shape)
    y, yr = ql(x), ref(x)
    assert y.shape == yr.shape and y.dtype == x.dtype
    exact = kernel != "fbgemm_fp16" or scheme.granularity in ("channel", "tensor") and scheme.zero_point == "int"
    # fp16 weights: at most 2^-11 relative error per weight; exact integer codes otherwise
    tol = 1e-4 if exact else 2e-3
    assert (y - yr).abs().max() <= tol * yr.abs().max()


def test_automatic_choice_on_cpu():
    _, ql = _module(PRESETS["W8"])
    expected = "fbgemm_fp16" if torch.backends.quantized.supported_engines.count("fbgemm") else "dequant_cached"
    ql(torch.randn(2, 200))
    assert ql.prepared_kernel.name == expected


@pytest.mark.parametrize("bits,bound", [(8, 38.0), (4, 16.0), (3, 10.0)])
def test_quantization_error_sqnr_random(bits, bound):
    """Per-channel/g64 RTN on Gaussian weights: SQNR near the 6 dB/bit rule, above a stated floor."""
    scheme = PRESETS["W8"] if bits == 8 else QuantScheme(bits=bits, granularity="group", group_size=64)
    lin, ql = _module(scheme, k=576, n=256, bias=False, seed=bits)
    assert sqnr_db(lin.weight, ql.dequantize_weight()) > bound
    x = torch.randn(16, 576)
    assert sqnr_db(lin(x), ql(x)) > bound - 1


def test_set_kernel_and_unknown():
    from llmquant.errors import LLMQuantError

    _, ql = _module(PRESETS["W4G64"])
    m = nn.Sequential(ql)
    kernels.set_kernel(m, "reference")
    m(torch.randn(1, 200))
    assert ql.prepared_kernel.name == "reference"
    with pytest.raises(LLMQuantError, match="unknown kernel"):
        kernels.set_kernel(m, "nope")


def test_deepcopy_and_to_reset_state():
    import copy

    _, ql = _module(PRESETS["W8"])
    x = torch.randn(2, 200)
    y = ql(x)
    ql2 = copy.deepcopy(ql)
    assert torch.equal(ql2(x), y)
    ql.to(torch.float32)
    assert ql.prepared_kernel is None and ql.kernel_state is None


@pytest.mark.parametrize(
    "act",
    [
        QuantScheme(bits=8, granularity="token", dynamic=True),
        QuantScheme(bits=8, granularity="token", dynamic=True, symmetric=False),
        QuantScheme(bits=8, granularity="tensor", dynamic=True),
        QuantScheme(bits=8, granularity="tensor"),  # static: calibrated scale
        QuantScheme(bits=8, granularity="tensor", symmetric=False),
    ],
    ids=lambda s: s.name + ("-dyn" if s.dynamic else "-static"),
)
@pytest.mark.parametrize("m", [1, 5, 64])
def test_int8_gemm_matches_reference(act, m):
    from llmquant.schemes import compute_qparams

    g = torch.Generator().manual_seed(m)
    w = torch.randn(96, 200, generator=g) * 0.05
    x = torch.randn(m, 200, generator=g) + 0.3
    q, s, z = rtn_quantize(w, PRESETS["W8"])
    kw = {}
    if not act.dynamic:
        cs, cz = compute_qparams(torch.randn(256, 200, generator=g) + 0.3, act)
        kw = {"input_scale": cs, "input_zero": cz}
    ql = QuantLinear.from_quantized(q, s, z, PRESETS["W8"], bias=torch.randn(96, generator=g), activation_scheme=act, **kw)
    y = ql(x)
    assert ql.prepared_kernel.name in ("int8_int_mm", "fbgemm_int8")
    ql.kernel_override = "reference"
    yr = ql(x)
    assert (y - yr).abs().max() <= 1e-4 * yr.abs().max()
    # and the activation quantization error itself is small against the weight-only product
    assert sqnr_db(x @ ql.dequantize_weight().t() + ql.bias, y) > 30


def test_dynamic_scales_follow_each_input():
    q, s, z = rtn_quantize(torch.randn(16, 32), PRESETS["W8"])
    act = QuantScheme(bits=8, granularity="token", dynamic=True)
    ql = QuantLinear.from_quantized(q, s, z, PRESETS["W8"], activation_scheme=act)
    x = torch.randn(2, 32)
    x[1] *= 1000  # a token 1000x larger must not crush the small one's resolution
    y = ql(x)
    ref = x @ ql.dequantize_weight().t()
    assert sqnr_db(ref[0], y[0]) > 35 and sqnr_db(ref[1], y[1]) > 35
