"""Every strategy on a tiny random model of every decoder family: it works, or refuses with a clear error.

Mixture-of-experts families whose experts transformers keeps as fused 3-D parameters (Mixtral, Qwen2-MoE,
Qwen3-MoE) are quantized one linear per expert; GPT-2's Conv1D linears as the nn.Linear they compute."""

import json

import pytest
import torch
import torch.nn.functional as F

import llmquant
from llmquant import PRESETS, QuantConfig, QuantScheme
from llmquant.errors import SelectionError, UnsupportedModelError
from llmquant.kernels import set_kernel
from llmquant.modules import QuantLinear
from llmquant.modules.fake_quant import FakeQuantLinear
from llmquant.runtime import LeanModel

from families import FAMILIES, make_family

pytestmark = pytest.mark.usefixtures("one_thread")

#: family -> (the error every strategy raises, what its message says)
REFUSED: dict = {}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}
LEAN = {"llama", "mistral", "qwen2", "qwen3"}  # families the lean runtime runs; the others use their forward
A8 = QuantScheme(bits=8, granularity="tensor")
CALIB = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(4))
IDS = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(5))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _kl(out, ref):
    """Mean KL(p_ref || p_out) per position."""
    return float(F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum")) / (ref.numel() / ref.shape[-1])


def _n_linears(model):
    """The linears quantizing selects: every Linear (experts one per expert) but heads and MoE routers."""
    from llmquant.modules.experts import unfuse_experts

    from llmquant.models import is_linear

    unfuse_experts(model)  # what selecting does (the same function)
    return sum(is_linear(m) for n, m in model.named_modules()
               if n != "lm_head" and not n.endswith((".lm_head", "shared_expert_gate")) and "embed_out" not in n)


STRATEGIES = {
    "rtn": (lambda m: llmquant.quantize(m, "W4G32", progress=False), 1.0),
    "gptq": (lambda m: llmquant.quantize(m, QuantConfig(weight="W4G32", method="gptq"), calib=CALIB, progress=False), 2.0),
    "awq": (lambda m: llmquant.quantize(m, QuantConfig(weight="W4G32", method="awq"), calib=CALIB, progress=False), 1.0),
    "smoothquant": (lambda m: llmquant.quantize(m, QuantConfig(weight="W8", activation=A8, method="smoothquant",
                                                               smooth_alpha=0.5), calib=CALIB, progress=False), 0.1),
    "dynamic": (lambda m: llmquant.quantize_dynamic(m, progress=False), 0.02),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_ptq_and_dynamic(family, strategy):
    """Each linear becomes a QuantLinear, and the logits stay near the float model's (random models: loose
    bounds; W8A8 and dynamic int8 far tighter than 4-bit)."""
    model = make_family(family)
    run, bound = STRATEGIES[strategy]
    if family in REFUSED:
        err, msg = REFUSED[family]
        with pytest.raises(err, match=msg):
            run(model)
        return
    ref = _logits(model)
    n = _n_linears(model)
    run(model)
    head = model.get_output_embeddings()
    assert sum(isinstance(m, QuantLinear) for m in model.modules() if m is not head) == n
    # weight-only methods give the output head (and the embedding) int8 by default; W8A8 leaves them float
    assert isinstance(head, QuantLinear) == (strategy in ("rtn", "gptq", "awq"))
    assert 0 < _kl(_logits(model), ref) < bound


@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_with_named_targets_quantizes_the_rest(family, tmp_path):
    """A fused-expert model quantizes what the user names; experts and the router stay float (and load)."""
    model = make_family(family)
    ref = _logits(model)
    cfg = QuantConfig(weight="W4G32", method="awq", targets=("re:.*self_attn\\..*",))
    llmquant.quantize(model, cfg, calib=CALIB, progress=False)
    q = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert q and all(".self_attn." in n for n in q)
    assert type(model.model.layers[0].mlp.experts.gate_up_proj[0]) is torch.nn.Linear
    assert 0 < _kl(_logits(model), ref) < 1.0
    llmquant.save(model, None, tmp_path / "q")
    assert torch.equal(_logits(llmquant.load(tmp_path / "q")[0]), _logits(model))


@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_experts_quantized_per_expert(family):
    """Unfused, the float model computes exactly what transformers' eager experts compute; GPTQ gathers
    each expert's statistics from the tokens routed to it (an expert that got too few falls back to RTN
    and is counted); routers stay float."""
    from llmquant.modules.experts import ExpertLinears, unfuse_experts

    model = make_family(family)
    model.config._experts_implementation = "eager"
    ref = _logits(model)
    unfuse_experts(model)
    assert torch.equal(_logits(model), ref)
    gptq = QuantConfig(weight="W4G32", method="gptq")
    s = llmquant.quantize(model, gptq, calib=CALIB, progress=False)
    experts = [m for m in model.modules() if isinstance(m, ExpertLinears)]
    assert experts and all(isinstance(lin, QuantLinear) for e in experts for lin in (*e.gate_up_proj, *e.down_proj))
    routers = [n for n, m in model.named_modules() if n.endswith((".gate", "shared_expert_gate"))]
    assert routers and not any(isinstance(model.get_submodule(n), QuantLinear) for n in routers)
    assert 0 < _kl(_logits(model), ref) < 2.0
    # one token of calibration: most experts see none or almost none
    starved = make_family(family)
    s = llmquant.quantize(starved, gptq, calib=CALIB[:1, :1], progress=False)  # two of four experts chosen
    assert s.rtn_fallback and all(".experts." in n for n in s.rtn_fallback)
    assert f"{len(s.rtn_fallback)} linears with too few calibration tokens" in str(s)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in REFUSED])
