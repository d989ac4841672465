"""HQQ and AutoRound: each beats RTN on a layer built for it, their objectives do not increase over the
iterations, they start from RTN exactly, and their output is RTN's format: it saves and loads bit for bit,
exports to GGUF and compressed-tensors, composes after AWQ, and their knobs round-trip through configs."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llmquant
from llmquant import AutoRoundParams, AWQParams, CalibSpec, HQQParams, QuantConfig
from llmquant.algorithms import rtn_quantize
from llmquant.algorithms.autoround import SignRoundWeight, signround
from llmquant.algorithms.hqq import hqq_quantize, shrink_lp
from llmquant.errors import SchemeError
from llmquant.kernels import set_kernel
from llmquant.modules import QuantLinear
from llmquant.schemes import PRESETS, QuantScheme, dequantize

from conftest import calib_ids, correlated_inputs, make_tiny_llama, out_err

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 1000
SCHEMES = [
    QuantScheme(bits=4, group_size=32),
    QuantScheme(bits=3, group_size=48, symmetric=False),  # 100 = 48 + 48 + 4: ragged last group, integer zeros
    QuantScheme(bits=2, group_size=64, symmetric=False, zero_point="float", scale_dtype="float16"),
    QuantScheme(bits=4, granularity="channel"),
    PRESETS["gguf:Q4_1"],  # float minimum
    PRESETS["gguf:Q4_0"],  # signed scale
]


def heavy_tailed(rows=64, k=100, seed=0):
    """Student-t weights: a few large values stretch RTN's min-max ranges, the case HQQ is built for."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, k)) * 0.02




def _same_format(got, rtn, scheme, shape):
    q, scale, zero = got
    assert q.dtype == torch.int16 and q.shape == shape
    assert int(q.min()) >= scheme.qmin and int(q.max()) <= scheme.qmax
    assert scale.shape == rtn[1].shape and scale.dtype == rtn[1].dtype
    assert (zero is None) == (rtn[2] is None)
    assert zero is None or (zero.shape, zero.dtype) == (rtn[2].shape, rtn[2].dtype)
    ql = QuantLinear.from_quantized(q, scale, zero, scheme)
    assert torch.equal(ql.dequantize_weight(), dequantize(q, scale, zero, scheme))


# ---- HQQ -----------------------------------------------------------------------------------------------

def test_shrink_lp_is_soft_threshold_at_p1():
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 2.0])
    assert torch.allclose(shrink_lp(x, 10.0, 1.0), torch.tensor([-1.9, 0.0, 0.0, 0.0, 1.9]))
    # p < 1: large values shrink less than small ones (sparse outliers are kept)
    y = shrink_lp(torch.tensor([0.5, 5.0]), 4.0, 0.5)
    assert 5.0 - y[1] < 0.5 - y[0]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_hqq_beats_rtn_on_heavy_tailed_weights(scheme):
    w, x = heavy_tailed(), torch.randn(512, 100)
    rtn = rtn_quantize(w, scheme)
    hist = []
    got = hqq_quantize(w, scheme, history=hist)
    _same_format(got, rtn, scheme, w.shape)
    e_rtn, e_hqq = out_err(x, w, *rtn, scheme), out_err(x, w, *got, scheme)
    assert e_hqq < 0.97 * e_rtn, (e_hqq, e_rtn)
    # the kept-best objective never increases, and drops from RTN's
    assert len(hist) == 21 and all(b <= a for a, b in zip(hist, hist[1:])) and hist[-1] < hist[0]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_hqq_without_iterations_is_rtn(scheme):
    w = heavy_tailed()
    got, rtn = hqq_quantize(w, scheme, iterations=0), rtn_quantize(w, scheme)
    for a, b in zip(got, rtn):
        assert (a is None and b is None) or torch.equal(a, b)


def test_hqq_zero_only_is_the_paper_and_scale_helps():
    scheme = QuantScheme(bits=2, group_size=64, symmetric=False, zero_point="float")
    w, x = heavy_tailed(k=128), torch.randn(512, 128)
    rtn = out_err(x, w, *rtn_quantize(w, scheme), scheme)
    zero_only = out_err(x, w, *hqq_quantize(w, scheme, optimize_scale=False), scheme)
    both = out_err(x, w, *hqq_quantize(w, scheme), scheme)
    assert both < zero_only < rtn


def _group_err(w, got, scheme, imp=None):
    from llmquant.schemes.primitives import _grouped, group_len

    d = (w - dequantize(*got, scheme)).pow(2)
    d = d if imp is None else d * imp
    if scheme.granularity != "group":
        return _grouped(d, scheme).sum(-1)
    gs = group_len(scheme, w.shape[1])
    return F.pad(d, (0, -w.shape[1] % gs)).reshape(w.shape[0], -1, gs).sum(-1)  # (rows, groups)


