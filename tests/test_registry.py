"""The one entry point: every method is a registered handler behind ``quantize(model, config)``; configs
(and saved folders) round-trip and re-make the same model; layer-wise methods compose as a list; the
pipeline calls each decoder layer with its own arguments."""

import copy
import json

import pytest
import torch

import llmquant
from llmquant import CalibSpec, AWQParams, GPTQParams, QuantConfig
from llmquant.errors import SchemeError
from llmquant.flows import METHODS, Method, register_method
from llmquant.flows.passes import record_layer_inputs
from llmquant.flows.summary import QuantSummary

from conftest import calib_ids


pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 1000




@pytest.fixture(scope="module")
def calib():
    return calib_ids(6, 32)


def test_builtin_methods_registered():
    assert {"rtn", "gptq", "awq", "static", "smoothquant", "dynamic", "qat", "plan", "blockqat"} <= set(METHODS)
    assert {m for m in METHODS if METHODS[m].stage is not None} == {"rtn", "gptq", "awq", "blockqat", "hqq", "autoround"}
    with pytest.raises(SchemeError, match="unknown method 'nope'"):
        QuantConfig(method="nope")
    with pytest.raises(SchemeError, match="cannot be composed"):
        QuantConfig(method=["smoothquant", "gptq"])
    with pytest.raises(SchemeError, match="one entry"):
        QuantConfig(method=["awq", "gptq"], method_params=[AWQParams()])


def test_method_defaults_live_in_the_config():
    s = QuantConfig(method="static")
    assert s.weight == llmquant.PRESETS["W8"] and s.activation.granularity == "tensor" and s.observer == "mse"
    sq = QuantConfig(method="smoothquant")
    assert sq.observer == "minmax" and sq.smooth_alpha == 0.8
    d = QuantConfig(method="dynamic")
    assert d.activation.dynamic and d.activation.granularity == "token" and not d.weight.symmetric
    assert QuantConfig().weight == llmquant.PRESETS["W4G128"] and QuantConfig().observer == "minmax"
    # one rule for "--bits N" everywhere: 8 bits per channel, fewer in groups of 128
    assert llmquant.scheme_for(4) == llmquant.PRESETS["W4G128"] and llmquant.scheme_for(8) == llmquant.PRESETS["W8"]


def test_config_json_round_trip_and_legacy_flag():
    cfg = QuantConfig(weight="W3G32", method=["awq", "gptq"], method_params=[AWQParams(grid=5), GPTQParams(damp=0.05)])
    assert QuantConfig.from_json(cfg.to_json()) == cfg
    q = QuantConfig(method="qat", method_params=llmquant.QATParams(steps=3, lr=1e-4))
    assert QuantConfig.from_json(q.to_json()) == q
    # configs written before methods composed: GPTQParams(awq_scales=True) is the list ["awq", "gptq"]
    old = json.loads(QuantConfig(weight="W3G32", method="gptq").to_json())
    old["method_params"].update(awq_scales=True, awq_grid=5)
    new = QuantConfig.from_dict(old)
    assert new.method == ("awq", "gptq") and new.method_params[0].grid == 5 and new.method_params[1] == GPTQParams()


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CASES = {
    "rtn": QuantConfig(weight="W4G32", ignore=()),
    "gptq": QuantConfig(weight="W3G32", method="gptq", method_params=GPTQParams(act_order=True)),
    "awq+gptq": QuantConfig(weight="W4G32", method=["awq", "gptq"], method_params=[AWQParams(grid=4), None]),
    "static": QuantConfig(method="static"),
    "smoothquant": QuantConfig(method="smoothquant"),
    "dynamic": QuantConfig(method="dynamic", targets=("re:.*mlp.*",)),
    "plan": {"layers": {"model.layers.0.mlp.down_proj": "W8", "re:.*self_attn.*": "bf16", "re:.*": "W4G32"}},
}


@pytest.mark.parametrize("name", list(CASES))
def test_saved_recipe_remakes_the_model(tiny, calib, tmp_path, name):
    """quantize(model, saved_folder) re-makes the saved model bit for bit, whatever the method."""
    a = copy.deepcopy(tiny)
    s = llmquant.quantize(a, CASES[name], calib=calib, progress=False)
    assert isinstance(s, QuantSummary) and s.layers
    llmquant.save(a, None, tmp_path / "out")
    b = copy.deepcopy(tiny)
    llmquant.quantize(b, tmp_path / "out", calib=calib, progress=False)
    assert _same(_state(a), _state(b))
    loaded, _ = llmquant.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(calib[:2]).logits, b(calib[:2]).logits)
    assert not _same(_state(tiny), _state(b))  # it did quantize


