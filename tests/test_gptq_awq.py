"""GPTQ and AWQ as pure math: exact agreement with RTN where the theory says so, lower layer output error
than RTN on layers built for them (correlated inputs, salient channels), RTN's output format."""

import pytest
import torch

from llmquant.algorithms import rtn_quantize
from llmquant.algorithms.awq import awq_clip_quantize, awq_search_scale, fold_scale
from llmquant.algorithms.gptq import gptq_quantize, hessian_from_inputs
from llmquant.errors import SchemeError
from llmquant.modules import QuantLinear
from llmquant.schemes import PRESETS, QuantScheme, dequantize

from conftest import correlated_inputs, make_tiny_llama, out_err


pytestmark = pytest.mark.usefixtures("one_thread")




SCHEMES = [
    QuantScheme(bits=4, group_size=32),
    QuantScheme(bits=3, group_size=48, symmetric=False),  # 100 = 48 + 48 + 4: ragged last group
    QuantScheme(bits=4, granularity="channel"),
    QuantScheme(bits=2, group_size=64, symmetric=False, zero_point="float", scale_dtype="float16"),
    QuantScheme(bits=8, group_size=64),
    PRESETS["gguf:Q4_1"],  # float minimum (zero_point="min"), fp16 scales
    PRESETS["gguf:Q4_0"],  # signed scale
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(scheme, act_order):
    x = correlated_inputs()
    w = torch.randn(48, 100)
    rtn = rtn_quantize(w, scheme)
    q, scale, zero = gptq_quantize(w, hessian_from_inputs(x), scheme, act_order=act_order, block_size=32)
    # same format as RTN: codes int16 in range, qparams of the same shape and dtype
    assert q.dtype == torch.int16 and q.shape == w.shape
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    assert scale.shape == rtn[1].shape and scale.dtype == rtn[1].dtype
    assert (zero is None) == (rtn[2] is None) and (zero is None or (zero.shape, zero.dtype) == (rtn[2].shape, rtn[2].dtype))
    e_rtn, e_gptq = out_err(x, w, *rtn, scheme), out_err(x, w, q, scale, zero, scheme)
    assert e_gptq < 0.7 * e_rtn, (e_gptq, e_rtn)
    # and it packs into the same QuantLinear, whose weight is exactly the dequantized codes
    ql = QuantLinear.from_quantized(q, scale, zero, scheme)
    assert torch.equal(ql.dequantize_weight(), dequantize(q, scale, zero, scheme))


@pytest.mark.parametrize("scheme", SCHEMES[:3], ids=lambda s: s.name)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_uncorrelated_inputs_is_rtn(scheme, act_order):
    """A diagonal Hessian has no off-diagonal terms to compensate with: GPTQ reduces to RTN exactly."""
    w = torch.randn(40, 100)
    h = torch.diag(torch.rand(100) + 0.5)
    q, scale, zero = gptq_quantize(w, h, scheme, act_order=act_order, block_size=16)
    rq, rs, rz = rtn_quantize(w, scheme)
    assert torch.equal(q, rq) and torch.equal(scale, rs)
    assert zero is None and rz is None or torch.equal(zero, rz)


def test_gptq_block_size_does_not_change_the_math():
    x, w, s = correlated_inputs(), torch.randn(16, 100), QuantScheme(bits=4, group_size=32)
    h = hessian_from_inputs(x)
    a = gptq_quantize(w, h, s, block_size=7)
    b = gptq_quantize(w, h, s, block_size=100)
    assert (a[0] != b[0]).float().mean() < 0.01  # float summation order only
    assert abs(out_err(x, w, *a, s) - out_err(x, w, *b, s)) < 0.02 * out_err(x, w, *b, s)


def test_gptq_dead_inputs_and_bad_shapes():
    x = correlated_inputs()
    x[:, 5] = 0  # an input that is always zero
    w = torch.randn(8, 100)
    q, scale, _ = gptq_quantize(w, hessian_from_inputs(x), QuantScheme(bits=4, group_size=32))
    assert torch.isfinite(scale).all()
    with pytest.raises(SchemeError, match="Hessian shape"):
        gptq_quantize(w, torch.eye(50), QuantScheme(bits=4, group_size=32))


def salient_inputs(n=3000, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, :4] *= 30  # a few channels with large activations (the "salient" weights of the paper)
    return x


@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, group_size=64), QuantScheme(bits=3, group_size=32)], ids=lambda s: s.name)
def test_awq_beats_rtn_on_salient_channels(scheme):
    x = salient_inputs()
    w = torch.randn(64, 128)
    gram = x.T @ x / x.shape[0]
    s, alpha, losses = awq_search_scale([w], gram, x.abs().mean(0), scheme, grid=20)
    e_rtn = out_err(x, w, *rtn_quantize(w, scheme), scheme)
    # the loss at alpha 0 (s = 1) is RTN's output error, computed exactly from the Gram matrix
    assert losses[0.0] / 64 == pytest.approx(e_rtn, rel=1e-3)
    assert alpha > 0 and losses[alpha] < 0.8 * losses[0.0]
    q, scale, zero = awq_clip_quantize(w * s, gram / s[None] / s[:, None], scheme)
    w_hat = dequantize(q, scale, zero, scheme) / s
    e_awq = float((x @ (w_hat - w).T).pow(2).mean())
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)
    # clipping never hurts: ratio 1 is among the candidates
    q1, s1, z1 = awq_clip_quantize(w * s, gram / s[None] / s[:, None], scheme, clip=False)
    assert e_awq <= float((x @ (dequantize(q1, s1, z1, scheme) / s - w).T).pow(2).mean()) * 1.0001


def test_awq_folding_leaves_the_float_model_unchanged():
    from llmquant.models import arch_for

    m = make_tiny_llama(vocab_size=500)
    ids = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        before = m(ids).logits
        spec = arch_for(m)
        for layer in m.model.layers:
            for src, dsts in spec.norm_to_linears + spec.linear_to_linears:
                source = layer.get_submodule(src)
                s = torch.rand(source.weight.shape[0]) * 4 + 0.25
                fold_scale(source.weight.data, None, [layer.get_submodule(d).weight.data for d in dsts], s)
        after = m(ids).logits
    assert not torch.equal(m.model.layers[0].input_layernorm.weight, torch.ones(72))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