def test_qat_step_then_convert(family):
    """One optimizer step through the fake-quantized model, then convert: the packed model computes what
    the trained fake-quantized one does."""
    model = make_family(family)
    llmquant.prepare_qat(model, QuantConfig(weight="W4G32", head="fp32"), progress=False)  # the head it trained with
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = _logits(model)
    loss = F.cross_entropy(model(CALIB).logits[:, :-1].flatten(0, 1), CALIB[:, 1:].flatten())
    loss.backward()
    opt.step()
    trained = _logits(model)
    assert torch.isfinite(loss) and not torch.equal(trained, before)
    fakes = {n: m.quantized_weight().detach() for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    llmquant.convert_qat(model, progress=False)
    assert len(fakes) == _n_linears(make_family(family))
    assert all(torch.equal(model.get_submodule(n).dequantize_weight(), w) for n, w in fakes.items())
    set_kernel(model, "reference")  # the exact kernel: the fake-quantized model's very logits
    assert torch.equal(_logits(model), trained)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in REFUSED])
def test_mixed_plan_and_save_load(family, tmp_path):
    """A sensitivity-solved plan between W8 and W4G32, applied, saved and loaded: bit-identical logits."""
    model = make_family(family)
    text = torch.randint(3, 256, (256,), generator=torch.Generator().manual_seed(6))
    plan = llmquant.plan_mixed_precision(model, target_bits=6.5, text=text, candidates=["W8", "W4G32"], windows=2,
                                         seq_len=16, cache=False, progress=False)
    llmquant.quantize(model, plan, progress=False)
    head = model.get_output_embeddings()
    schemes = {m.scheme for m in model.modules() if isinstance(m, QuantLinear) and m is not head}
    assert schemes == {PRESETS["W8"], PRESETS["W4G32"]}
    assert isinstance(head, QuantLinear) and head.scheme.bits == 8  # a plan leaving the head out: int8 (the default)
    before = _logits(model)
    llmquant.save(model, None, tmp_path / "q")
    loaded, _ = llmquant.load(tmp_path / "q")
    assert torch.equal(_logits(loaded), before)


def _hf_greedy(model, ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_matches_transformers_greedy(family):
    """After RTN (float for the refused families): llmquant.generate gives transformers' greedy tokens, by
    the lean runtime for the families it runs, by the model's own forward for the others."""
    model = make_family(family)
    if family not in REFUSED:
        llmquant.quantize(model, "W4G32", progress=False)
    if family in LEAN:
        LeanModel(model)
    else:
        with pytest.raises(UnsupportedModelError, match="lean runtime"):
            LeanModel(model)
    ids = IDS[:, :7]
    assert torch.equal(llmquant.generate(model, ids, 10, use_eos=False), _hf_greedy(model, ids, 10))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in REFUSED])
def test_exports(family, tmp_path):
    """compressed-tensors: transformers loads the folder and gives the same logits, for every family. GGUF:
    W4G32 has no GGML block type, so every family with GGUF facts refuses it naming what maps (llama.cpp
    runs their exports: test_gguf_families) or the config, and the others refuse naming the families GGUF
    export knows."""
    from transformers import AutoModelForCausalLM

    from llmquant.errors import ExportError
    from llmquant.models import arch_for

    model = make_family(family)
    llmquant.quantize(model, "W4G32", progress=False)
    set_kernel(model, "reference")
    if family == "gpt2":
        with pytest.raises(ExportError, match="Conv1D"):
            llmquant.export(model, None, tmp_path / "ct", format="compressed-tensors")
        assert not (tmp_path / "ct").exists()
        return
    if family in MOE:
        with pytest.raises(ExportError, match="one linear per expert"):
            llmquant.export(model, None, tmp_path / "ct", format="compressed-tensors")
        with pytest.raises(ExportError, match="GGUF export knows no tensor names"):
            llmquant.export(model, None, tmp_path / "m.gguf", format="gguf")
        assert not (tmp_path / "ct").exists() and not (tmp_path / "m.gguf").exists()
        return
    llmquant.export(model, None, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    if family != "falcon":  # transformers cannot run it: FalconLinear's forward reads .weight, which its packed modules lack
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
        assert torch.allclose(_logits(hf), _logits(model), atol=1e-5, rtol=0)
    known = arch_for(family).gguf is not None
    # configs llama.cpp would compute differently: Gemma's query_pre_attn_scalar (256) is not head_dim (16),
    # Mistral's sliding window (8) is shorter than the context; they are refused before the schemes are looked at
    match = {"gemma2": "query_pre_attn_scalar", "gemma3_text": "query_pre_attn_scalar",
             "mistral": "no sliding window"}.get(family)
    match = match or ("no exact GGUF block type" if known else "GGUF export knows no tensor names")
    with pytest.raises(ExportError, match=match):
        llmquant.export(model, None, tmp_path / "m.gguf", format="gguf")
    assert not (tmp_path / "m.gguf").exists()



def test_layers_of_two_structures_get_their_own_fold_pairs():
    """Qwen2-MoE with a dense first layer: the shared-expert pair applies to the MoE layer only (each
    structure is traced), and AWQ and SmoothQuant run where a single mapping for all layers was refused."""
    from llmquant.flows.folds import fold_plan

    model = make_family("qwen2_moe", mlp_only_layers=[0])
    plan = fold_plan(model, what="AWQ", hint="")
    assert [s for s, _ in plan.pairs_of(0)] == ["input_layernorm"]
    assert [s for s, _ in plan.pairs_of(1)] == ["input_layernorm", "mlp.shared_expert.up_proj"]
    for strategy in ("awq", "smoothquant"):
        model = make_family("qwen2_moe", mlp_only_layers=[0])
        ref = _logits(model)
        STRATEGIES[strategy][0](model)
        assert 0 < _kl(_logits(model), ref) < STRATEGIES[strategy][1]