def test_composition_differs_from_each_part(tiny, calib):
    outs = {}
    for name, method, params in (("gptq", "gptq", None), ("awq", "awq", AWQParams(grid=4, clip=False)),
                                 ("awq+gptq", ["awq", "gptq"], [AWQParams(grid=4), None])):
        m = copy.deepcopy(tiny)
        s = llmquant.quantize(m, QuantConfig(weight="W3G32", method=method, method_params=params), calib=calib,
                              progress=False)
        assert s.method == name.replace("awq+gptq", "awq+gptq") and len(s.layer_errors) == 2
        outs[name] = _state(m)
    assert not _same(outs["gptq"], outs["awq+gptq"]) and not _same(outs["awq"], outs["awq+gptq"])


def test_registered_method_runs_through_quantize(tiny):
    """A new method is one registration: quantize, configs and JSON take it at once."""
    seen = []

    def run(model, cfg, calib, progress):
        seen.append(cfg.method)
        return llmquant.flows.quantize(model, cfg.with_(method="rtn"), progress=progress)

    register_method(Method("toy-rtn", run))
    try:
        cfg = QuantConfig.from_json(QuantConfig(weight="W8", method="toy-rtn").to_json())
        s = llmquant.quantize(copy.deepcopy(tiny), cfg, progress=False)
        assert seen == ["toy-rtn"] and len(s.layers) == 15
    finally:
        METHODS.pop("toy-rtn")
        llmquant.schemes.METHOD_PARAMS.pop("toy-rtn")


def test_calibrated_method_without_data_is_an_error(tiny):
    with pytest.raises(SchemeError, match="needs calibration data"):
        llmquant.flows.quantize(copy.deepcopy(tiny), QuantConfig(method="gptq"))


