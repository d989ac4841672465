"""GPTQ's options (column order, static groups, range search, dampening) and the importance-weighted range
search shared by RTN and GPTQ: each moves the output error the way the theory says on layers built for it,
every combination still beats RTN, and the options round-trip through configs, old configs and saved folders."""

import copy
import json

import pytest
import torch

import llmquant
from llmquant import CalibSpec, GPTQParams, QuantConfig, RTNParams
from llmquant.algorithms import rtn_quantize
from llmquant.algorithms.gptq import column_order, gptq_quantize, hessian_from_inputs
from llmquant.errors import SchemeError
from llmquant.flows import needs_calibration
from llmquant.flows import quantize as flows_quantize
from llmquant.modules.fake_quant import mse_qparams
from llmquant.schemes import QuantScheme
from llmquant.schemes.primitives import range_qparams

from conftest import calib_ids, out_err


pytestmark = pytest.mark.usefixtures("one_thread")

W4 = QuantScheme(bits=4, group_size=32)
W3 = QuantScheme(bits=3, group_size=32)
W2A = QuantScheme(bits=2, group_size=32, symmetric=False)


def skewed_inputs(n=3000, k=128, seed=0, skew=1.0):
    """Correlated inputs whose channels have log-normally spread scales (a few dominate, as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(n, k, generator=g) @ mix + 0.05 * torch.randn(n, k, generator=g)
    return x * torch.exp(skew * torch.randn(k, generator=g))


def salient_inputs(n=3000, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, :: 16] *= 20  # one dominant channel in each group of 32 / 16
    return x




def weight(rows=64, k=128, seed=10):
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheme", [W4, W3, W2A], ids=lambda s: s.name)
def test_importance_weighted_rtn_lowers_output_error(scheme):
    """On a layer with a few dominant input channels, weighting each column's rounding error by its mean
    square input ("imse") lowers the output error below min-max and below the unweighted search."""
    x, w = salient_inputs(), weight()
    imp = x.pow(2).mean(0)
    e = {o: out_err(x, w, *rtn_quantize(w, scheme, observer=o, importance=imp), scheme) for o in ("minmax", "mse", "imse")}
    assert e["imse"] < 0.8 * e["minmax"], e
    assert e["imse"] < e["mse"], e
    # with uniform importance the weighted search is the unweighted one
    a = range_qparams(w, scheme, "imse", torch.full((128,), 3.0))
    b = range_qparams(w, scheme, "mse")
    assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("name", ["gguf:Q2_K", "gguf:Q3_K", "gguf:Q4_K", "gguf:Q5_K", "gguf:Q6_K"])
def test_importance_weighted_kquant_search(name):
    """k-quants: "imse" is llama.cpp's own group search weighted as its quantizers weight an importance
    matrix; on a layer with dominant input channels it lowers the output error below the unweighted search
    (what "minmax" runs), and the codes stay on the two-level grid (exact export)."""
    from llmquant.schemes import dequantize, resolve_scheme
    from llmquant.schemes.kquant import two_level_scales

    scheme = resolve_scheme(name)
    x, w = salient_inputs(k=256), weight(k=256)
    imp = x.pow(2).mean(0)
    e = {o: out_err(x, w, *rtn_quantize(w, scheme, observer=o, importance=imp), scheme) for o in ("minmax", "imse")}
    assert e["imse"] < 0.95 * e["minmax"], e
    q, scale, zero = rtn_quantize(w, scheme, observer="imse", importance=imp)
    assert torch.equal(two_level_scales(scale, scheme)[0], scale)  # already on the grid: a fixed point
    assert torch.isfinite(dequantize(q, scale, zero, scheme)).all()
    with pytest.raises(SchemeError, match="importance has"):
        range_qparams(w, scheme, "imse", torch.ones(5))


def test_range_search_errors_and_the_mse_observer_is_the_shared_search():
    w = weight()
    with pytest.raises(SchemeError, match="needs per-column importance"):
        range_qparams(w, W4, "imse")
    with pytest.raises(SchemeError, match="unknown range search"):
        range_qparams(w, W4, "kl")
    with pytest.raises(SchemeError, match="importance has"):
        range_qparams(w, W4, "imse", torch.ones(5))
    s1, _ = mse_qparams(w, W4, shrinks=20, lowest=0.5)
    s2, _ = range_qparams(w, W4, "mse", steps=20, lowest=0.5)
    assert torch.equal(s1, s2)
    s3, _ = range_qparams(w, W4, "minmax")
    assert torch.equal(s3, rtn_quantize(w, W4)[1])


@pytest.mark.parametrize("scheme", [W4, W2A], ids=lambda s: s.name)
def test_static_and_dynamic_groups_both_beat_rtn(scheme):
    x, w = skewed_inputs(), weight()
    h = hessian_from_inputs(x)
    rtn = out_err(x, w, *rtn_quantize(w, scheme), scheme)
    dyn = out_err(x, w, *gptq_quantize(w, h, scheme, act_order="full", block_size=32), scheme)
    sta = out_err(x, w, *gptq_quantize(w, h, scheme, act_order="full", static_groups=True, block_size=32), scheme)
    assert dyn < 0.7 * rtn and sta < 0.7 * rtn, (dyn, sta, rtn)
    # static groups: the scales are RTN's, whatever the sweep does to the weights
    assert torch.equal(gptq_quantize(w, h, scheme, static_groups=True)[1], rtn_quantize(w, scheme)[1])


def test_static_groups_keep_2bit_gptq_in_range():
    """At 2 bits the sweep's updates push weights out of their group's original range; min-max groups
    computed in the sweep then follow them and lose (in order, GPTQ with dynamic groups is no better than
    RTN here), static groups do not."""
    x, w = skewed_inputs(), weight()
    h = hessian_from_inputs(x)
    dyn = out_err(x, w, *gptq_quantize(w, h, W2A, block_size=32), W2A)
    sta = out_err(x, w, *gptq_quantize(w, h, W2A, static_groups=True, block_size=32), W2A)
    assert sta < 0.8 * dyn, (sta, dyn)


@pytest.mark.parametrize("scheme", [W4, W3], ids=lambda s: s.name)
def test_act_order_helps_on_skewed_inputs(scheme):
    x, w = skewed_inputs(), weight()
    h = hessian_from_inputs(x)
    e = {a: out_err(x, w, *gptq_quantize(w, h, scheme, act_order=a, block_size=32), scheme)
         for a in ("off", "full", "group")}
    assert e["full"] < 0.8 * e["off"] and e["group"] < e["off"], e
    # True / False are the old spellings of "full" / "off"
    assert torch.equal(gptq_quantize(w, h, scheme, act_order=True)[0], gptq_quantize(w, h, scheme, act_order="full")[0])


def test_group_order_keeps_groups_whole():
    d = torch.tensor([1.0, 5, 2, 0, 9, 9, 0, 0, 3, 1])  # groups of 4: sums 8, 18, 4
    assert column_order(d, "group", 4).tolist() == [4, 5, 6, 7, 1, 2, 0, 3, 8, 9]
    assert column_order(d, "full", 4)[:2].tolist() == [4, 5]
    assert column_order(d, "off", 4) is None and column_order(d, False, 4) is None
    with pytest.raises(SchemeError, match="act_order"):
        column_order(d, "random", 4)


OPTIONS = [dict(act_order=a, static_groups=s, observer=o, damp=d)
           for a in ("off", "full", "group") for s in (False, True) for o in ("minmax", "mse", "imse")
           for d in (0.01, 0.05)]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_every_gptq_option_beats_rtn(opts):
    x, w = skewed_inputs(), weight()
    rtn = out_err(x, w, *rtn_quantize(w, W3), W3)
    q, scale, zero = gptq_quantize(w, hessian_from_inputs(x), W3, block_size=32, **opts)
    assert q.dtype == torch.int16 and int(q.min()) >= W3.qmin and int(q.max()) <= W3.qmax
    assert out_err(x, w, q, scale, zero, W3) < 0.75 * rtn


def test_importance_weighted_gptq_beats_min_max_gptq():
    x, w = skewed_inputs(), weight()
    h = hessian_from_inputs(x)
    for scheme in (W4, W3):
        e = {o: out_err(x, w, *gptq_quantize(w, h, scheme, act_order="full", observer=o, block_size=32), scheme)
             for o in ("minmax", "imse")}
        assert e["imse"] < 0.9 * e["minmax"], e


@pytest.mark.parametrize("name", ["gguf:Q2_K", "gguf:Q3_K", "gguf:Q6_K"])
def test_gptq_on_kquants_weights_the_group_search(name):
    """GPTQ on a k-quant grid: observer "imse" runs llama.cpp's group search weighted by diag H (lower output
    error on dominant input channels), "minmax" and "mse" its unweighted search (the same codes)."""
    from llmquant.schemes import resolve_scheme
    from llmquant.schemes.kquant import two_level_scales

    scheme = resolve_scheme(name)
    x, w = salient_inputs(k=256), weight(k=256)
    h = hessian_from_inputs(x)
    got = {o: gptq_quantize(w, h, scheme, act_order="full", static_groups=True, observer=o) for o in ("minmax", "mse", "imse")}
    assert all(torch.equal(a, b) for a, b in zip(got["minmax"][:2], got["mse"][:2]))
    e = {o: out_err(x, w, *r, scheme) for o, r in got.items()}
    assert e["imse"] < 0.95 * e["minmax"], e
    assert torch.equal(two_level_scales(got["imse"][1], scheme)[0], got["imse"][1])  # still on the grid


def test_params_validate_and_round_trip():
    p = GPTQParams(damp=0.05, act_order="group", static_groups=True, observer="imse")
    assert GPTQParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert GPTQParams(act_order=True).act_order == "full" and GPTQParams(act_order=False).act_order == "off"
    for bad in (dict(act_order="sideways"), dict(observer="kl"), dict(static_groups="yes"), dict(damp=1.5)):
        with pytest.raises(SchemeError):
            GPTQParams(**bad)
    assert RTNParams.from_dict(RTNParams(observer="imse").to_dict()) == RTNParams(observer="imse")
    with pytest.raises(SchemeError, match="observer"):
        RTNParams(observer="percentile")
    cfg = QuantConfig(weight="W3G32", method=["awq", "gptq"], method_params=[None, p])
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert QuantConfig.from_json(QuantConfig(method="rtn", method_params={"observer": "mse"}).to_json()).method_params \
        == RTNParams(observer="mse")


def test_old_gptq_params_still_load_with_their_old_meaning():
    """Version 1 (before the options) was the paper's algorithm: min-max groups in the sweep."""
    old = {"damp": 0.01, "block_size": 128, "act_order": True, "version": 1}
    p = GPTQParams.from_dict(old)
    assert (p.act_order, p.static_groups, p.observer, p.version) == ("full", False, "minmax", 2)
    cfg = QuantConfig.from_dict({"weight": "W4G64", "method": "gptq", "method_params": old})
    assert cfg.method_params == p
    legacy = {"weight": "W4G64", "method": "gptq", "method_params": {**old, "awq_scales": True, "awq_grid": 5}}
    assert QuantConfig.from_dict(legacy).method_params[1] == p
    # a hand-written dict without a version takes today's defaults for what it leaves out
    assert GPTQParams.from_dict({"damp": 0.02}) == GPTQParams(damp=0.02)
    # a config written before RTN had knobs (method_params null)
    assert QuantConfig.from_dict({"weight": "W4G64", "method": "rtn", "method_params": None}).method_params == RTNParams()


