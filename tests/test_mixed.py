"""Mixed precision: the knapsack solver, plan files, applying plans, sensitivity, budgets, half precision."""

import copy
import itertools
import json
import random

import pytest
import torch

import llmquant
from llmquant.errors import BudgetError, SchemeError, SelectionError
from llmquant.flows.mixed import plan_from_sensitivity, sensitivity, solve_knapsack
from llmquant.modules import FloatEmbedding, FloatLinear, QuantEmbedding, QuantLinear
from llmquant.schemes import PRESETS, FloatFormat, Plan

from conftest import make_tiny_llama


def _logits(m, n=40):
    with torch.no_grad():
        return m(torch.arange(n)[None] * 7 % 1000).logits


@pytest.mark.parametrize("seed", range(6))
def test_solver_matches_brute_force(seed):
    rng = random.Random(seed)
    units, cands = rng.randint(2, 6), rng.randint(2, 4)
    cost = [[rng.randint(1, 20) for _ in range(cands)] for _ in range(units)]
    dmg = [[rng.random() for _ in range(cands)] for _ in range(units)]
    budget = rng.randint(sum(min(r) for r in cost), sum(max(r) for r in cost))
    best = min(
        (sum(dmg[u][c] for u, c in enumerate(pick)), pick)
        for pick in itertools.product(range(cands), repeat=units)
        if sum(cost[u][c] for u, c in enumerate(pick)) <= budget
    )
    got = solve_knapsack(dmg, cost, budget, quantum=1)
    assert sum(cost[u][c] for u, c in enumerate(got)) <= budget
    assert sum(dmg[u][c] for u, c in enumerate(got)) == pytest.approx(best[0], abs=1e-12)


def test_plan_round_trips_through_file(tmp_path):
    plan = Plan.from_layers({
        "model.layers.0.mlp.down_proj": "W8",
        "re:.*self_attn\\.(k|v)_proj": "bf16",
        "model.layers.1.mlp.up_proj": PRESETS["W4G32"].with_() if hasattr(PRESETS["W4G32"], "with_") else {"bits": 3, "group_size": 16},
        "re:.*": "W4G64",
    }, info={"note": "hand-written"})
    p = plan.save(tmp_path / "plan.json")
    back = Plan.load(p)
    assert back == plan and back.to_dict() == plan.to_dict()
    assert list(json.loads(p.read_text())["layers"])[0] == "model.layers.0.mlp.down_proj"  # order kept
    assert back.rules[1][1] == FloatFormat("bfloat16")


def test_apply_plan_gives_each_layer_its_scheme_and_saves(tmp_path):
    m = make_tiny_llama(vocab_size=1024)
    plan = {"layers": {
        "model.layers.0.mlp.down_proj": "W8",
        "re:.*self_attn\\.(k|v)_proj": "bf16",
        "re:model\\.layers\\.1\\..*": "W3G32",
        "re:.*": "W4G64",
        "model.embed_tokens": "W4G32",  # tied with lm_head, same format: stored once
        "lm_head": "W4G32",
    }}
    ref = make_tiny_llama(vocab_size=1024)
    s = llmquant.quantize(m, plan, progress=False)
    L = m.model.layers
    assert L[0].mlp.down_proj.scheme == PRESETS["W8"]
    assert isinstance(L[0].self_attn.k_proj, FloatLinear) and L[0].self_attn.k_proj.weight.dtype == torch.bfloat16
    assert isinstance(L[1].self_attn.v_proj, FloatLinear)  # the earlier rule wins
    assert L[1].mlp.gate_proj.scheme == PRESETS["W3G32"] and L[0].mlp.gate_proj.scheme == PRESETS["W4G64"]
    assert isinstance(m.lm_head, QuantLinear) and isinstance(m.model.embed_tokens, QuantEmbedding)
    assert m.model.embed_tokens.qweight is m.lm_head.qweight
    assert isinstance(m.model.norm.weight, torch.Tensor) and m.model.norm.weight.dtype == torch.float32
    assert {l.name for l in s.layers} >= {"lm_head", "model.layers.0.mlp.down_proj"}
    # the embedding dequantizes to the head's weight, and the stored size counts the shared tensors once
    assert torch.equal(m.model.embed_tokens(torch.tensor([5])), m.lm_head.dequantize_weight()[5:6])
    size = llmquant.model_size(m)
    one = m.lm_head.packed_bytes()
    assert size.quantized_bytes < sum(x.packed_bytes() for x in m.modules() if isinstance(x, QuantLinear)) + 1
    assert size.quantized_bytes >= one
    # quantized output stays near the float model (per-token KL; uniform W3G32 gives 0.96 on this model)
    kl = torch.nn.functional.kl_div(_logits(m).log_softmax(-1), _logits(ref).log_softmax(-1), log_target=True, reduction="sum") / 40
    assert 0 < kl < 1.5
    before = _logits(m)
    llmquant.save(m, None, tmp_path / "q")
    m2, _ = llmquant.load(tmp_path / "q")
    assert torch.equal(_logits(m2), before)
    assert m2.model.embed_tokens.qweight is m2.lm_head.qweight
    assert type(m2.model.layers[0].self_attn.k_proj) is FloatLinear
    assert m2.llmquant_plan == Plan.from_dict(plan)
    man = json.loads((tmp_path / "q" / "llmquant.json").read_text())
    assert "model.embed_tokens.qweight" not in man["tensors"] or "lm_head.qweight" not in man["tensors"]