def outlier_channels(seed=0):
    """Heavy-tailed weights whose largest values sit in a few input columns that carry large activations
    (as after an RMSNorm with outlier channels): clipping those weights is cheap in the lp weight error and
    costly in the output."""
    w = heavy_tailed(rows=64, k=128, seed=seed)
    cols = torch.tensor([5, 40, 77, 100])
    w[:, cols] = w[:, cols].sign() * (w.abs().amax(1, keepdim=True) * 1.2)
    x = torch.randn(1024, 128)
    x[:, cols] *= 12.0
    return w, x


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_hqq_guard_never_worse_than_rtn_per_group(scheme):
    """The guard keeps RTN's qparams wherever HQQ's raise the group's squared weight error (weighted by
    the importance when one is given): never worse than RTN, group by group; unweighted, better in total."""
    w, x = outlier_channels()
    rtn = rtn_quantize(w, scheme)
    imp = x.pow(2).mean(0)
    for kw, wt in (({}, None), ({"importance": imp}, imp)):
        got = hqq_quantize(w, scheme, **kw)
        e_g, e_r = _group_err(w, got, scheme, wt), _group_err(w, rtn, scheme, wt)
        assert bool((e_g <= e_r * (1 + 1e-6) + 1e-12).all()), float((e_g - e_r).max())
        if wt is None:  # (weighted, the guard may keep RTN's everywhere: HQQ clips the heavy columns)
            assert float(e_g.sum()) < float(e_r.sum())
    off = _group_err(w, hqq_quantize(w, scheme, guard=False), scheme)
    assert float(_group_err(w, hqq_quantize(w, scheme), scheme).sum()) <= float(off.sum()) * (1 + 1e-6)


def test_hqq_importance_guard_keeps_outlier_columns():
    """Inputs with outlier channels: HQQ alone (its lp objective knows nothing of the inputs) raises the
    importance-weighted error of some groups above RTN's; the weighted guard takes RTN's qparams there, and
    the output error drops below both."""
    scheme = QuantScheme(bits=4, group_size=32)
    w, x = outlier_channels()
    imp = x.pow(2).mean(0)
    rtn, off = rtn_quantize(w, scheme), hqq_quantize(w, scheme, guard=False)
    assert int((_group_err(w, off, scheme, imp) > _group_err(w, rtn, scheme, imp)).sum()) > 0
    weighted = out_err(x, w, *hqq_quantize(w, scheme, importance=imp), scheme)
    assert weighted < out_err(x, w, *off, scheme) < out_err(x, w, *rtn, scheme)


def test_hqq_importance_guard_in_the_pipeline(tiny, calib, rtn_kl):
    """guard "imse" makes HQQ a calibrated method: it asks for data and, given it, beats RTN."""
    p = HQQParams(guard="imse")
    assert p.calibrated and not HQQParams().calibrated
    m = copy.deepcopy(tiny)
    llmquant.quantize(m, QuantConfig(weight="W3G32", method="hqq", method_params=p,
                                     calibration=CalibSpec(batch_size=4)), calib=calib, progress=False)
    assert _kl(tiny, m) < rtn_kl


def test_hqq_refuses_two_level_scales():
    with pytest.raises(SchemeError, match="k-quant"):
        hqq_quantize(torch.randn(8, 256), PRESETS["gguf:Q4_K"])


# ---- AutoRound -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_autoround_starts_at_rtn(scheme):
    w = heavy_tailed()
    got, rtn = SignRoundWeight(w, scheme).quantized(), rtn_quantize(w, scheme)
    for a, b in zip(got, rtn):
        assert (a is None and b is None) or torch.equal(a, b)
    sr = SignRoundWeight(w, scheme)
    assert torch.equal(sr.weight().detach(), dequantize(*rtn, scheme))


@pytest.mark.parametrize("scheme", SCHEMES[:4], ids=lambda s: s.name)
def test_autoround_beats_rtn_on_correlated_inputs(scheme):
    """A linear layer fed correlated inputs: rounding to nearest ignores the correlations, SignRound's
    output loss does not; the kept-best loss never increases."""
    x, w = correlated_inputs(n=512), torch.randn(48, 100)
    y = x @ w.T
    sr = SignRoundWeight(w, scheme)
    hist = []
    first, best = signround([sr], lambda step: F.mse_loss(x @ sr.weight().T, y), steps=60, history=hist)
    assert all(b <= a for a, b in zip(hist, hist[1:])) and best == hist[-1] < first
    got = sr.quantized()
    _same_format(got, rtn_quantize(w, scheme), scheme, w.shape)
    e_rtn, e_ar = out_err(x, w, *rtn_quantize(w, scheme), scheme), out_err(x, w, *got, scheme)
    assert e_ar < 0.9 * e_rtn, (e_ar, e_rtn)
    assert abs(e_ar - best) <= 1e-4 * best  # the kept iterate is the one whose loss was best
    v, a = sr.v.detach(), sr.alpha.detach()
    assert float(v.abs().max()) <= 0.5 and 0.5 <= float(a.min()) and float(a.max()) <= 1


