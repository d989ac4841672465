"""QAT modules: STE and LSQ gradients against analytic ones, range learning on its own, prepare -> convert."""

import pytest
import torch
import torch.nn as nn

import llmquant
from llmquant.kernels import set_kernel
from llmquant.modules import QuantLinear
from llmquant.modules.fake_quant import FakeQuantizer, FakeQuantLinear, fake_quant_ste, grad_scale, ste_round
from llmquant.schemes import PRESETS as _PRESETS
from llmquant.schemes import QuantScheme, compute_qparams, dequantize, fake_quantize, quantize_to_int

# Q4_1-like grid with a trainable float zero point (QAT does not train gguf:Q4_1's stored float minimum)
PRESETS = {**_PRESETS, "Q41F": QuantScheme(bits=4, symmetric=False, granularity="group", group_size=32,
                                           zero_point="float", scale_dtype="float16")}

from conftest import make_tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ste_round_and_grad_scale():
    x = torch.tensor([-1.6, -0.5, 0.2, 0.5, 1.49, 2.51], requires_grad=True)
    y = ste_round(x)
    assert torch.equal(y, torch.round(x.detach()))
    (y * torch.arange(6.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(6.0))  # identity backward
    s = torch.tensor(3.0, requires_grad=True)
    out = grad_scale(s, 0.25)
    assert out.item() == 3.0
    (5 * out).backward()
    assert s.grad.item() == pytest.approx(1.25)


def test_ste_gradients_match_analytic():
    """d/dx: 1 inside the grid, 0 where clipped; d/ds: round(x/s) - x/s inside, qmin / qmax outside
    (Esser et al. 2019, eq. 3); d/dz: 0 inside, -s outside."""
    sch = QuantScheme(bits=3, symmetric=True, granularity="tensor", group_size=None)  # grid [-4, 3]
    x = torch.tensor([[-9.0, -3.7, -0.2, 0.26, 1.1, 2.4, 3.2, 7.0]], requires_grad=True)
    s = torch.tensor([[1.0]], requires_grad=True)
    fake_quant_ste(x, s, None, sch).sum().backward()
    v = x.detach() / s.detach()
    inside = (v >= sch.qmin) & (v <= sch.qmax)
    assert torch.equal(x.grad, inside.float())
    ds = torch.where(inside, torch.round(v) - v, torch.where(v < sch.qmin, float(sch.qmin), float(sch.qmax))).sum()
    assert s.grad.item() == pytest.approx(ds.item(), abs=1e-6)

    asym = QuantScheme(bits=2, symmetric=False, granularity="tensor", group_size=None)  # grid [0, 3]
    x = torch.tensor([[-2.0, 0.3, 1.2, 6.0]], requires_grad=True)
    s = torch.tensor([[1.0]], requires_grad=True)
    z = torch.tensor([[1.0]], requires_grad=True)
    out = fake_quant_ste(x, s, z, asym)
    assert torch.equal(out.detach(), torch.tensor([[-1.0, 0.0, 1.0, 2.0]]))
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    # two values clipped (one at qmin, one at qmax): dz = -s per clipped value
    assert z.grad.item() == pytest.approx(-2.0)


@pytest.mark.parametrize("preset", ["W3G32", "W4G64A", "W8", "Q41F"])
def test_fused_node_matches_plain_autograd(preset):
    """The one-node fake quantizer gives the gradients autograd derives for the plain STE expression
    (ragged groups: width 72)."""
    sch = PRESETS[preset]
    torch.manual_seed(1)
    w = torch.randn(6, 72)
    scale, zero = compute_qparams(w, sch)
    scale = scale.float() * 0.8  # some values clip
    zero = None if zero is None else zero.float() + 0.3
    leaves = [t.clone().requires_grad_(True) for t in (w, scale) + (() if zero is None else (zero,))]
    out = fake_quant_ste(leaves[0], leaves[1], leaves[2] if zero is not None else None, sch)
    up = torch.randn_like(out)
    (out * up).sum().backward()
    ref = [t.clone().requires_grad_(True) for t in (w, scale) + (() if zero is None else (zero,))]
    sfull = ref[1].repeat_interleave(sch.group_size, 1)[:, :72] if sch.group_size else ref[1]
    v = ref[0] / sfull
    if zero is not None:
        zfull = ref[2].repeat_interleave(sch.group_size, 1)[:, :72] if sch.group_size else ref[2]
        v = v + zfull
    q = ste_round(torch.clamp(v, sch.qmin, sch.qmax))
    if zero is not None:
        q = q - zfull
    expect = q * sfull
    assert torch.equal(out.detach(), expect.detach())
    (expect * up).sum().backward()
    for a, b in zip(leaves, ref):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_lsq_gradient_scale_on_its_own():
    """A learned quantizer's step gradient is the plain STE gradient times 1/sqrt(N * qmax)."""
    sch = PRESETS["W4G32"]
    w = torch.randn(4, 64)
    fq = FakeQuantizer(sch, (4, 2), n_per_scale=32, learn=True)
    fq.init_from(w)
    fq(w).pow(2).sum().backward()
    s = fq.scale.detach().clone().requires_grad_(True)
    fake_quant_ste(w, s, None, sch).pow(2).sum().backward()
    g = 1 / (32 * sch.qmax) ** 0.5
    assert torch.allclose(fq.scale.grad, s.grad * g, rtol=1e-5, atol=1e-8)
    # frozen quantizers hold buffers, not parameters
    frozen = FakeQuantizer(sch, (4, 2), 32, learn=False)
    assert not list(frozen.parameters())


def test_init_matches_rtn_exactly():
    for preset in ["W4G32", "W4G64A", "W3G32", "W2G32", "W8", "Q41F"]:
        sch = PRESETS[preset]
        lin = nn.Linear(72, 20)
        fq = FakeQuantLinear.from_linear(lin, sch)
        assert torch.equal(fq.quantized_weight().detach(), fake_quantize(lin.weight.detach(), sch)), preset


@pytest.mark.parametrize("bits,sym", [(3, True), (2, False)])
def test_range_learning_reduces_error(bits, sym):
    """Weights with heavy outliers: min-max steps waste the grid; learned steps (and zeros) lower the
    reconstruction error of the quantized weight with the weights themselves held fixed."""
    torch.manual_seed(0)
    sch = QuantScheme(bits=bits, symmetric=sym, granularity="group", group_size=32)
    w = torch.randn(16, 128) * 0.05
    w[torch.rand_like(w) < 0.02] *= 12  # outliers set the min-max range
    fq = FakeQuantizer(sch, (16, 4), 32, learn=True)
    fq.init_from(w)
    s0 = fq.scale.detach().clone()
    err0 = (fq(w) - w).pow(2).mean().item()
    opt = torch.optim.Adam(fq.parameters(), lr=3e-3)
    for _ in range(60):
        opt.zero_grad()
        (fq(w) - w).pow(2).mean().backward()
        opt.step()
    err1 = (fq(w) - w).pow(2).mean().item()
    assert err1 < 0.9 * err0, (err0, err1)
    assert (fq.scale.detach() < s0).float().mean() > 0.7  # steps shrink: clipping outliers pays


@pytest.mark.parametrize("preset", ["W4G64A", "W3G32", "Q41F", "W8"])
def test_convert_matches_fake_quant(preset):
    m = make_tiny_llama()
    # head="fp32": the float head the student trained with (the default rounds it to int8 at convert)
    llmquant.prepare_qat(m, llmquant.QuantConfig(weight=PRESETS[preset], head="fp32"), progress=False)
    with torch.no_grad():  # move qparams and weights off their initial values
        for mod in m.modules():
            if isinstance(mod, FakeQuantLinear):
                mod.weight.add_(torch.randn_like(mod.weight) * 0.01)
                mod.weight_quantizer.scale.mul_(0.9)
                if mod.weight_quantizer.zero is not None:
                    mod.weight_quantizer.zero.add_(0.3)
    ids = torch.arange(48)[None] * 7 % 1000
    fakes = {n: mod.quantized_weight().detach() for n, mod in m.named_modules() if isinstance(mod, FakeQuantLinear)}
    with torch.no_grad():
        before = m(ids).logits
    s = llmquant.convert_qat(m, progress=False)
    assert s.method == "qat" and len(s.layers) == len(fakes) == 14
    for n, fw in fakes.items():
        ql = m.get_submodule(n)
        assert isinstance(ql, QuantLinear) and torch.equal(ql.dequantize_weight(), fw), n
    set_kernel(m, "reference")  # the exact path: bit-identical to the fake-quantized model
    with torch.no_grad():
        assert torch.equal(m(ids).logits, before)
    set_kernel(m, None)  # the default CPU kernel (fbgemm: fp16 weights for grouped schemes): close
    with torch.no_grad():
        after = m(ids).logits
    assert (after - before).abs().max() < 1e-2 * before.abs().max()


def test_w8a8_static_activations_convert():
    cfg = llmquant.QuantConfig(weight="W8", activation=QuantScheme(bits=8, granularity="tensor", group_size=None))
    m = make_tiny_llama()
    llmquant.prepare_qat(m, cfg, progress=False)
    ids = torch.arange(48)[None] * 5 % 1000
    with torch.no_grad():
        before = m(ids).logits  # the first forward initialises the input ranges (min-max observer)
    llmquant.convert_qat(m, progress=False)
    set_kernel(m, "reference")
    with torch.no_grad():
        assert torch.allclose(m(ids).logits, before, atol=1e-4, rtol=1e-4)


def test_qat_save_load_bit_identical(tmp_path, tokenizer):
    m = make_tiny_llama()
    llmquant.prepare_qat(m, "W3G32", lora_rank=4, progress=False)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, FakeQuantLinear):
                mod.lora_b.normal_(0, 0.01)
    llmquant.convert_qat(m, progress=False)
    ids = torch.arange(40)[None] * 3 % 1000
    with torch.no_grad():
        before = m(ids).logits
    llmquant.save(m, tokenizer, tmp_path / "q")
    m2, _ = llmquant.load(tmp_path / "q")
    assert m2.llmquant_config.method == "qat" and m2.llmquant_config.weight == PRESETS["W3G32"]
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, before)