def _tiny_hybrid():
    """A decoder whose layers alternate sliding-window and full attention (Gemma-2 style)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                       max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    return Gemma2ForCausalLM(cfg).eval()


def test_each_layer_gets_its_own_arguments():
    """The pipeline calls layer i with the mask the model gives layer i (sliding vs full attention)."""
    model = _tiny_hybrid()
    layers = model.model.layers
    assert list(model.config.layer_types) == ["sliding_attention", "full_attention"]
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    real = []
    hs = [l.register_forward_pre_hook(lambda m, a, k: real.append(k["attention_mask"]), with_kwargs=True) for l in layers]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hs:
        h.remove()
    _, kwargs = record_layer_inputs(model, layers, [ids], {"use_cache": False})
    assert not torch.equal(real[0], real[1])  # the two layers do get different masks
    for i in range(2):
        assert torch.equal(kwargs[i][0]["attention_mask"], real[i])
    # and the quantized model is still what layer-by-layer GPTQ computes with those masks
    s = llmquant.quantize(model, QuantConfig(weight="W4G32", method="gptq"), calib=ids, progress=False)
    assert len(s.layer_errors) == 2 and all(0 < e < 0.5 for e in s.layer_errors)


def test_pipeline_hooks_see_every_layer_in_order(tiny, calib):
    """Where streaming (LayerSource), distributed runs (reduce_stats) and resume (on_layer_done) attach."""
    from llmquant.flows.pipeline import Hooks, LayerSource, run_stages

    events = []

    class Source(LayerSource):
        def load(self, i, prefix, layer):
            events.append(("load", prefix))

        def release(self, i, prefix, layer):
            events.append(("release", prefix))

    def reduce(col):
        events.append(("reduce", ".".join(sorted(col.stats)[0].split(".")[:3])))

    def done(i, prefix, layer, summary):
        events.append(("done", prefix, len(summary.layers)))

    # gptq in one pass per layer reduces each distinct input's statistics when its linears are reached (q/k/v,
    # o, gate/up, down); in two passes, all of them after the float pass
    for method, data, spec, reduces in (("gptq", calib, None, 4), ("gptq", calib, CalibSpec(true_sequential=False), 1),
                                        ("rtn", None, None, 0)):
        events.clear()
        m = copy.deepcopy(tiny)
        run_stages(m, QuantConfig(weight="W4G32", method=method, calibration=spec), data, progress=False,
                   hooks=Hooks(source=Source(), reduce_stats=reduce if data is not None else None, on_layer_done=[done]))
        want = []
        for i in range(2):
            p = f"model.layers.{i}"
            want += [("load", p)] + [("reduce", p)] * reduces
            want += [("done", p, 7 * (i + 1)), ("release", p)]
        assert events == want, (method, spec)


def test_cli_composition_and_recipe(tmp_path, tiny_folder, capsys):
    """`--method awq,gptq` composes; `--recipe FOLDER` re-makes that folder bit for bit; flags of one
    method given to another are refused in one line."""
    from llmquant.cli import main

    text = tmp_path / "calib.txt"
    text.write_text("def f(x):\n    return x * 2  # doubles\n" * 60)
    a, b = tmp_path / "a", tmp_path / "b"
    rc = main(["quantize", "--model", str(tiny_folder), "--method", "awq,gptq", "--bits", "4", "--group-size", "32",
               "--calib", str(text), "--calib-samples", "3", "--seq-len", "64", "-o", str(a)])
    assert rc == 0
    man = json.loads((a / "llmquant.json").read_text())
    assert man["config"]["method"] == ["awq", "gptq"] and man["config"]["calibration"]["samples"] == 3
    assert man["config"]["method_params"][0]["grid"] == AWQParams().grid
    assert main(["quantize", "--model", str(tiny_folder), "--recipe", str(a), "-o", str(b)]) == 0
    ma, _ = llmquant.load(a)
    mb, _ = llmquant.load(b)
    assert _same(_state(ma), _state(mb))
    capsys.readouterr()
    for args, msg in [(["--method", "gptq", "--rotation", "64"], "--rotation apply to --method dynamic only"),
                      (["--method", "rtn", "--act-order"], "--act-order applies to --method gptq only"),
                      (["--recipe", str(a), "--bits", "3"], "--recipe gives the whole config"),
                      (["--method", "rtn,dynamic"], "cannot be composed"),
                      (["--recipe", str(tmp_path / "nope")], "neither a preset nor an existing folder"),
                      (["--recipe", str(tmp_path)], "holds no llmquant.json")]:
        rc = main(["quantize", "--model", str(tiny_folder), *args, "-o", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, err
        assert not (tmp_path / "bad").exists()


def test_qat_through_quantize_and_its_recipe(tmp_path, tiny_folder):
    """method="qat" trains (distillation), converts, records QATParams; the saved recipe trains the same model."""
    cfg = QuantConfig(weight="W4G32", method="qat", method_params=llmquant.QATParams(steps=2, seq_len=32, batch=2, lr=1e-3))
    a, tok = llmquant.load_model(tiny_folder)
    s = llmquant.quantize(a, cfg, progress=False)
    assert s.method == "qat" and s.calibration["qat"]["steps"] == 2 and len(s.calibration["qat"]["losses"]) == 2
    llmquant.save(a, tok, tmp_path / "a")
    man = json.loads((tmp_path / "a" / "llmquant.json").read_text())
    assert man["config"]["method"] == "qat" and man["config"]["method_params"]["steps"] == 2
    b, _ = llmquant.load_model(tiny_folder)
    llmquant.quantize(b, tmp_path / "a", progress=False)
    assert _same(_state(a), _state(b))
    # train_qat called directly records the knobs it was given, so its folder is a recipe too
    c, _ = llmquant.load_model(tiny_folder)
    llmquant.train_qat(c, config="W4G32", steps=1, seq_len=32, batch=2, progress=False)
    assert c.llmquant_config.method == "qat" and c.llmquant_config.method_params.steps == 1


def test_regex_norm_to_linears_mapping(tiny, calib):
    """A family's norm -> linears pairs may be written as llm-compressor writes them: re: patterns over the
    paths inside one decoder layer, giving the same result as the exact paths."""
    exact = AWQParams(grid=4, norm_to_linears=[["input_layernorm", ["self_attn.q_proj", "self_attn.k_proj",
                                                                     "self_attn.v_proj"]],
                                               ["post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]]])
    regex = AWQParams(grid=4, norm_to_linears=[["re:.*input_layernorm", ["re:.*(q|k|v)_proj"]],
                                               ["re:.*post_attention_layernorm", ["re:.*(gate|up)_proj"]]])
    out = []
    for p in (exact, regex):
        m = copy.deepcopy(tiny)
        llmquant.quantize(m, QuantConfig(weight="W4G32", method="awq", method_params=p), calib=calib, progress=False)
        out.append(_state(m))
    assert _same(*out)
    from llmquant.errors import MappingError

    bad = AWQParams(norm_to_linears=[["re:.*layernorm", ["re:.*proj"]]])
    with pytest.raises(MappingError, match="matches 2 modules"):
        llmquant.quantize(copy.deepcopy(tiny), QuantConfig(method="awq", method_params=bad), calib=calib, progress=False)
