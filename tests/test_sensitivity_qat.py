"""QAT-made sensitivity candidates (``sensitivity(..., quantizer="qat")``): one QAT run per integer format on
the text before the measurement windows, each layer's trained weight measured alone; the plan made from them
is a QAT plan with the same knobs; trained weights cached per format."""

import copy
import json

import pytest
import torch

import llmquant
from llmquant.data import windows as cut_windows
from llmquant.errors import SchemeError
from llmquant.flows import qat_train
from llmquant.flows.mixed import apply_plan, plan_from_sensitivity, qat_candidates as qc, sensitivity
from llmquant.flows.mixed.sensitivity import plan_units
from llmquant.modules import QuantLinear
from llmquant.schemes import Plan, QATParams

from conftest import make_tiny_llama
from test_cli import assert_one_line_error, run

pytestmark = pytest.mark.usefixtures("one_thread")

# small steps at a small learning rate: the tiny random model's distillation loss is stable under them
KNOBS = dict(steps=4, lr=1e-4, seq_len=64, batch=4)
KW = dict(windows=4, seq_len=64, progress=False)


def _ids(n=6000, vocab=1000, seed=1):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(vocab_size=1000, layers=2)


def test_training_windows_are_disjoint_from_the_measured_ones(monkeypatch):
    """Token i of the text is the id i, so a window's ids say where it lies: every window QAT trained on
    lies before the sensitivity's measurement windows (the text's last windows x seq_len tokens)."""
    n = 3000
    m = make_tiny_llama(vocab_size=n, layers=1)
    ids = torch.arange(n)
    seen = []
    real = qat_train._windows

    def spy(*a, **k):
        w = real(*a, **k)
        seen.append(w.clone())
        return w

    monkeypatch.setattr(qat_train, "_windows", spy)
    s = sensitivity(m, ids, ["W4G32", "W3G32"], method="kfac", quantizer="qat", params=dict(KNOBS, steps=2, seq_len=32),
                    windows=4, seq_len=64, cache=False, progress=False)
    measured = cut_windows(ids, 4, 64, split="calib")
    end = n - measured.numel()
    assert int(measured.min()) == end and s.extra["qat"]["train_tokens"] == [0, end]
    assert s.extra["qat"]["measured_tokens"] == [end, n]
    assert len(seen) == 2  # one QAT run per integer format
    for w in seen:
        assert w.numel() > 0 and int(w.max()) < end  # never a measured token
        assert int(w.min()) >= 40 * 32  # nor the evaluation range at the start of the text


def test_candidates_are_the_trained_weights_and_damage_less_than_rtn(model):
    """Each layer's candidate is the weight a uniform QAT plan trains for it on the same tokens (bit for bit);
    float candidates are rounded as RTN's are; at 3 and 2 bits the QAT candidates' exact KL, layer by layer,
    sums well below RTN's (on this random model most of that is QAT's start, least-squares clipping: a few
    steps of training move each layer's weight for the others' errors, which the layer-alone measure does
    not reward)."""
    ids = _ids()
    cands = ["bf16", "W4G32", "W3G32", "W2G32"]
    rtn = sensitivity(model, ids, cands, method="kl", cache=False, **KW)
    qat = sensitivity(model, ids, cands, method="kl", quantizer="qat", params=KNOBS, cache=False, **KW)
    assert qat.damage != rtn.damage
    assert [r[0] for r in qat.damage] == [r[0] for r in rtn.damage]  # bf16: rounded, not trained
    for j in (2, 3):
        assert sum(r[j] for r in qat.damage) < 0.9 * sum(r[j] for r in rtn.damage), cands[j]
    assert all(f["steps"] == 4 and not f["cached"] for f in qat.extra["qat"]["formats"].values())
    # the same candidates as applying a uniform W3G32 QAT plan on the tokens before the windows
    end = qat.extra["qat"]["train_tokens"][1]
    units = plan_units(model)
    made = qc.qat_candidates(model, units, [llmquant.schemes.resolve_format("W3G32")], ids[:end], QATParams(**KNOBS),
                             fingerprint="x", text_key="y", folder=None, progress=False)
    direct = copy.deepcopy(model)
    apply_plan(direct, Plan.from_layers({u.name: "W3G32" for u in units}, method="qat", params=KNOBS),
               progress=False, train={"text": ids[:end]})
    fmt = llmquant.schemes.resolve_format("W3G32")
    for u in units:
        mod = direct.get_submodule(u.name)
        assert isinstance(mod, QuantLinear)
        w0 = model.get_submodule(u.name).weight
        assert torch.equal(made(fmt, w0, None, unit=u), mod.dequantize_weight(torch.float32)), u.name


def test_plan_from_qat_candidates_is_a_qat_plan_and_applies(model):
    ids = _ids()
    s = sensitivity(model, ids, ["W8", "W4G32", "W3G32"], method="kfac", quantizer="qat", params=KNOBS, samples=2,
                    cache=False, **KW)
    plan = plan_from_sensitivity(s, target_bits=4.5)
    assert plan.method == "qat" and plan.params == QATParams(**KNOBS)
    assert plan.info["sensitivity"]["quantizer"] == "qat" and plan.info["bits_per_weight"] <= 4.5
    assert len({str(f) for _, f in plan.rules}) > 1  # a mixed plan
    back = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back.method == "qat" and back.params == plan.params
    assert plan_from_sensitivity(s, target_bits=4.5, method="rtn").method == "rtn"
    m = copy.deepcopy(model)
    summary = apply_plan(m, plan, progress=False, train={"text": ids})
    assert len(summary.calibration["qat"]["losses"]) == KNOBS["steps"]
    for name, fmt in plan.rules:
        assert m.get_submodule(name).scheme == fmt, name