def test_init_hooks_callable_and_prequantized():
    """GPTQ (or any PTQ) initialisation: a callable like ALGORITHMS' entries, or a model of QuantLinears."""
    sch = PRESETS["W4G32"]
    calls = []

    def shifted(w, scheme, name):
        calls.append(name)
        scale, zero = compute_qparams(w, scheme)
        q = (quantize_to_int(w, scale, zero, scheme) + 1).clamp(scheme.qmin, scheme.qmax)
        return q, scale, zero

    m = make_tiny_llama()
    llmquant.prepare_qat(m, sch, init=shifted, progress=False)
    assert len(calls) == 14
    fq = m.model.layers[0].mlp.up_proj
    w0 = make_tiny_llama().model.layers[0].mlp.up_proj.weight.detach()
    scale, zero = compute_qparams(w0, sch)
    expect = dequantize((quantize_to_int(w0, scale, zero, sch) + 1).clamp(sch.qmin, sch.qmax), scale, zero, sch)
    assert torch.equal(fq.quantized_weight().detach(), expect)

    p = make_tiny_llama()
    llmquant.quantize(p, "W4G64A", progress=False)
    deq = p.model.layers[1].self_attn.q_proj.dequantize_weight()
    llmquant.prepare_qat(p, "W4G64A", progress=False)
    assert isinstance(p.model.layers[1].self_attn.q_proj, FakeQuantLinear)
    assert torch.equal(p.model.layers[1].self_attn.q_proj.quantized_weight().detach(), deq)


