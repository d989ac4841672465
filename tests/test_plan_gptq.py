"""GPTQ plans: a mixed-precision plan (or llama.cpp's per-tensor mixture) whose formats are made by GPTQ in
one calibrated layer-by-layer pass, each linear onto its own format."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn

import llmquant
from llmquant.errors import SchemeError
from llmquant.modules import FloatLinear, QuantLinear
from llmquant.schemes import GPTQParams, Plan, QuantConfig

from conftest import calib_ids, make_tiny_llama
from test_cli import assert_one_line_error, run

pytestmark = pytest.mark.usefixtures("one_thread")


def _kq_model(seed=0):
    """One decoder layer 256 wide (k-quant super-blocks fit), weights large enough to quantize visibly."""
    return make_tiny_llama(vocab_size=512, hidden=256, intermediate=512, seed=seed, layers=1)


def _kl(ref, model, ids):
    with torch.no_grad():
        p, q = ref(ids).logits.log_softmax(-1), model(ids).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _layer_state(model):
    return {k: v for k, v in model.state_dict().items() if ".layers." in k}


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_one_format_plan_is_plain_method(tiny, method):
    """A GPTQ (AWQ) plan giving every decoder linear one format makes the same codes (and, for AWQ, the same
    folded norms) as GPTQ (AWQ) on that scheme."""
    calib = calib_ids(3, 32)
    a, b = copy.deepcopy(tiny), copy.deepcopy(tiny)
    llmquant.quantize(a, Plan.from_layers({"re:.*layers.*": "W4G32"}, method=method), calib=calib, progress=False)
    llmquant.quantize(b, QuantConfig(method=method, weight="W4G32"), calib=calib, progress=False)
    sa, sb = _layer_state(a), _layer_state(b)
    assert sa.keys() == sb.keys() and any(k.endswith("qweight") for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_llama_mixture_by_gptq_beats_rtn_exports_and_reloads(tmp_path, tiny_bpe_tokenizer):
    """llama.cpp's Q2_K mixture made by GPTQ: every linear in its planned type, lower KL than RTN's on the
    calibration windows (GPTQ's objective), the same GGUF tensor types (hence size) as RTN's, and a saved
    folder that reloads to the same logits with the plan and GPTQ's knobs in its recipe."""
    ref = _kq_model()
    calib = calib_ids(8, 64, vocab=512)
    made = {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(ref)
        plan = llmquant.llama_cpp_plan(m, "Q2_K", method=method)
        s = llmquant.quantize(m, plan, calib=calib, progress=False)
        want = {k: v for k, v in plan.to_dict()["layers"].items() if ".layers." in k}
        got = {r.name: r.scheme for r in s.layers}
        assert {k: got[k] for k in want} == want
        assert {"gguf:Q2_K", "gguf:Q3_K"} <= set(want.values())
        made[method] = m
    assert _kl(ref, made["gptq"], calib) < 0.9 * _kl(ref, made["rtn"], calib)
    reports = {k: llmquant.export(m, tiny_bpe_tokenizer, tmp_path / f"{k}.gguf", progress=False)
               for k, m in made.items()}
    assert reports["gptq"].type_counts() == reports["rtn"].type_counts()
    assert (tmp_path / "gptq.gguf").stat().st_size == (tmp_path / "rtn.gguf").stat().st_size
    llmquant.save(made["gptq"], tiny_bpe_tokenizer, tmp_path / "folder")
    recipe = json.loads((tmp_path / "folder" / "llmquant.json").read_text())["plan"]
    assert recipe["method"] == "gptq" and recipe["params"]["act_order"] == GPTQParams().act_order
    back, _ = llmquant.load(tmp_path / "folder")
    ids = calib[:2]
    with torch.no_grad():
        assert torch.equal(back(ids).logits, made["gptq"](ids).logits)


def test_gptq_plan_float_layers_and_params(tiny):
    """A bf16 layer in a GPTQ plan is rounded, not solved; the plan's own GPTQ knobs are used."""
    name = "model.layers.0.mlp.down_proj"
    plan = Plan.from_layers({name: "bf16", "re:.*layers.*": "W4G32"}, method="gptq",
                            params={"act_order": "off", "damp": 0.05})
    m = copy.deepcopy(tiny)
    s = llmquant.quantize(m, plan, calib=calib_ids(2, 32), progress=False)
    assert isinstance(m.get_submodule(name), FloatLinear)
    assert isinstance(m.get_submodule("model.layers.0.mlp.up_proj"), QuantLinear)
    assert s.layer_errors and all(e < 1 for e in s.layer_errors)
    assert plan.params == GPTQParams(act_order="off", damp=0.05)


def test_awq_plan_mixed_formats_saves_and_reloads(tmp_path, tiny, tokenizer):
    """An AWQ plan with int8, 3-bit and bf16 linears sharing inputs: one scale per input (searched with each
    linear on its own format; the bf16 one adds no error), each linear on its planned format, closer to the
    float model than the same plan by RTN on the calibration windows, every layer's SQNR finite, and a saved
    folder (folded norms included) that reloads to the same logits with AWQ's knobs in its recipe."""
    calib = calib_ids(4, 32)
    layers = {"re:.*self_attn.q_proj": "W8", "re:.*self_attn.k_proj": "bf16", "re:.*layers.*": "W3G32"}
    made = {}
    for method in ("rtn", "awq"):
        m = copy.deepcopy(tiny)
        s = llmquant.quantize(m, Plan.from_layers(layers, method=method, params={"grid": 10} if method == "awq" else None),
                              calib=calib, progress=False)
        assert all(math.isfinite(r.sqnr_db) for r in s.layers)
        made[method] = m
    m = made["awq"]
    assert isinstance(m.get_submodule("model.layers.0.self_attn.k_proj"), FloatLinear)
    assert m.get_submodule("model.layers.0.self_attn.q_proj").scheme.bits == 8
    assert m.get_submodule("model.layers.1.mlp.up_proj").scheme.bits == 3
    norms = [n for n, _ in tiny.named_parameters() if "layernorm" in n]
    assert any(not torch.equal(m.get_parameter(n), tiny.get_parameter(n)) for n in norms)  # scales folded
    assert _kl(tiny, m, calib) < 0.9 * _kl(tiny, made["rtn"], calib)
    llmquant.save(m, tokenizer, tmp_path / "folder")
    recipe = json.loads((tmp_path / "folder" / "llmquant.json").read_text())["plan"]
    assert recipe["method"] == "awq" and recipe["params"]["grid"] == 10
    back, _ = llmquant.load(tmp_path / "folder")
    with torch.no_grad():
        assert torch.equal(back(calib[:2]).logits, m(calib[:2]).logits)


def test_plan_method_round_trip_and_errors(tiny):
    p = Plan.from_layers({"re:.*": "W4G64"}, method="gptq", params={"damp": 0.05})
    d = p.to_dict()
    assert d["params"]["damp"] == 0.05 and Plan.from_dict(json.loads(json.dumps(d))) == p
    assert p.calibrated and not Plan.from_layers({"re:.*": "W4G64"}).calibrated
    assert "params" not in Plan.from_layers({"re:.*": "W4G64"}).to_dict()  # rtn plans read as before
    with pytest.raises(SchemeError, match="method is one of rtn, gptq, awq"):
        Plan.from_layers({"re:.*": "W4G64"}, method="hqq")
    assert Plan.from_layers({"re:.*": "W4G64"}, method="awq").calibrated
    with pytest.raises(SchemeError, match="unknown RTNParams fields"):
        Plan.from_layers({"re:.*": "W4G64"}, params={"damp": 0.1})
    with pytest.raises(SchemeError, match="damp"):
        Plan.from_layers({"re:.*": "W4G64"}, method="gptq", params={"damp": 2})
    from llmquant.flows.mixed import apply_plan

    with pytest.raises(SchemeError, match="needs calibration data"):
        apply_plan(copy.deepcopy(tiny), p)


def test_cli_gptq_plan_and_mixture(tmp_path, tiny_folder, capsys):
    fast = ("--calib", str(tmp_path / "c.txt"), "--calib-samples", "2", "--seq-len", "32")
    (tmp_path / "c.txt").write_text(" ".join(f"word{i % 97} and the number {i}." for i in range(800)))
    plan = tmp_path / "plan.json"
    Plan.from_layers({"re:.*layers.*": "W4G32"}).save(plan)
    rc, out, err = run(capsys, "quantize", "--model", str(tiny_folder), "--plan", str(plan), "--method", "gptq",
                       "--act-order", *fast, "-o", str(tmp_path / "a"))
    assert rc == 0, err
    man = json.loads((tmp_path / "a" / "llmquant.json").read_text())
    assert man["plan"]["method"] == "gptq" and man["plan"]["params"]["act_order"] == "full"
    rc, out, err = run(capsys, "quantize", "--model", str(tiny_folder), "--scheme", "gguf:Q4_K_M", "--method", "gptq",
                       *fast, "-o", str(tmp_path / "b"))
    assert rc == 0, err
    man = json.loads((tmp_path / "b" / "llmquant.json").read_text())
    assert man["plan"]["method"] == "gptq" and man["plan"]["info"]["llama_cpp_mixture"] == "Q4_K_M"
    rc, _, err = run(capsys, "quantize", "--model", str(tiny_folder), "--scheme", "gguf:Q4_K_M", "--method", "hqq",
                     "-o", str(tmp_path / "c"))
    assert_one_line_error(rc, err, "made by --method rtn or gptq or awq")
    assert not (tmp_path / "c").exists()


def test_rtn_with_an_imatrix_file_equals_rtn_on_calibration(tmp_path, tiny_bpe_tokenizer, capsys):
    """RTN's importance-weighted search reading llama.cpp's imatrix file gives the codes it gives with the same
    calibration statistics; an rtn plan (llama.cpp's mixture) takes the file too, as llama-quantize --imatrix."""
    from llmquant.io.imatrix import imatrix_from_calibration, write_imatrix
    from llmquant.schemes import RTNParams

    ref = _kq_model()
    calib = calib_ids(4, 64, vocab=512)
    path = str(write_imatrix(imatrix_from_calibration(ref, calib, progress=False), tmp_path / "im.gguf"))
    a, b = copy.deepcopy(ref), copy.deepcopy(ref)
    llmquant.quantize(a, QuantConfig(method="rtn", weight="gguf:Q4_0", method_params=RTNParams(observer="imse"),
                                     calibration=llmquant.CalibSpec(true_sequential=False)),  # float inputs per layer
                      calib=calib, progress=False)
    cfg = QuantConfig(method="rtn", weight="gguf:Q4_0", method_params=RTNParams(observer="imse", imatrix=path))
    llmquant.quantize(b, cfg, progress=False)
    sa, sb = _layer_state(a), _layer_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert cfg.to_dict()["method_params"]["imatrix"] == path
    assert "imatrix" not in QuantConfig(method="rtn").to_dict()["method_params"]  # recipes read as before
    import dataclasses

    plain = copy.deepcopy(ref)
    plan = llmquant.llama_cpp_plan(plain, "Q3_K_M")
    llmquant.quantize(plain, plan, progress=False)
    weighted = copy.deepcopy(ref)
    llmquant.quantize(weighted, dataclasses.replace(plan, params=RTNParams(observer="imse", imatrix=path)), progress=False)
    assert _kl(ref, weighted, calib) < _kl(ref, plain, calib)
    with pytest.raises(SchemeError, match="observer='imse' with imatrix"):
        RTNParams(imatrix=path)
    with pytest.raises(SchemeError, match="imatrix file"):
        Plan.from_layers({"re:.*": "W4G64"}, params=RTNParams(observer="imse"))
    from llmquant.flows import quantize as flows_quantize

    with pytest.raises(SchemeError, match="read by llmquant.quantize"):
        flows_quantize(copy.deepcopy(ref), cfg, progress=False)
    # an imatrix of another model: refused before any work
    other = make_tiny_llama(vocab_size=1000)
    with pytest.raises(llmquant.errors.CalibrationError, match="another model"):
        llmquant.quantize(other, cfg, progress=False)


def test_cli_imatrix(tmp_path, tiny_folder, capsys):
    (tmp_path / "c.txt").write_text(" ".join(f"word{i % 97} and the number {i}." for i in range(800)))
    im = tmp_path / "im.gguf"
    rc, _, err = run(capsys, "imatrix", "--model", str(tiny_folder), "--calib", str(tmp_path / "c.txt"),
                     "--calib-samples", "2", "--seq-len", "32", "-o", str(im))
    assert rc == 0, err
    rc, _, err = run(capsys, "quantize", "--model", str(tiny_folder), "--scheme", "W4G32", "--imatrix", str(im),
                     "-o", str(tmp_path / "a"))
    assert rc == 0, err
    man = json.loads((tmp_path / "a" / "llmquant.json").read_text())
    assert man["config"]["method_params"] == {"observer": "imse", "imatrix": str(im), "version": 1}
    rc, _, err = run(capsys, "quantize", "--model", str(tiny_folder), "--method", "gptq", "--imatrix", str(im),
                     "-o", str(tmp_path / "b"))
    assert_one_line_error(rc, err, "--imatrix applies to --method rtn")
    rc, _, err = run(capsys, "quantize", "--model", str(tiny_folder), "--imatrix", str(tmp_path / "none.gguf"),
                     "-o", str(tmp_path / "c"))
    assert_one_line_error(rc, err, "is not a file")