def test_trained_weights_are_cached_per_format(model, tmp_path, monkeypatch):
    """The second identical call comes from the sensitivity cache; another measure, or a subset of the
    formats, reads each format's trained weights from disk: no QAT run either way."""
    ids = _ids()
    runs = []
    real = qc._train
    monkeypatch.setattr(qc, "_train", lambda *a, **k: runs.append(a[2]) or real(*a, **k))
    cands = ["bf16", "W4G32", "W3G32"]
    first = sensitivity(model, ids, cands, method="kfac", quantizer="qat", params=KNOBS, cache=tmp_path, **KW)
    assert len(runs) == 2 and len(list((tmp_path / "qat").glob("*.pt"))) == 2
    again = sensitivity(model, ids, cands, method="kfac", quantizer="qat", params=KNOBS, cache=tmp_path, **KW)
    assert again.key == first.key and again.damage == first.damage
    kl = sensitivity(model, ids, cands, method="kl", quantizer="qat", params=KNOBS, cache=tmp_path, **KW)
    sub = sensitivity(model, ids, ["W3G32"], method="kfac", quantizer="qat", params=KNOBS, cache=tmp_path, **KW)
    assert len(runs) == 2
    assert all(f["cached"] for f in kl.extra["qat"]["formats"].values())
    assert [r[0] for r in sub.damage] == pytest.approx([r[2] for r in first.damage], rel=1e-9)
    other = sensitivity(model, ids, ["W3G32"], method="kfac", quantizer="qat", params=dict(KNOBS, steps=3),
                        cache=tmp_path, **KW)  # other knobs: trained again
    assert len(runs) == 3 and other.damage != sub.damage


def test_bad_inputs(model):
    ids = _ids()
    with pytest.raises(SchemeError, match="needs method='kfac'"):
        sensitivity(model, ids, ["W4G32"], method="fisher", quantizer="qat", cache=False, **KW)
    for bad in ("gguf:Q4_K", "gguf:Q4_1"):
        with pytest.raises(SchemeError, match="cannot be trained"):
            sensitivity(model, ids, ["W8", bad], method="kfac", quantizer="qat", cache=False, **KW)
    with pytest.raises(SchemeError, match="unknown QATParams fields"):
        sensitivity(model, ids, ["W4G32"], method="kfac", quantizer="qat", params={"damp": 0.1}, cache=False, **KW)
    with pytest.raises(SchemeError, match="goes with quantizer='gptq', 'awq' or 'qat'"):
        sensitivity(model, ids, ["W4G32"], method="kfac", params={"steps": 3}, cache=False, **KW)
    with pytest.raises(SchemeError, match="before the sensitivity's windows"):  # nothing left to train on
        sensitivity(model, ids[:600], ["W4G32"], method="kfac", quantizer="qat", params=dict(KNOBS, seq_len=512),
                    cache=False, **KW)


def test_cli_plan_from_qat_candidates_then_qat(tmp_path, tiny_folder, capsys, monkeypatch):
    """`llmquant plan --quantizer qat --quantizer-params JSON` writes a QAT plan with those knobs;
    `llmquant qat --plan` trains it with them (flags given there override them)."""
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and the number {i}." for i in range(1500)))
    knobs = json.dumps({"steps": 2, "seq_len": 32, "batch": 2, "lr": 1e-4})
    common = ("--model", str(tiny_folder), "--text", str(text), "--windows", "2", "--seq-len", "32", "--samples", "1",
              "--candidates", "W8,W4G32,W3G32", "--method", "kfac")
    plan = tmp_path / "plan.json"
    rc, o, _ = run(capsys, "plan", *common, "--quantizer", "qat", "--quantizer-params", knobs, "--target-bits", "4.5",
                   "-o", str(plan))
    assert rc == 0, o
    d = json.loads(plan.read_text())
    assert d["method"] == "qat" and d["params"]["steps"] == 2 and d["params"]["seq_len"] == 32
    rc, o, _ = run(capsys, "qat", "--model", str(tiny_folder), "--plan", str(plan), "--text", str(text), "--batch", "2",
                   "-o", str(tmp_path / "out"))
    assert rc == 0, o
    man = json.loads((tmp_path / "out" / "llmquant.json").read_text())
    assert man["plan"]["method"] == "qat" and man["plan"]["params"]["steps"] == 2
    assert man["plan"]["params"]["seq_len"] == 32 and man["plan"]["params"]["text"] == str(text)
    for bad, msg in (("{steps: 2}", "not valid JSON"), ('{"damp": 0.1}', "unknown QATParams fields")):
        rc, _, err = run(capsys, "plan", *common, "--quantizer", "qat", "--quantizer-params", bad,
                         "--target-bits", "4.5", "-o", str(tmp_path / "p2.json"))
        assert_one_line_error(rc, err, msg)
    rc, _, err = run(capsys, "plan", *common, "--candidates", "W8,gguf:Q4_K", "--quantizer", "qat",
                     "--target-bits", "4.5", "-o", str(tmp_path / "p3.json"))
    assert_one_line_error(rc, err, "cannot be trained")