# ---- in the pipeline ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(vocab_size=VOCAB, layers=3)


@pytest.fixture(scope="module")
def calib():
    return calib_ids(8, 48)


def _kl(ref, m):
    ids = torch.randint(0, VOCAB, (4, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = torch.log_softmax(ref(ids).logits, -1), torch.log_softmax(m(ids).logits, -1)
    return float((a.exp() * (a - b)).sum(-1).mean())


@pytest.fixture(scope="module")
def rtn_kl(tiny):
    r = copy.deepcopy(tiny)
    llmquant.quantize(r, "W3G32", progress=False)
    return _kl(tiny, r)


CASES = [
    ("hqq", None),
    ("autoround", AutoRoundParams(steps=30)),
    (["awq", "hqq"], [AWQParams(grid=5), None]),
    (["awq", "autoround"], [AWQParams(grid=5), AutoRoundParams(steps=30, batch=2)]),
]


@pytest.mark.parametrize("method,params", CASES, ids=lambda c: str(c))
def test_methods_in_the_pipeline_beat_rtn(tiny, calib, rtn_kl, method, params):
    m = copy.deepcopy(tiny)
    cfg = QuantConfig(weight="W3G32", method=method, method_params=params, calibration=CalibSpec(batch_size=4))
    s = llmquant.quantize(m, cfg, calib=None if method == "hqq" else calib, progress=False)
    assert len(s.layers) == 3 * 7 + 1  # + the tied embedding/head (Q8_0)
    q = m.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.scheme == cfg.weight and q.scale.shape == (72, 5)
    assert _kl(tiny, m) < rtn_kl
    if isinstance(method, list):  # AWQ's scales went into the norms
        assert not torch.equal(m.model.layers[0].input_layernorm.weight, tiny.model.layers[0].input_layernorm.weight)
    if method == "autoround":
        assert len(s.layer_errors) == 3 and all(0 < e < 1 for e in s.layer_errors)


def _logits(m, n=40):
    with torch.no_grad():
        return m(torch.arange(n)[None] * 7 % 400).logits


@pytest.mark.parametrize("method", ["hqq", "autoround"])
def test_save_load_bit_identical(tmp_path, tokenizer, calib, method):
    m = make_tiny_llama(vocab_size=VOCAB)
    cfg = QuantConfig(weight="W4G32A", method=method, method_params=AutoRoundParams(steps=5) if method == "autoround" else HQQParams(p=0.5))
    llmquant.quantize(m, cfg, calib=calib, progress=False)
    before = _logits(m)
    llmquant.save(m, tokenizer, tmp_path / "q")
    m2, _ = llmquant.load(tmp_path / "q")
    assert torch.equal(_logits(m2), before)
    for (n1, a), (n2, b) in zip(m.named_modules(), m2.named_modules()):
        assert n1 == n2 and type(a) is type(b)
        if isinstance(a, QuantLinear):
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scale, b.scale)
            assert (a.zero_point() is None) == (b.zero_point() is None)
            assert a.zero_point() is None or torch.equal(a.zero_point(), b.zero_point())
    man = json.loads((tmp_path / "q" / "llmquant.json").read_text())
    assert man["config"]["method"] == method
    assert m2.llmquant_config == cfg


def test_gguf_export_exact(tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """HQQ onto Q4_1 and AutoRound onto Q4_0: the GGUF blocks dequantize (gguf's own dequantizer) to the
    modules' weights bit for bit."""
    from gguf import GGUFReader, quants

    from llmquant.models import arch_for, gguf_to_hf_name, rope_row_order

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    m = make_tiny_llama(vocab_size=400, hidden=64)
    ids = torch.randint(0, 400, (4, 32), generator=torch.Generator().manual_seed(0))
    llmquant.quantize(m, QuantConfig(weight="gguf:Q4_1", method="hqq", targets=("re:.*self_attn.*",)), progress=False)
    llmquant.quantize(m, QuantConfig(weight="gguf:Q4_0", method="autoround", method_params=AutoRoundParams(steps=4),
                                     targets=("re:.*mlp.*",)), calib=ids, progress=False)
    set_kernel(m, "reference")
    rep = llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "m.gguf", progress=False)
    assert rep.type_counts() == {"Q4_1": 8, "Q4_0": 6, "F32": 6} and not rep.inexact
    mods, arch = dict(m.named_modules()), arch_for("llama")
    checked = 0
    for t in GGUFReader(str(tmp_path / "m.gguf")).tensors:
        if "blk" not in t.name or "norm" in t.name:
            continue
        mod = mods[gguf_to_hf_name(arch, t.name)[: -len(".weight")]]
        deq = quants.dequantize(np.asarray(t.data), t.tensor_type)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):  # undo llama.cpp's rope row order
            un = np.empty_like(deq)
            un[rope_row_order(deq.shape[0], 4 if "attn_q" in t.name else 2)] = deq
            deq = un
        assert np.array_equal(deq.view(np.uint32), mod.dequantize_weight().numpy().view(np.uint32)), t.name
        checked += 1
    assert checked == 14