def test_plan_errors():
    m = make_tiny_llama()
    with pytest.raises(SelectionError, match="not Linear/Embedding"):
        llmquant.quantize(m, {"layers": {"model.layers.9.mlp.up_proj": "W8"}}, progress=False)
    with pytest.raises(SelectionError, match="match no layer"):
        llmquant.quantize(m, {"layers": {"re:.*conv.*": "W8", "re:.*": "W4G64"}}, progress=False)
    with pytest.raises(SchemeError, match="unknown format"):
        Plan.from_layers({"re:.*": "int5"})
    with pytest.raises(SchemeError, match="does not exist"):
        Plan.load("/nonexistent/plan.json")
    assert isinstance(m.model.layers[0].mlp.up_proj, torch.nn.Linear)  # nothing applied


CALIB = torch.arange(20000) * 7919 % 1000  # token ids for a 1024-token vocabulary


@pytest.fixture(scope="module")
def sensitive_model():
    """A small-weight tiny model whose layer-1 gate_proj is made sensitive: its input channels 0, 8, ...
    are zeroed by the norm and its weights on them are large, so an integer grid spent on those useless
    outliers rounds the useful weights away at 4 bits and below (int8 still resolves them)."""
    m = make_tiny_llama(seed=1, vocab_size=1024)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2 and "embed" not in n:
                p.mul_(0.25)
        m.model.layers[1].post_attention_layernorm.weight[::8] = 0
        m.model.layers[1].mlp.gate_proj.weight[:, ::8] = 10.0
    return m


def _exact_and_estimate(model, tmp_path, method):
    """Exact KL and the ``method`` estimate on the same windows, checked to rank the 14 x 5 pairs alike."""
    cands = ["bf16", "W8", "W4G32", "W3G32", "W2G32"]
    kl = sensitivity(model, CALIB, cands, method="kl", windows=2, seq_len=64, cache=tmp_path, progress=False)
    est = sensitivity(model, CALIB, cands, method=method, windows=2, seq_len=64, samples=4, cache=tmp_path,
                      progress=False)
    agree = est.agreement(kl)
    assert agree["pairs"] == 14 * 5 and agree["spearman"] > 0.8, agree
    return cands, kl, est


def test_sensitive_layer_kept_at_higher_precision(sensitive_model, tmp_path):
    cands, kl, fi = _exact_and_estimate(sensitive_model, tmp_path, "fisher")
    target = "model.layers.1.mlp.gate_proj"
    for sens in (kl, fi):
        i = [u.name for u in sens.units].index(target)
        assert sens.damage[i][cands.index("W4G32")] == max(r[cands.index("W4G32")] for r in sens.damage)
        plan = plan_from_sensitivity(sens, target_bits=4.5)
        bits = {n: getattr(f, "bits", 16) for n, f in plan.rules}
        assert bits[target] == 8 and bits[target] >= max(b for n, b in bits.items() if n != target), bits
        assert plan.info["bits_per_weight"] <= 4.5
        m = make_tiny_llama(seed=1, vocab_size=1024)
        llmquant.quantize(m, plan, progress=False)
        assert isinstance(m.get_submodule(target), QuantLinear) and m.get_submodule(target).scheme.bits == 8
    # a second call is served from the cache
    again = sensitivity(sensitive_model, CALIB, cands, method="kl", windows=2, seq_len=64, cache=tmp_path, progress=False)
    assert again.damage == kl.damage and again.key == kl.key