@pytest.mark.parametrize("preset", ["W3G32", "W2G32", "W4G64A"])
def test_mse_init_never_worse_than_rtn(preset):
    """The MSE observer picks, per group, the clipping with the least round-trip error (a = 1 is RTN)."""
    from llmquant.modules.fake_quant import _reduce_groups, mse_qparams

    sch = PRESETS[preset]
    torch.manual_seed(2)
    w = torch.randn(32, 72) * 0.05
    w[torch.rand_like(w) < 0.02] *= 8
    s, z = mse_qparams(w, sch)
    err_mse = (dequantize(quantize_to_int(w, s, z, sch), s, z, sch) - w).pow(2)
    err_rtn = (fake_quantize(w, sch) - w).pow(2)
    assert (_reduce_groups(err_mse, s.shape, sch) <= _reduce_groups(err_rtn, s.shape, sch)).all()  # per group
    assert err_mse.sum() < (0.95 if sch.symmetric else 0.99) * err_rtn.sum()
    lin = nn.Linear(72, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    fq = FakeQuantLinear.from_linear(lin, sch, observer="mse")
    assert torch.equal(fq.weight_quantizer.scale.detach(), s.float())


def test_float_minimum_scheme_refused():
    from llmquant.errors import SchemeError

    with pytest.raises(SchemeError, match="zero_point='float'"):
        llmquant.prepare_qat(make_tiny_llama(), "gguf:Q4_1", progress=False)


def test_block_qat_trains_each_layer_toward_its_float_outputs():
    """blockqat: each layer's fake-quantized weights and step sizes are trained to its float outputs; the
    layers' output errors fall below those of the same quantizer untrained (steps=0), the packed model
    computes what was trained, and the recipe round-trips."""
    m = make_tiny_llama(vocab_size=1000, layers=3)
    calib = torch.randint(0, 1000, (8, 32), generator=torch.Generator().manual_seed(1))
    errs = {}
    for steps in (0, 60):
        q = make_tiny_llama(vocab_size=1000, layers=3)
        q.load_state_dict(m.state_dict())
        cfg = llmquant.QuantConfig(weight="W3G32", method="blockqat",
                                   method_params=llmquant.BlockQATParams(steps=steps, lr=1e-4, lr_qparams=1e-3))
        s = llmquant.quantize(q, cfg, calib=calib, progress=False)
        errs[steps] = s.layer_errors
        assert all(isinstance(mod, QuantLinear) for n, mod in q.named_modules() if n.endswith("proj"))
    assert all(a < b for a, b in zip(errs[60], errs[0])), errs
    assert llmquant.QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(llmquant.errors.SchemeError):
        llmquant.BlockQATParams(init="nope")
    with pytest.raises(llmquant.errors.CalibrationError, match="sequential"):
        llmquant.quantize(make_tiny_llama(vocab_size=1000, layers=3), cfg.with_(calibration=llmquant.CalibSpec(sequential=False)),
                          calib=calib, progress=False)