def test_compressed_tensors_export_loads_in_transformers(tmp_path, calib):
    from transformers import AutoModelForCausalLM

    m = make_tiny_llama(vocab_size=VOCAB, hidden=64)
    llmquant.quantize(m, QuantConfig(weight="W4G32", method=["awq", "autoround"],
                                     method_params=[AWQParams(grid=4), AutoRoundParams(steps=4)]), calib=calib, progress=False)
    set_kernel(m, "reference")
    llmquant.export(m, None, tmp_path / "ct", format="compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    assert torch.allclose(_logits(hf), _logits(m), atol=1e-5, rtol=0)


# ---- knobs -------------------------------------------------------------------------------------------------

def test_params_round_trip_and_validation():
    cfg = QuantConfig(weight="W3G32", method=["awq", "autoround"],
                      method_params=[AWQParams(grid=5), {"steps": 7, "lr": 0.02, "batch": 2}])
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["method_params"][1]["steps"] == 7 and QuantConfig.from_dict(d) == cfg
    assert cfg.method_params[1] == AutoRoundParams(steps=7, lr=0.02, batch=2)
    h = QuantConfig(weight="W4G64", method="hqq", method_params=HQQParams(iterations=5, p=0.5, optimize_scale=False))
    assert QuantConfig.from_dict(json.loads(json.dumps(h.to_dict()))) == h
    for bad in ({"p": 1.5}, {"iterations": -1}, {"kappa": 0.5}, {"optimize_scale": 1}, {"nope": 1}, {"guard": "yes"}):
        with pytest.raises(SchemeError):
            HQQParams.from_dict(bad)
    g = HQQParams(guard="imse")
    assert HQQParams.from_dict(json.loads(json.dumps(g.to_dict()))) == g
    # a version 1 recipe (before the guard) ran unguarded, and still does
    assert HQQParams.from_dict({"iterations": 5, "version": 1}) == HQQParams(iterations=5, guard="off")
    for bad in ({"steps": -1}, {"lr": 0}, {"clip_min": 1.5}, {"batch": 0}, {"minmax": "yes"}):
        with pytest.raises(SchemeError):
            AutoRoundParams.from_dict(bad)


def test_cli_hqq(tmp_path, tiny_folder):
    from llmquant.cli import main

    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_folder), "--method", "hqq", "--scheme", "W4G32", "-o", str(out)]) == 0
    man = json.loads((out / "llmquant.json").read_text())
    assert man["config"]["method"] == "hqq" and man["config"]["method_params"]["iterations"] == 20


# ---- streaming ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("method,params", [("hqq", None), (["awq", "autoround"], [AWQParams(grid=4), AutoRoundParams(steps=6)])],
                         ids=["hqq", "awq+autoround"])
def test_streamed_equals_whole(tmp_path, calib, dtype, method, params):
    """Layers read from the checkpoint's shards as the pipeline reaches them quantize bit for bit as the
    model loaded whole does."""
    path = tmp_path / "m"
    make_tiny_llama(vocab_size=VOCAB, layers=3).to(dtype).save_pretrained(str(path), max_shard_size="60KB")
    whole, _ = llmquant.load_model(path)
    streamed, _ = llmquant.load_model(path, stream=True)
    assert any(p.is_meta for p in streamed.model.layers.parameters())
    cfg = QuantConfig(weight="W3G32", method=method, method_params=params)
    llmquant.quantize(whole, cfg, calib=calib, progress=False)
    llmquant.quantize(streamed, cfg, calib=calib, progress=False)
    a, b = whole.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if "layers" in k:
            assert torch.equal(a[k], b[k]), k