def test_budget_errors(sensitive_model):
    sens = sensitivity(sensitive_model, CALIB, ["W8", "W4G32"], method="fisher", windows=1, seq_len=32, samples=1,
                       cache=False, progress=False)
    with pytest.raises(BudgetError, match="below the smallest"):
        plan_from_sensitivity(sens, target_bits=4.0)  # W4G32 with fp32 scales is 5 bits/weight
    with pytest.raises(BudgetError, match="outside"):
        plan_from_sensitivity(sens, target_bits=40)
    with pytest.raises(BudgetError, match="above the model's fp32 size"):
        plan_from_sensitivity(sens, max_size="1GB")
    with pytest.raises(BudgetError, match="below the smallest"):
        plan_from_sensitivity(sens, max_size="0.1MB")
    with pytest.raises(BudgetError, match="exactly one"):
        plan_from_sensitivity(sens)
    limit = sens.fixed_bytes + sum(r[1] for r in sens.nbytes) + 10_000
    plan = plan_from_sensitivity(sens, max_size=limit)
    assert plan.info["total_bytes"] <= limit and "W8" in plan.info["formats"]


def test_half_precision_and_autocast(tmp_path):
    m, ref = make_tiny_llama(vocab_size=1024), make_tiny_llama(vocab_size=1024)
    ids = torch.arange(48)[None] * 5 % 1000
    with torch.no_grad(), llmquant.autocast("bf16"):
        ac = m(ids).logits.float()
    with torch.no_grad():
        fp = ref(ids).logits
    kl = torch.nn.functional.kl_div(ac.log_softmax(-1), fp.log_softmax(-1), log_target=True, reduction="batchmean")
    assert 0 < kl < 0.05
    llmquant.to_half(m, "bf16")
    assert isinstance(m.model.embed_tokens, FloatEmbedding) and m.model.embed_tokens.weight is m.lm_head.weight
    assert m.model.norm.weight.dtype == torch.float32 and m.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert llmquant.model_size(m).total_bytes < 0.51 * llmquant.model_size(ref).total_bytes
    with torch.no_grad():
        half = m(ids).logits
        with llmquant.autocast("bf16"):
            both = m(ids).logits.float()
    for out in (half, both):
        kl = torch.nn.functional.kl_div(out.log_softmax(-1), fp.log_softmax(-1), log_target=True, reduction="batchmean")
        assert kl < 0.05
    llmquant.save(m, None, tmp_path / "h")
    m2, _ = llmquant.load(tmp_path / "h")
    assert torch.equal(_logits(m2), _logits(m))
    with pytest.raises(SchemeError):
        with llmquant.autocast("int8"):
            pass


def test_kfac_sensitivity_agrees_with_exact_kl(sensitive_model, tmp_path):
    """The Kronecker-factored estimate ranks (layer, format) pairs as the measured KL does, sizes them within
    a small factor of it, and finds the planted sensitive layer."""
    cands, kl, kf = _exact_and_estimate(sensitive_model, tmp_path, "kfac")
    j = cands.index("W3G32")
    total_kl, total_kf = sum(r[j] for r in kl.damage), sum(r[j] for r in kf.damage)
    assert 0.25 < total_kf / total_kl < 4, (total_kf, total_kl)
    target = "model.layers.1.mlp.gate_proj"
    i = [u.name for u in kf.units].index(target)
    assert kf.damage[i][cands.index("W4G32")] == max(r[cands.index("W4G32")] for r in kf.damage)
    bits = {n: getattr(f, "bits", 16) for n, f in plan_from_sensitivity(kf, target_bits=4.5).rules}
    assert bits[target] == 8, bits


def _lands_on_its_formats(q, plan):
    """Apply a calibrated plan to ``q``: every planned layer ends in its planned format."""
    llmquant.quantize(q, plan, calib=CALIB[:4 * 64].reshape(4, 64), progress=False)
    for name, fmt in plan.rules:
        assert q.get_submodule(name).scheme == fmt