VOCAB = 1000




@pytest.fixture(scope="module")
def calib():
    return calib_ids(8, 48)


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def test_options_survive_a_saved_folder(tiny, calib, tmp_path, tokenizer):
    m = copy.deepcopy(tiny)
    p = GPTQParams(act_order="group", static_groups=True, observer="imse", damp=0.05)
    cfg = QuantConfig(weight="W4G32", method="gptq", method_params=p, calibration=CalibSpec(samples=8, seq_len=48))
    llmquant.quantize(m, cfg, calib=calib, progress=False)
    ids = torch.randint(0, VOCAB, (2, 30))
    before = _logits(m, ids)
    llmquant.save(m, tokenizer, tmp_path / "q")
    m2, _ = llmquant.load(tmp_path / "q")
    assert torch.equal(_logits(m2, ids), before)
    man = json.loads((tmp_path / "q" / "llmquant.json").read_text())
    assert man["config"]["method_params"] == p.to_dict()
    assert m2.llmquant_config == cfg


def test_importance_weighted_rtn_is_a_calibrated_method(tiny, calib, tmp_path, tokenizer):
    cfg = QuantConfig(weight="W3G32", method="rtn", method_params=RTNParams(observer="imse"))
    assert needs_calibration(cfg) and not needs_calibration(QuantConfig(weight="W3G32"))
    assert not needs_calibration(QuantConfig(method="rtn", method_params=RTNParams(observer="mse")))
    with pytest.raises(SchemeError, match="needs calibration data"):
        flows_quantize(copy.deepcopy(tiny), cfg)
    ids = torch.randint(0, VOCAB, (2, 30))
    ref = _logits(tiny, ids)
    errs = {}
    for obs in ("minmax", "imse"):
        m = copy.deepcopy(tiny)
        c = QuantConfig(weight="W3G32", method="rtn", method_params=RTNParams(observer=obs))
        s = llmquant.quantize(m, c, calib=calib if obs == "imse" else None, progress=False)
        errs[obs] = float((_logits(m, ids) - ref).pow(2).mean())
    assert s.layer_errors  # calibrated: measured layer by layer
    assert errs["imse"] != errs["minmax"]
    llmquant.save(m, tokenizer, tmp_path / "q")
    assert llmquant.load(tmp_path / "q")[0].llmquant_config.method_params == RTNParams(observer="imse")


