"""Dynamic quantization: per-token scales follow each input, int8 kernels match the reference, W4A8,
LLM.int8() outliers, LSTM/GRU, selection and errors, save/load, CLI."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmquant
from llmquant.errors import SchemeError, SelectionError, UnsupportedError
from llmquant.kernels import fbgemm_int8
from llmquant.modules import QuantLinear
from llmquant.schemes import compute_qparams, dequantize, quantize_to_int, sqnr_db


# fbgemm_int8 runs where its int8 products are exact (VNNI); elsewhere it declines (test below)
INT8_KERNELS = ["int8_int_mm"] + (["fbgemm_int8"] if "fbgemm" in torch.backends.quantized.supported_engines
                                  and fbgemm_int8.EXACT_INT8 else [])


def _lin(k=200, n=96, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin


def _dyn(lin, **kw) -> QuantLinear:
    m = nn.Sequential(copy.deepcopy(lin))
    llmquant.quantize_dynamic(m, progress=False, **kw)
    assert isinstance(m[0], QuantLinear)
    return m[0]


def _run(ql, x, kernel):
    ql.kernel_override = kernel
    ql.reset_kernel()
    try:
        y = ql(x)
        assert ql.prepared_kernel.name == kernel
        return y
    finally:
        ql.kernel_override = None
        ql.reset_kernel()


def test_fbgemm_int8_only_where_its_products_are_exact(monkeypatch):
    """Without VNNI fbgemm's uint8 x int8 pair sums saturate at int16: the kernel declines and a W8A8 module
    runs int8_int_mm (exact int32) instead; with VNNI it is the first choice."""
    ql = _dyn(_lin(bias=False))
    cpu = torch.device("cpu")
    monkeypatch.setattr(fbgemm_int8, "EXACT_INT8", False)
    assert not fbgemm_int8.FbgemmInt8().supports(ql, cpu)
    ql.reset_kernel()
    ql(torch.randn(2, 200))
    assert ql.prepared_kernel.name == "int8_int_mm"
    if fbgemm_int8._AVAILABLE:
        monkeypatch.setattr(fbgemm_int8, "EXACT_INT8", True)
        assert fbgemm_int8.FbgemmInt8().supports(ql, cpu)
        ql.reset_kernel()
        ql(torch.randn(2, 200))
        assert ql.prepared_kernel.name == "fbgemm_int8"


@pytest.mark.parametrize("kernel", INT8_KERNELS)
def test_per_token_scales_are_recomputed_for_every_input(kernel):
    ql = _dyn(_lin(bias=False))
    x = torch.randn(4, 200)
    y = _run(ql, x, kernel)
    # the same input 2^10 times larger (exact in float), in another call: the same codes with a scale
    # 2^10 times larger, so exactly 2^10 times the output; a stale or fixed scale would clip it
    y_big = _run(ql, 1024 * x, kernel)
    assert torch.equal(y_big, 1024 * y)
    # and inside one batch: a tiny token next to a huge one keeps its own resolution
    mixed = torch.cat([x[:1] * 1e-3, x[1:2] * 1e3])
    ref = mixed @ ql.dequantize_weight().t()
    y_mixed = _run(ql, mixed, kernel)
    assert sqnr_db(ref[0], y_mixed[0]) > 35 and sqnr_db(ref[1], y_mixed[1]) > 35
    # a per-tensor scale cannot: the tiny token is crushed to zero codes
    qt = _dyn(_lin(bias=False), act_granularity="tensor")
    assert sqnr_db(ref[0], _run(qt, mixed, kernel)[0]) < 5


ACTS = [
    dict(),
    dict(symmetric=False),
    dict(act_granularity="tensor"),
    dict(act_granularity="tensor", symmetric=False),
    dict(outlier_threshold=2.5),
    dict(outlier_threshold=2.5, symmetric=False),
    dict(weight_symmetric=True),
    dict(weight_symmetric=True, symmetric=False, outlier_threshold=2.5),
    dict(rotation=8),
]


@pytest.mark.parametrize("kw", ACTS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()) or "token-sym")
@pytest.mark.parametrize("kernel", INT8_KERNELS)
@pytest.mark.parametrize("shape", [(1, 200), (5, 200), (2, 32, 200)])
def test_int8_kernels_match_reference(kw, kernel, shape):
    ql = _dyn(_lin(), **kw)
    x = torch.randn(*shape) + 0.3
    x[..., 7] *= 4  # one outlier-prone column
    yr = _run(ql, x, "reference")
    y = _run(ql, x, kernel)
    assert y.shape == yr.shape and y.dtype == x.dtype
    assert (y - yr).abs().max() <= 1e-5 * yr.abs().max()


def test_reference_is_the_int8_product():
    """The reference (fake-quantized input @ dequantized weight) is the integer product, rescaled."""
    ql = _dyn(_lin(bias=False))
    x = torch.randn(6, 200)
    a = ql.activation_scheme
    s, _ = compute_qparams(x, a)
    qx = quantize_to_int(x, s, None, a).double()
    wq = ql.codes().double() - ql.zero_point().double()  # asymmetric weights by default
    exact = (qx @ wq.t()) * s.double() * ql.scale.double().reshape(1, -1)
    assert torch.allclose(_run(ql, x, "reference").double(), exact, rtol=1e-5, atol=1e-6)


def test_outliers_go_through_float():
    lin = _lin(bias=False)
    x = torch.randn(8, 200)
    x[:, 3] *= 50  # a column of large activations, as in LLM.int8()'s emergent features
    ref = lin(x)
    plain, outl = _dyn(lin), _dyn(lin, outlier_threshold=6.0)
    e_plain, e_outl = sqnr_db(ref, plain(x)), sqnr_db(ref, outl(x))
    assert e_outl > e_plain + 10
    # inputs without outliers run the plain int8 product exactly
    x_small = torch.randn(8, 200).clamp(-3, 3)
    assert torch.equal(outl(x_small), plain(x_small))


def test_rotation_is_exact_in_float_and_spreads_outliers():
    from llmquant.schemes.primitives import hadamard, rotate_blocks

    h = hadamard(16)
    assert torch.allclose(h @ h.t(), torch.eye(16), atol=1e-6)
    lin = _lin(k=256, n=64, bias=True)
    x = torch.randn(16, 256)
    w_rot = rotate_blocks(lin.weight, 64)
    assert torch.allclose(rotate_blocks(x, 64) @ w_rot.t() + lin.bias, lin(x), atol=1e-4)
    x[:, 5] *= 40  # an outlier channel: one per-token scale for all channels wastes the int8 grid
    plain, rot = _dyn(lin), _dyn(lin, rotation=64)
    assert rot.activation_scheme.rotation == 64
    assert sqnr_db(lin(x), rot(x)) > sqnr_db(lin(x), plain(x)) + 6
    assert _dyn(lin, rotation=128).activation_scheme.rotation == 128
    assert _dyn(_lin(k=200), rotation=64).activation_scheme.rotation is None  # 200 % 64: left unrotated


def test_w4a8_is_fake_quant_activation_times_int4_weight():
    lin = _lin()
    ql = _dyn(lin, weight_bits=4, group_size=64)
    assert ql.scheme.bits == 4 and ql.scheme.group_size == 64 and ql.activation_scheme.granularity == "token"
    x = torch.randn(3, 5, 200)
    a = ql.activation_scheme
    x2 = x.reshape(-1, 200)
    s, z = compute_qparams(x2, a)
    x_hat = dequantize(quantize_to_int(x2, s, z, a), s, z, a).reshape(x.shape)
    expected = F.linear(x_hat, ql.dequantize_weight(), ql.bias)
    y = ql(x)
    assert (y - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert sqnr_db(lin(x), y) > 18  # int4 g64 weights on Gaussian data: ~20 dB


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("kw", [dict(), dict(num_layers=2, bidirectional=True, batch_first=True)])
def test_rnn_matches_float(cls, kw):
    torch.manual_seed(0)
    rnn = cls(24, 48, **kw).eval()
    model = nn.Sequential(copy.deepcopy(rnn))
    summary = llmquant.quantize_dynamic(model, {nn.LSTM, nn.GRU}, progress=False)
    assert len(summary.layers) == 1 and summary.layers[0].sqnr_db > 35
    x = torch.randn(7, 3, 24)
    out, state = model[0](x)
    ref_out, ref_state = rnn(x)
    assert out.shape == ref_out.shape
    assert sqnr_db(ref_out, out) > 30
    for a, b in zip(state if isinstance(state, tuple) else (state,), ref_state if isinstance(ref_state, tuple) else (ref_state,)):
        assert sqnr_db(b, a) > 30


def test_selection_by_type_name_and_regex(tiny_llama):
    m = copy.deepcopy(tiny_llama)
    s = llmquant.quantize_dynamic(m, progress=False)
    names = {l.name for l in s.layers}
    assert "lm_head" not in names and len(names) == 14 and isinstance(m.lm_head, nn.Linear)
    assert m.lm_head.weight is m.model.embed_tokens.weight  # lm_head stays float and tied
    m = copy.deepcopy(tiny_llama)
    s = llmquant.quantize_dynamic(m, {"re:.*mlp\\..*", "model.layers.0.self_attn.q_proj"}, progress=False)
    assert {l.name for l in s.layers} == {f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")} | {
        "model.layers.0.self_attn.q_proj"
    }
    assert isinstance(m.model.layers[1].self_attn.q_proj, nn.Linear)


def test_bad_inputs_give_clear_errors(tiny_llama):
    m = copy.deepcopy(tiny_llama)
    for bad in ("int4", "float16", torch.float16, "fp8"):
        with pytest.raises(SchemeError, match="dtype .* not supported.*'int8'"):
            llmquant.quantize_dynamic(m, dtype=bad, progress=False)
    with pytest.raises(SelectionError, match="do not exist"):
        llmquant.quantize_dynamic(m, {"model.layers.9.mlp"}, progress=False)
    with pytest.raises(SelectionError, match="no .* module matches"):
        llmquant.quantize_dynamic(m, {"re:.*conv.*"}, progress=False)
    with pytest.raises(SelectionError, match="no .* module matches"):
        llmquant.quantize_dynamic(m, {nn.LSTM}, progress=False)
    with pytest.raises(SelectionError, match="cannot quantize Conv2d"):
        llmquant.quantize_dynamic(m, {nn.Conv2d}, progress=False)
    with pytest.raises(SchemeError, match="weight_bits must be 8 or 4"):
        llmquant.quantize_dynamic(m, weight_bits=3, progress=False)
    with pytest.raises(SchemeError, match="act_granularity"):
        llmquant.quantize_dynamic(m, act_granularity="channel", progress=False)
    with pytest.raises(SchemeError, match="power of two"):
        llmquant.quantize_dynamic(m, rotation=24, progress=False)
    with pytest.raises(SchemeError, match="outlier_threshold must be a positive"):
        llmquant.quantize_dynamic(m, outlier_threshold=-1, progress=False)
    with pytest.raises(SchemeError, match="int8 only"):
        llmquant.quantize_dynamic(nn.Sequential(nn.LSTM(4, 4)), {nn.LSTM}, weight_bits=4, progress=False)
    assert not any(isinstance(x, QuantLinear) for x in m.modules())  # nothing half-done


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(act_granularity="tensor", symmetric=False), dict(outlier_threshold=1.0, rotation=8),
     dict(weight_bits=4, group_size=32)],
    ids=["token", "tensor-asym", "outliers-rotation", "w4a8"],
)
def test_save_load_bit_identical(tiny_llama, tokenizer, tmp_path, kw):
    m = copy.deepcopy(tiny_llama)
    llmquant.quantize_dynamic(m, progress=False, **kw)
    ids = torch.randint(0, 1000, (1, 24))
    with torch.no_grad():
        before = m(ids).logits
    llmquant.save(m, tokenizer, tmp_path / "dyn")
    loaded, _ = llmquant.load(tmp_path / "dyn")
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)
    ql = loaded.model.layers[0].mlp.down_proj
    assert ql.activation_scheme.dynamic and ql.activation_scheme == m.model.layers[0].mlp.down_proj.activation_scheme
    assert loaded.llmquant_config.method == "dynamic"


def test_saving_a_dynamic_lstm_is_a_clear_error(tmp_path):
    m = nn.Sequential(nn.LSTM(8, 8))
    llmquant.quantize_dynamic(m, {nn.LSTM}, progress=False)
    with pytest.raises(UnsupportedError, match="LSTM/GRU"):
        llmquant.save(m, None, tmp_path / "rnn")
    assert not (tmp_path / "rnn").exists()


def test_cli_quantize_dynamic(tiny_folder, tmp_path, capsys):
    from llmquant.cli import main

    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_folder), "--method", "dynamic", "--act-granularity", "tensor",
                 "--weight-bits", "4", "-o", str(out)]) == 0
    loaded, _ = llmquant.load(out)
    ql = loaded.model.layers[1].self_attn.o_proj
    assert ql.scheme.bits == 4 and ql.activation_scheme.granularity == "tensor" and ql.activation_scheme.dynamic
    assert main(["quantize", "--model", str(tiny_folder), "--method", "dynamic", "--bits", "4", "-o", str(tmp_path / "x")]) == 2
    assert "--weight-bits" in capsys.readouterr().err


@pytest.mark.integration
def test_default_model_dynamic_kl(default_model_and_tokenizer):
    """Per-token W8A8 on SmolLM2-135M stays close to fp32, and LLM.int8()'s outlier split is closer still
    (full 8-window figures: BENCHMARKS.md)."""
    ref, tok = default_model_and_tokenizer
    kls = {}
    for name, kw in {"token": {}, "outliers": {"outlier_threshold": 6.0}}.items():
        m = copy.deepcopy(ref)
        s = llmquant.quantize_dynamic(m, progress=False, **kw)
        assert len(s.layers) == 30 * 7 and isinstance(m.lm_head, nn.Linear)
        res = llmquant.evaluate(m, reference=ref, tokenizer=tok, windows=1, seq_len=256, progress=False)
        kls[name] = res.kl
        assert res.top1 > 0.9, res
    assert kls["token"] < 0.06 and kls["outliers"] < 0.7 * kls["token"], kls