def test_awq_candidates_in_sensitivity_and_plans(sensitive_model):
    """quantizer='awq': each layer's AWQ scale and clipping searched for each format, on one half of the
    windows and measured on the other. The planted layer's outlier weights meet inputs the norm zeroes, so
    AWQ's candidates drop them and come out far below RTN's at 4 and 3 bits, by the exact KL and the K-FAC
    estimate alike (which agree in rank); the plan is an AWQ plan with the knobs it was measured with, and
    applies onto its formats."""
    m = sensitive_model
    cands = ["W8", "W4G32", "W3G32"]
    kw = dict(windows=4, seq_len=64, cache=False, progress=False)
    rtn = sensitivity(m, CALIB, cands, method="kl", **kw)
    kl = sensitivity(m, CALIB, cands, method="kl", quantizer="awq", **kw)
    kf = sensitivity(m, CALIB, cands, method="kfac", quantizer="awq", params={"grid": 10}, samples=4, **kw)
    assert kf.agreement(kl)["spearman"] > 0.8
    i = [u.name for u in kl.units].index("model.layers.1.mlp.gate_proj")
    for j in (1, 2):
        assert kl.damage[i][j] < 0.2 * rtn.damage[i][j], (cands[j], kl.damage[i][j], rtn.damage[i][j])
        assert sum(r[j] for r in kl.damage) < 0.5 * sum(r[j] for r in rtn.damage)
    plan = plan_from_sensitivity(kf, target_bits=4.5)
    assert plan.method == "awq" and plan.params.grid == 10 and plan.info["sensitivity"]["quantizer"] == "awq"
    _lands_on_its_formats(copy.deepcopy(m), plan)
    with pytest.raises(SchemeError, match="needs method='kfac'"):
        sensitivity(m, CALIB, cands, method="fisher", quantizer="awq", **kw)
    with pytest.raises(SchemeError, match="goes with quantizer='gptq', 'awq' or 'qat'"):
        sensitivity(m, CALIB, cands, method="kfac", params={"grid": 4}, **kw)
    with pytest.raises(SchemeError, match="unknown AWQParams fields"):
        sensitivity(m, CALIB, cands, method="kfac", quantizer="awq", params={"damp": 0.1}, **kw)


def test_gptq_candidates_in_sensitivity_and_plans(tmp_path):
    """quantizer='gptq': each layer solved by GPTQ onto each format. Its damages are below RTN's (exact KL
    and the K-FAC estimate alike, which agree in rank); the plan made from it is a GPTQ plan with the knobs
    it was measured with, applies, and lands on the planned formats."""
    m = make_tiny_llama(seed=2, vocab_size=1024)
    cands = ["W8", "W4G32", "W3G32", "W2G32"]
    # GPTQ is cross-fitted (solved on half the windows, measured on the other half): each half must hold
    # more tokens than the layers have inputs (72 and 160 here) for its solution to carry over
    kw = dict(windows=16, seq_len=64, cache=False, progress=False)
    rtn = sensitivity(m, CALIB, cands, method="kl", **kw)
    kl = sensitivity(m, CALIB, cands, method="kl", quantizer="gptq", **kw)
    kf = sensitivity(m, CALIB, cands, method="kfac", quantizer="gptq", samples=4, **kw)
    assert kf.agreement(kl)["spearman"] > 0.8
    for j in range(1, len(cands)):  # 4 bits and below: GPTQ's error is well below RTN's
        assert sum(r[j] for r in kl.damage) < 0.9 * sum(r[j] for r in rtn.damage), cands[j]
    plan = plan_from_sensitivity(kf, target_bits=4.6)
    assert plan.method == "gptq" and plan.params.act_order == "full" and plan.info["sensitivity"]["quantizer"] == "gptq"
    assert plan_from_sensitivity(kf, target_bits=4.6, method="rtn").method == "rtn"
    assert plan_from_sensitivity(rtn, target_bits=4.6).method == "rtn"
    custom = sensitivity(m, CALIB, cands, method="kfac", quantizer="gptq", gptq={"act_order": "off"}, samples=4, **kw)
    assert plan_from_sensitivity(custom, target_bits=4.6).params.act_order == "off"
    _lands_on_its_formats(make_tiny_llama(seed=2, vocab_size=1024), plan)
    with pytest.raises(SchemeError, match="kfac"):
        sensitivity(m, CALIB, cands, method="fisher", quantizer="gptq", **kw)
    with pytest.raises(SchemeError, match="at least 2 windows"):
        sensitivity(m, CALIB, cands, method="kfac", quantizer="gptq", **{**kw, "windows": 1})
    with pytest.raises(SchemeError, match="quantizer must be one of"):
        sensitivity(m, CALIB, cands, method="kfac", quantizer="hqq", **kw)
    with pytest.raises(SchemeError, match="goes with quantizer='gptq'"):
        sensitivity(m, CALIB, cands, method="kfac", gptq={"damp": 0.1}, **kw)
    with pytest.raises(SchemeError, match="method must be one of"):
        sensitivity(m, CALIB, cands, method="hessian", **kw)
