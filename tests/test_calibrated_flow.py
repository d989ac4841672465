"""Layer-by-layer calibrated quantization (GPTQ, AWQ) on tiny models: output format, agreement between
layer-by-layer and whole-model calibration, save/load, manifest, and errors a user can cause."""

import copy
import json

import pytest
import torch
import torch.nn as nn

import llmquant
from llmquant import AWQParams, CalibSpec, GPTQParams, QuantConfig
from llmquant.errors import CalibrationError, TextError, UnsupportedArchitectureError
from llmquant.modules import QuantLinear

from conftest import calib_ids, make_tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


VOCAB = 1000


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(vocab_size=VOCAB, layers=3)


@pytest.fixture(scope="module")
def calib():
    return calib_ids(12, 48)


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def _kl(ref, m, ids):
    a, b = torch.log_softmax(_logits(ref, ids), -1), torch.log_softmax(_logits(m, ids), -1)
    return float((a.exp() * (a - b)).sum(-1).mean())


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_quantize_makes_rtn_format_quantlinears(tiny, calib, method):
    m = copy.deepcopy(tiny)
    cfg = QuantConfig(weight="W3G32", method=method, calibration=CalibSpec(batch_size=5))
    s = llmquant.quantize(m, cfg, calib=calib, progress=False)
    assert len(s.layers) == 3 * 7 + 1 and len(s.layer_errors) == 3  # + the tied embedding/head (Q8_0)
    assert all(0 < e < 1 for e in s.layer_errors)
    q = m.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.scheme == cfg.weight and q.scale.shape == (72, 5)  # 160 = 4 x 32 + 32
    assert isinstance(m.lm_head, QuantLinear) and m.lm_head.qweight is m.model.embed_tokens.qweight  # int8, tied
    # better than RTN on held-out tokens (KL to the float model)
    ev = torch.randint(0, VOCAB, (4, 48), generator=torch.Generator().manual_seed(2))
    r = copy.deepcopy(tiny)
    llmquant.quantize(r, "W3G32", progress=False)
    assert _kl(tiny, m, ev) < _kl(tiny, r, ev)


def test_layer_by_layer_and_whole_model_agree(tiny, calib):
    """Layer 0 sees the same (float) inputs either way, so its codes are identical when each layer is
    calibrated in two passes (float statistics for all its linears); later layers differ only by what
    quantized inputs change, far less than quantization itself changes the model."""
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    cfg = QuantConfig(weight="W4G32", method="gptq")
    llmquant.quantize(a, cfg.with_(calibration=CalibSpec(true_sequential=False)), calib=calib, progress=False)
    llmquant.quantize(b, cfg.with_(calibration=CalibSpec(sequential=False)), calib=calib, progress=False)
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        qa, qb = a.model.layers[0].get_submodule(name), b.model.layers[0].get_submodule(name)
        assert torch.equal(qa.codes(), qb.codes()) and torch.equal(qa.scale, qb.scale)
    ev = torch.randint(0, VOCAB, (4, 48), generator=torch.Generator().manual_seed(3))
    assert _kl(a, b, ev) < 0.25 * _kl(tiny, a, ev)


def test_one_pass_layers_calibrate_each_linear_after_the_ones_before_it(tiny, calib):
    """The default (true sequential): one pass per layer, each linear's statistics taken with the linears
    before it already quantized. The first linears of layer 0 (q/k/v, whose input no quantized linear
    changes) get the two-pass pipeline's codes exactly, solved together as there; the ones after them are
    calibrated on quantized inputs, so they differ; the model is as close to the float one either way."""
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    cfg = QuantConfig(weight="W4G32", method="gptq")
    sa = llmquant.quantize(a, cfg, calib=calib, progress=False)
    sb = llmquant.quantize(b, cfg.with_(calibration=CalibSpec(true_sequential=False)), calib=calib, progress=False)
    assert sa.true_sequential and not sb.true_sequential
    layer_a, layer_b = a.model.layers[0], b.model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        qa, qb = layer_a.get_submodule(name), layer_b.get_submodule(name)
        assert torch.equal(qa.codes(), qb.codes()) and torch.equal(qa.scale, qb.scale)
    for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert not torch.equal(layer_a.get_submodule(name).codes(), layer_b.get_submodule(name).codes())
    ev = torch.randint(0, VOCAB, (4, 48), generator=torch.Generator().manual_seed(3))
    ka, kb = _kl(tiny, a, ev), _kl(tiny, b, ev)
    assert ka < 1.25 * kb
    assert len(sa.layer_errors) == len(sb.layer_errors) == 3 and all(e > 0 for e in sa.layer_errors)