def test_statistics_pass_skips_the_tail_without_changing_them(tiny, calib):
    """A float pass whose output goes unused stops at the last linear's input: the statistics are those of
    whole passes (same tokens, same sums), and symmetric accumulation gives a symmetric X^T X."""
    from llmquant.flows.passes import TailSkip, _run, record_layer_inputs
    from llmquant.flows.stats import StatsCollector

    m = copy.deepcopy(tiny)
    layers = m.model.layers
    xs, kw = record_layer_inputs(m, layers, list(calib.split(2)), {"use_cache": False})
    layer = layers[0]
    lin = {n: mod for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
    whole, skipped = StatsCollector(lin), StatsCollector(lin)
    with torch.no_grad():
        with whole:
            for x, k in zip(xs, kw[0]):
                _run(layer, x, k)
        with skipped, TailSkip(lin) as tail:
            tail.full(layer, xs[0], kw[0][0])
            assert tail.target == "mlp.down_proj"
            assert all(tail.run(layer, x, k) for x, k in zip(xs[1:], kw[0][1:]))
    for n in whole.stats:
        a, b = whole.stats[n], skipped.stats[n]
        assert a.n == b.n and torch.allclose(a.xtx, b.xtx, rtol=1e-5, atol=1e-4)
        assert torch.equal(a.xtx, a.xtx.T)


def test_bfloat16_calibration_passes(tiny, calib):
    ids = torch.randint(0, VOCAB, (2, 30))
    ref = _logits(tiny, ids)
    err = {}
    for compute in ("float32", "bfloat16"):
        m = copy.deepcopy(tiny)
        cfg = QuantConfig(weight="W4G32", method="gptq", calibration=CalibSpec(samples=8, seq_len=48, compute=compute))
        llmquant.quantize(m, cfg, calib=calib, progress=False)
        assert m.model.layers[0].self_attn.q_proj.scale.dtype == torch.float32
        err[compute] = float((_logits(m, ids) - ref).pow(2).mean())
    assert err["bfloat16"] < 1.5 * err["float32"], err
    with pytest.raises(SchemeError, match="compute"):
        CalibSpec(compute="float16")


# ---- the compiled column loop and the grouped range search --------------------------------------------

LOOP_SCHEMES = [W4, W2A, QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="min"),
                QuantScheme(bits=4), llmquant.schemes.PRESETS["gguf:Q4_K"]]


