"""Architecture facts: folds exact on every family (plain, (1 + w) and biased norms, pre/post norms,
parallel blocks, fused linears), fold pairs found by tracing a decoder layer, declared facts checked."""

import copy
import dataclasses

import pytest
import torch

import llmquant
from llmquant import AWQParams, QuantConfig
from llmquant.algorithms.fold import fold_scale_modules
from llmquant.errors import ArchitectureMismatchError, UnsupportedArchitectureError
from llmquant.flows.folds import fold_plan, layer_pairs
from llmquant.flows.smooth import smoothing_pairs
from llmquant.models import ARCHS, ArchSpec, arch_for
from llmquant.models.trace import trace_layer

from families import FAMILIES, make_family

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _fold_random(model, pairs, offsets=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in pairs:
        targets = [model.get_submodule(t) for t in p.targets]
        w = targets[0].weight
        width = w.shape[1] if isinstance(targets[0], torch.nn.Linear) else w.shape[0]
        s = torch.rand(width, generator=g) * 4 + 0.25
        fold_scale_modules(model.get_submodule(p.source), targets, s, p.offset if offsets else 0.0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_folding_leaves_the_float_model_unchanged(family):
    """A random positive scale folded into every (source, linears) pair: the logits stay the float ones."""
    model = make_family(family)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    ref = _logits(model, ids)
    pairs = smoothing_pairs(model)
    layers = model.config.num_hidden_layers
    assert pairs and len(pairs) % layers == 0
    _fold_random(model, pairs)
    out = _logits(model, ids)
    assert not torch.equal(model.state_dict()[pairs[0].source + ".weight"], make_family(family).state_dict()[pairs[0].source + ".weight"])
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_one_plus_w_norms_scale_one_plus_w(family):
    """Gemma's RMSNorm computes x * (1 + w): dividing w alone by s is wrong by far more than rounding."""
    model = make_family(family)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    ref = _logits(model, ids)
    pairs = smoothing_pairs(model, linear_pairs=False)
    assert {p.offset for p in pairs} == {1.0}
    assert pairs[1].source.endswith("pre_feedforward_layernorm")  # not post_attention_layernorm
    _fold_random(model, pairs, offsets=False)
    assert (_logits(model, ids) - ref).abs().max() > 1e-2 * ref.abs().max()


def _concrete(model, pairs):
    return tuple(layer_pairs(model.get_submodule(arch_for(model).layers)[0], pairs))


@pytest.mark.parametrize("family", [f for f in FAMILIES if arch_for(f).norm_to_linears or arch_for(f).linear_to_linears])
def test_trace_agrees_with_the_declared_pairs(family):
    model = make_family(family)
    n2l, l2l, offsets = trace_layer(model, arch_for(model)).discover()
    spec = arch_for(model)
    assert set(_concrete(model, spec.norm_to_linears)) == set(n2l)  # every foldable norm, with all its linears
    assert set(_concrete(model, spec.linear_to_linears)) <= set(l2l)
    assert set(offsets.values()) <= {spec.norm_offset}


def test_trace_finds_parallel_blocks_and_fused_linears():
    """Falcon (parallel attention + MLP): one norm feeds the fused QKV and the MLP; Phi-3: fused qkv and
    gate_up; GPT-2: Conv1D; OPT: ReLU between fc1 and fc2 lets a scale through, and so does attention from
    v to the output projection when there is no grouped-query sharing."""
    n2l, _, _ = trace_layer(make_family("falcon")).discover()
    assert n2l == (("input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h")),)
    n2l, l2l, _ = trace_layer(make_family("falcon", new_decoder_architecture=True, num_kv_heads=2)).discover()
    assert n2l == (("ln_attn", ("self_attention.query_key_value",)), ("ln_mlp", ("mlp.dense_h_to_4h",)))
    n2l, l2l, _ = trace_layer(make_family("phi3")).discover()
    assert n2l == (("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",)))
    assert l2l == ()  # gate and up share one output: no linear feeds down_proj alone
    assert trace_layer(make_family("gpt2")).discover()[0] == (("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",)))
    _, l2l, _ = trace_layer(make_family("opt")).discover()
    assert l2l == (("self_attn.v_proj", ("self_attn.out_proj",)), ("fc1", ("fc2",)))
    n2l, l2l, _ = trace_layer(make_family("olmo2")).discover()  # post-norms only: no norm feeds a linear
    assert n2l == () and l2l == (("mlp.up_proj", ("mlp.down_proj",)),)


def test_a_family_without_an_entry_is_traced(monkeypatch):
    """With Gemma 2's entry gone, AWQ finds its pairs and the (1 + w) kind by tracing, and gives the same
    model as with the entry."""
    model = make_family("gemma2")
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(4))
    cfg = QuantConfig(weight="W4G32", method="awq")
    with_entry = copy.deepcopy(model)
    llmquant.quantize(with_entry, cfg, calib=calib, progress=False)
    monkeypatch.setattr("llmquant.models.arch.ARCHS", [s for s in ARCHS if "gemma2" not in s.model_types])
    assert arch_for(model) is None
    plan = fold_plan(model, what="AWQ", hint="")
    assert plan.traced and plan.offset("pre_feedforward_layernorm") == 1.0
    llmquant.quantize(model, cfg, calib=calib, progress=False)
    ids = calib[:2]
    assert torch.equal(_logits(model, ids), _logits(with_entry, ids))


def test_declared_facts_that_disagree_with_the_trace_are_errors():
    model = make_family("gemma2")
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(4))
    wrong = AWQParams(norm_to_linears=[["post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]]])
    with pytest.raises(ArchitectureMismatchError, match="pre_feedforward_layernorm -> \\['mlp.gate_proj'"):
        llmquant.quantize(copy.deepcopy(model), QuantConfig(method="awq", method_params=wrong), calib=calib, progress=False)
    plain = dataclasses.replace(arch_for(model), norm_offset=0.0)
    with pytest.raises(ArchitectureMismatchError, match="scales by 1 \\+ weight"):
        smoothing_pairs(model, plain)
    not_a_fold = ArchSpec(model_types=("llama",), norm_to_linears=(("input_layernorm", ("self_attn.q_proj",)),))
    with pytest.raises(ArchitectureMismatchError, match="does not hold"):
        smoothing_pairs(make_family("llama"), not_a_fold)  # k and v read the same norm output
    with pytest.raises(UnsupportedArchitectureError, match="no norm or linear"):
        fold_plan(make_family("olmo2"), ArchSpec(model_types=("x",)), what="AWQ", hint="", linear_pairs=False)


def _rel_mse(model, ref, ids):
    out = _logits(model, ids)
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


@pytest.mark.parametrize("family", ["gemma2", "falcon"])
def test_awq_with_user_pairs_beats_rtn(family):
    """The failure users met: AWQ with a mapping on a (1 + w) family gave garbage. Now it is at least as
    good as RTN on the model's logits."""
    model = make_family(family)
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(5))
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(6))
    ref = _logits(model, ids)
    pairs = trace_layer(model).discover()[0]
    errs = {}
    for method, params in (("rtn", None), ("awq", AWQParams(norm_to_linears=pairs))):
        m = copy.deepcopy(model)
        llmquant.quantize(m, QuantConfig(weight="W3G32", method=method, method_params=params), calib=calib, progress=False)
        errs[method] = _rel_mse(m, ref, ids)
    assert errs["awq"] < errs["rtn"]