def test_act_order_and_ragged_groups_in_the_flow(tiny, calib):
    m = copy.deepcopy(tiny)
    cfg = QuantConfig(weight=llmquant.QuantScheme(bits=4, group_size=48), method="gptq",
                      method_params=GPTQParams(act_order=True, block_size=32))
    llmquant.quantize(m, cfg, calib=calib, progress=False)
    q = m.model.layers[1].self_attn.q_proj  # 72 = 48 + 24
    assert q.scale.shape == (72, 2) and q.codes().dtype == torch.int16


def test_save_load_gptq_bit_identical_and_manifest(tiny, calib, tmp_path, tokenizer):
    m = copy.deepcopy(tiny)
    cfg = QuantConfig(weight="W4G64", method="gptq", method_params=GPTQParams(damp=0.05, act_order=True),
                      calibration=CalibSpec(samples=12, seq_len=48))
    llmquant.quantize(m, cfg, calib=calib, progress=False)
    ids = torch.randint(0, VOCAB, (2, 40))
    before = _logits(m, ids)
    llmquant.save(m, tokenizer, tmp_path / "q")
    m2, _ = llmquant.load(tmp_path / "q")
    assert torch.equal(_logits(m2, ids), before)
    man = json.loads((tmp_path / "q" / "llmquant.json").read_text())
    assert man["config"]["method"] == "gptq" and man["config"]["method_params"]["damp"] == 0.05
    assert man["config"]["calibration"]["seq_len"] == 48
    assert m2.llmquant_config == cfg


def test_configs_round_trip_json():
    for cfg in (
        QuantConfig(method="gptq", method_params={"act_order": True}),
        QuantConfig(method="awq", method_params=AWQParams(grid=5, norm_to_linears=[["ln", ["a", "b"]]]),
                    calibration=CalibSpec(source="x.txt", samples=3)),
        QuantConfig(),
    ):
        assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert QuantConfig(method="gptq").method_params == GPTQParams()