@pytest.mark.parametrize("scheme", LOOP_SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("opts", [dict(act_order="full", static_groups=True, observer="imse"),
                                  dict(act_order="off", static_groups=False, observer="minmax"),
                                  dict(act_order="group", static_groups=False, observer="mse")], ids=str)
def test_compiled_column_loop_matches_the_python_loop(monkeypatch, scheme, opts):
    """The compiled loop rounds as the Python loop does (the same rule, operation for operation); only the
    updates' last bits may differ, so the codes agree but for rare values at a rounding boundary, and the
    output error is the same to well under a percent. Dynamic groups (qparams computed mid-block) included."""
    from llmquant.kernels import native

    if native.load() is None:
        pytest.fail(f"the compiled kernels must build on the test machine: {native.why_unavailable()}")
    x, w = skewed_inputs(k=256), weight(rows=96, k=256)
    h = hessian_from_inputs(x)
    out = {}
    for loop in ("python", "native"):
        monkeypatch.setenv("LLMQUANT_GPTQ_LOOP", loop)
        out[loop] = gptq_quantize(w, h, scheme, block_size=64, **opts)
    (qp, sp, zp), (qn, sn, zn) = out["python"], out["native"]
    assert (qp == qn).float().mean() > 0.995
    ep, en = out_err(x, w, qp, sp, zp, scheme), out_err(x, w, qn, sn, zn, scheme)
    assert abs(en - ep) <= 5e-3 * ep, (ep, en)
    if opts["static_groups"]:
        assert torch.equal(sp, sn)


def test_compiled_column_loop_one_block_against_a_reference():
    """One call on a block: codes and scaled errors equal a float64 reference of the paper's loop."""
    from llmquant.kernels import native

    mod = native.load()
    if mod is None:
        pytest.fail(f"the compiled kernels must build on the test machine: {native.why_unavailable()}")
    g = torch.Generator().manual_seed(3)
    n, rows = 16, 40
    w1 = torch.randn(n, rows, generator=g)
    u1 = torch.triu(torch.rand(n, n, generator=g) * 0.1) + torch.eye(n)
    st = torch.rand(2, rows, generator=g) * 0.3 + 0.1
    zt = torch.full((2, rows), 7.0)
    gidx = torch.tensor([0] * 8 + [1] * 8)
    codes, err = torch.zeros(n, rows, dtype=torch.int16), torch.zeros(n, rows)
    ref_w = w1.double().clone()
    mod.gptq_columns(w1, u1, st, zt, gidx, 0, n, 1, 0.0, 15.0, codes, err)
    for i in range(n):
        s, z = st[gidx[i]].double(), zt[gidx[i]].double()
        q = (ref_w[i] / s + z).round().clamp(0, 15)
        e = (ref_w[i] - (q - z) * s) / u1[i, i].double()
        ref_w[i + 1 :] -= u1[i, i + 1 :, None].double() * e
        assert (codes[i].double() == q).float().mean() >= 0.95  # float32 vs float64 at rounding boundaries
        assert torch.allclose(err[i].double(), e, atol=1e-4)


@pytest.mark.parametrize("name", ["W4G64", "W3G32", "W2G64", "W4", "W8", "gguf:Q4_0", "gguf:Q4_1", "W4G64A"])
def test_grouped_range_search_is_the_round_trip_search(name):
    """The range search on the grouped view gives exactly the qparams of the per-value round trip (the same
    operations; ragged widths keep the round trip), in chunks of rows or not."""
    from llmquant.schemes import primitives as P

    scheme = llmquant.schemes.PRESETS[name]

    def reference(x, imp):
        def error(lo, hi):
            d = P._roundtrip(x, lo, hi, scheme).pow(2)
            return P.group_sum((d if imp is None else d * imp).reshape(-1, x.shape[-1]), lo.shape[1], scheme)
        lo, hi = P.minmax(x, scheme)
        return P.qparams_from_minmax(*P.search_range(lo, hi, P.range_ratios(), error), scheme)

    for rows, k in [(300, 576), (7, 1536), (5, 100)]:
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * torch.rand(k)
        imp = torch.rand(k)
        for search, i in (("mse", None), ("imse", imp)):
            s_ref, z_ref = reference(x, i)
            s, z = range_qparams(x, scheme, search, imp)
            assert torch.equal(s, s_ref)
            assert (z is None and z_ref is None) or torch.equal(z, z_ref)


@pytest.mark.parametrize("name", ["W4G64", "W2G64", "gguf:Q4_1", "W8", "gguf:Q4_K"])
def test_sqnr_from_codes_is_the_modules_own(name):
    """A summary row's SQNR computed from the codes at hand equals the one from the module's unpacked codes."""
    from llmquant.modules import QuantLinear

    scheme = llmquant.schemes.PRESETS[name]
    w = weight(rows=40, k=512)
    q, s, z = rtn_quantize(w, scheme)
    m = QuantLinear.from_quantized(q, s, z, scheme)
    for block in (1 << 22, 1024):
        assert m.weight_sqnr_db(w, block, codes=q) == pytest.approx(m.weight_sqnr_db(w, block), rel=1e-12)


def test_inverse_cholesky_factor_against_float64():
    """The upper factor U with U^T U = (H + damp mean(diag H) I)^-1, from one factorization of the reversed H,
    is upper triangular and equals the float64 factor of the inverse."""
    from llmquant.algorithms.gptq import _inverse_cholesky

    x = skewed_inputs(k=96)
    h = hessian_from_inputs(x)
    u = _inverse_cholesky(h, 0.01, "w")
    hd = h.double() + 0.01 * h.double().diagonal().mean() * torch.eye(96, dtype=torch.float64)
    ref = torch.linalg.cholesky(torch.linalg.inv(hd), upper=True)
    assert torch.equal(u, u.triu())
    assert float((u.double() - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("scheme", [W4, W3, W2A, QuantScheme(bits=4, group_size=32, signed_scale=True),
                                    QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="float"),
                                    QuantScheme(bits=4, group_size=32, symmetric=False, zero_point="min"),
                                    QuantScheme(bits=8, group_size=32, restricted_range=True), QuantScheme(bits=4)],
                         ids=lambda s: s.name)
def test_compiled_range_search_is_the_pytorch_search(scheme):
    """The compiled search (what RTN and GPTQ call) picks the PyTorch search's ratio in every group but for
    near-ties (float32 vs float64 sums), and its total error is the same to 1e-6; K not a multiple of 8 too."""
    from llmquant.algorithms.search import range_qparams as compiled
    from llmquant.kernels import native
    from llmquant.schemes import dequantize, quantize_to_int

    if native.load() is None:
        pytest.fail(f"the compiled kernels must build on the test machine: {native.why_unavailable()}")
    for k in (256, 100) if scheme.granularity == "channel" else (256,):
        w = weight(rows=200, k=k) * torch.rand(k, generator=torch.Generator().manual_seed(1))
        imp = torch.rand(k, generator=torch.Generator().manual_seed(2))
        for search in ("mse", "imse"):
            (s_t, z_t), (s_c, z_c) = range_qparams(w, scheme, search, imp), compiled(w, scheme, search, imp)
            assert (s_t == s_c).float().mean() >= 0.995
            err = [float(((dequantize(quantize_to_int(w, s, z, scheme), s, z, scheme) - w).pow(2)
                          * (imp if search == "imse" else 1)).sum()) for s, z in ((s_t, z_t), (s_c, z_c))]
            assert err[1] == pytest.approx(err[0], rel=1e-6)


def test_compiled_column_loop_rows_over_threads(monkeypatch):
    """From 1024 rows the compiled loop splits the rows over the threads: the same codes as on one thread
    (rows are independent; each row's arithmetic is unchanged)."""
    x, w = skewed_inputs(k=128), weight(rows=1100, k=128)
    h = hessian_from_inputs(x)
    monkeypatch.setenv("LLMQUANT_GPTQ_LOOP", "native")
    one = gptq_quantize(w, h, W4)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = gptq_quantize(w, h, W4)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@pytest.mark.parametrize("n,leaf", [(96, 16), (131, 32), (40, 256)])
def test_lower_inverse_by_halves_against_float64(n, leaf):
    """The triangular inverse by halves (odd sizes included) is lower triangular and equals float64's."""
    from llmquant.algorithms.gptq import _lower_inverse

    x = skewed_inputs(k=n, n=4 * n)
    low = torch.linalg.cholesky(hessian_from_inputs(x) + 0.01 * torch.eye(n))
    inv = _lower_inverse(low, leaf)
    ref = torch.linalg.inv(low.double())
    assert torch.equal(inv, inv.tril())
    assert float((inv.double() - ref).abs().max() / ref.abs().max()) < 1e-5