def test_plain_module_whole_model_gptq():
    """Any nn.Module: one float pass gathers every linear's statistics (no decoder layers needed)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
    mix = torch.randn(64, 64) / 8
    x = torch.randn(512, 64) @ mix
    ref, rtn = copy.deepcopy(mlp), copy.deepcopy(mlp)
    s = llmquant.quantize(mlp, QuantConfig(weight="W3G32", method="gptq", ignore=()), calib=x, progress=False)
    assert len(s.layers) == 2 and all(isinstance(m, QuantLinear) for m in (mlp[0], mlp[2]))
    llmquant.quantize(rtn, QuantConfig(weight="W3G32", ignore=()), progress=False)
    with torch.no_grad():
        xe = torch.randn(256, 64) @ mix
        y = ref(xe)
        assert (mlp(xe) - y).pow(2).mean() < 0.7 * (rtn(xe) - y).pow(2).mean()


def test_awq_needs_a_mapping_for_unknown_models():
    mlp = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32))
    x = torch.randn(64, 32)
    with pytest.raises(UnsupportedArchitectureError, match="Sequential.*norm_to_linears"):
        llmquant.quantize(copy.deepcopy(mlp), QuantConfig(weight="W4G32", method="awq"), calib=x, progress=False)
    ref = copy.deepcopy(mlp)
    cfg = QuantConfig(weight="W4G32", method="awq", method_params=AWQParams(norm_to_linears=[["0", ["1"]]]))
    llmquant.quantize(mlp, cfg, calib=x, progress=False)
    assert isinstance(mlp[1], QuantLinear) and not torch.equal(mlp[0].weight, ref[0].weight)  # scale folded


def test_nan_activations_raise(calib):
    m = make_tiny_llama(vocab_size=VOCAB)
    with torch.no_grad():
        m.model.layers[1].post_attention_layernorm.weight[3] = float("inf")
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        llmquant.quantize(m, QuantConfig(weight="W4G32", method="gptq"), calib=calib, progress=False)


def test_calibration_text_errors(tmp_path, tokenizer):
    from llmquant.data import calibration_windows

    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(TextError, match="empty"):
        calibration_windows(tokenizer, empty, 4, 32)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(TextError, match="fewer than one window"):
        calibration_windows(tokenizer, short, 1, 32)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)  # ~400 tokens
    assert calibration_windows(tokenizer, text, 3, 64).shape == (3, 64)
    with pytest.raises(TextError, match="windows of 64 tokens.*50 asked"):
        calibration_windows(tokenizer, text, 50, 64)
    with pytest.raises(CalibrationError, match="longer than the model's context"):
        calibration_windows(tokenizer, text, 1, 4096, context=2048)
    # the default text: windows from its end, disjoint from the 40 evaluation windows at its start
    w = calibration_windows(tokenizer, None, 2, 128)
    ids = llmquant.data.tokenize(tokenizer, llmquant.data.default_text())
    assert torch.equal(w[0], ids[-128:])


def test_cli_gptq_and_bad_calibration(tmp_path, tiny_folder, capsys):
    from llmquant.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x * 2  # doubles\n" * 60)
    out = tmp_path / "q"
    rc = main(["quantize", "--model", str(tiny_folder), "--method", "gptq", "--scheme", "W4G32", "--calib", str(text),
               "--calib-samples", "3", "--seq-len", "64", "-o", str(out)])
    assert rc == 0 and (out / "llmquant.json").is_file()
    man = json.loads((out / "llmquant.json").read_text())
    assert man["config"]["method"] == "gptq" and man["config"]["calibration"]["samples"] == 3
    assert man["config"]["calibration"]["sequential"] is True
    one = tmp_path / "q1"  # --one-pass: one float pass over the whole model (CalibSpec(sequential=False))
    assert main(["quantize", "--model", str(tiny_folder), "--method", "gptq", "--scheme", "W4G32", "--calib", str(text),
                 "--calib-samples", "3", "--seq-len", "64", "--one-pass", "-o", str(one)]) == 0
    assert json.loads((one / "llmquant.json").read_text())["config"]["calibration"]["sequential"] is False
    capsys.readouterr()
    for args, msg in [(["--calib-samples", "500", "--seq-len", "64"], "asked"), (["--seq-len", "100000"], "context")]:
        bad = tmp_path / "bad"
        rc = main(["quantize", "--model", str(tiny_folder), "--method", "awq", "--calib", str(text), *args, "-o", str(bad)])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err
        assert not bad.exists()


def test_gptq_after_awq_scales(tiny, calib):
    """method=["awq", "gptq"]: AWQ's scales folded in, then GPTQ on the scaled weights and Hessian."""
    m = copy.deepcopy(tiny)
    cfg = QuantConfig(weight="W3G32", method=["awq", "gptq"], method_params=[AWQParams(grid=5), None])
    s = llmquant.quantize(m, cfg, calib=calib, progress=False)
    assert len(s.layers) == 22 and not torch.equal(m.model.layers[0].input_layernorm.weight, tiny.model.layers[0].input_layernorm.weight)
    ev = torch.randint(0, VOCAB, (4, 48), generator=torch.Generator().manual_seed(2))
    r = copy.deepcopy(tiny)
    llmquant.quantize(r, "W3G32", progress=False)
    assert _kl(tiny, m, ev) < _kl(tiny, r, ev)


def test_mean_sqnr_leaves_out_layers_stored_exactly():
    """A layer whose weight is already on its grid (SQNR inf, as the default model's int8-exact embedding)
    does not make the summary's mean SQNR infinite."""
    from llmquant.flows.summary import LayerSummary, QuantSummary

    def row(name, db):
        return LayerSummary(name=name, shape=(4, 4), scheme="W4", bits_per_weight=4.0, packed_bytes=8,
                            float_bytes=64, sqnr_db=db, kernel="reference")

    s = QuantSummary(method="rtn", config={})
    s.layers = [row("a", 20.0), row("b", 30.0), row("lm_head", float("inf"))]
    assert s.mean_sqnr_db == 25.0
    s.layers = [row("lm_head", float("inf"))]
    assert s.mean_sqnr_db == float("inf")
