"""train_qat on tiny random models: the distillation loss falls, resume is exact, divergence stops cleanly."""

import copy

import pytest
import torch
import torch.nn.functional as F

import llmquant
from llmquant.cli import main
from llmquant.errors import CheckpointError, TrainingDivergedError
from llmquant.flows import qat_checkpoint as ckpt
from llmquant.data import default_text, tokenize, windows
from llmquant.modules import QuantLinear
from llmquant.modules.fake_quant import FakeQuantLinear

from conftest import make_tiny_llama

KW = dict(seq_len=32, batch=2, progress=False, seed=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def _kl(student, teacher, ids):
    with torch.no_grad():
        t = F.log_softmax(teacher(ids).logits.float(), -1)
        s = F.log_softmax(student(ids).logits.float(), -1)
    return float(F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean"))


def _qat_tensors(m):
    return ckpt.qat_state(m)


def test_few_steps_reduce_distillation_loss(tokenizer):
    """Full-batch steps on four short windows: the distillation loss on them falls, and stays after convert."""
    text = default_text()[5000:6200]  # ~290 tokens: half reserved for evaluation, 4 training windows of 32
    wins = windows(tokenize(tokenizer, text), 4, 32, split="calib")
    teacher = make_tiny_llama()
    m = copy.deepcopy(teacher)
    llmquant.prepare_qat(m, "W3G32", progress=False)
    before = _kl(m, teacher, wins)
    res = llmquant.train_qat(m, text, tokenizer=tokenizer, teacher=teacher, steps=6, lr=3e-3, convert=False,
                             seq_len=32, batch=4, progress=False)
    after = _kl(m, teacher, wins)
    assert res.steps == 6 and res.tokens == 6 * 4 * 32 and res.trainable_params > 0
    assert res.losses[0] == pytest.approx(before, rel=1e-4)  # the loop's loss is this KL
    assert after < 0.6 * before, (before, after)
    llmquant.convert_qat(m, progress=False)
    assert _kl(m, teacher, wins) == pytest.approx(after, rel=0.05)


def test_resume_is_exact(tmp_path, tokenizer):
    """Stopped after one step (time budget 0) and resumed == run straight through; optimizer state kept."""
    a = make_tiny_llama()
    ra = llmquant.train_qat(a, config="W3G32", tokenizer=tokenizer, steps=3, lr=1e-3, convert=False, **KW)
    b = make_tiny_llama()
    rb = llmquant.train_qat(b, config="W3G32", tokenizer=tokenizer, steps=3, lr=1e-3, convert=False,
                            checkpoint_dir=tmp_path / "ck", checkpoint_every=10, max_seconds=0, **KW)
    assert rb.stopped_by_time and rb.steps == 1
    saved = ckpt.load_checkpoint(tmp_path / "ck")
    assert saved["step"] == 1 and saved["history"]["losses"] == rb.losses
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "ck" / f".{ckpt.CHECKPOINT}.tmp-{int(dead.stdout)}"  # a kill -9 during a checkpoint write
    stale.write_bytes(b"\0" * 1000)
    c = make_tiny_llama()
    rc = llmquant.train_qat(c, config="W3G32", tokenizer=tokenizer, steps=3, lr=1e-3, convert=False,
                            checkpoint_dir=tmp_path / "ck", resume=True, **KW)
    assert rc.start_step == 1 and rc.steps == 3 and rc.losses == ra.losses
    assert not stale.exists()
    sa, sc = _qat_tensors(a), _qat_tensors(c)
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    # a different scheme cannot resume from it; nor can a folder without a checkpoint
    with pytest.raises(CheckpointError, match="other settings"):
        llmquant.train_qat(make_tiny_llama(), config="W4G32", tokenizer=tokenizer, steps=3,
                           checkpoint_dir=tmp_path / "ck", resume=True, **KW)
    with pytest.raises(CheckpointError, match="no QAT checkpoint"):
        llmquant.train_qat(make_tiny_llama(), config="W3G32", tokenizer=tokenizer, steps=3,
                           checkpoint_dir=tmp_path / "none", resume=True, **KW)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tokenizer):
    m = make_tiny_llama()
    calls = {"n": 0}

    def poison(module, inputs, output):  # the student's 3rd forward (step 3) returns NaN logits
        calls["n"] += 1
        if calls["n"] == 3:
            output.logits = output.logits * float("nan")
        return output

    teacher = copy.deepcopy(m)
    llmquant.prepare_qat(m, "W4G32", progress=False)
    m.register_forward_hook(poison)
    with pytest.raises(TrainingDivergedError, match=r"nan at step 3.*last good checkpoint"):
        llmquant.train_qat(m, tokenizer=tokenizer, teacher=teacher, steps=5, lr=1e-3,
                           checkpoint_dir=tmp_path / "ck", checkpoint_every=2, **KW)
    assert ckpt.load_checkpoint(tmp_path / "ck")["step"] == 2
    assert all(torch.isfinite(t).all() for t in _qat_tensors(m).values())  # the bad step was not applied
    # an exploding loss stops too (any loss above 1e-6 x the first counts as exploding here)
    with pytest.raises(TrainingDivergedError, match="exploded"):
        llmquant.train_qat(make_tiny_llama(), config="W4G32", tokenizer=tokenizer, steps=3, explode_factor=1e-6, **KW)


def test_lora_qat_trains_adapters_only(tokenizer):
    m = make_tiny_llama()
    base = m.model.layers[0].mlp.down_proj.weight.detach().clone()
    res = llmquant.train_qat(m, config="W4G32", tokenizer=tokenizer, steps=2, lr=1e-3, lora_rank=4,
                             gradient_checkpointing=True, convert=False, **KW)
    fq = m.model.layers[0].mlp.down_proj
    assert isinstance(fq, FakeQuantLinear) and torch.equal(fq.weight, base)
    assert fq.lora_b.abs().sum() > 0  # adapters moved
    full = sum(x.weight.numel() for x in m.modules() if isinstance(x, FakeQuantLinear))
    assert res.trainable_params < 0.4 * full


def test_cli_qat(tmp_path, tiny_folder, capsys):
    out = tmp_path / "q"
    rc = main(["qat", "--model", str(tiny_folder), "--bits", "3", "--group-size", "32", "--steps", "2",
               "--seq-len", "32", "--batch", "1", "--lr", "1e-3", "-o", str(out)])
    assert rc == 0 and "saved to" in capsys.readouterr().out
    m, tok = llmquant.load(out)
    assert isinstance(m.model.layers[0].self_attn.q_proj, QuantLinear) and m.llmquant_config.method == "qat"
    assert ckpt.load_checkpoint(f"{out}.qat-ckpt")["step"] == 2
    rc = main(["qat", "--model", str(tiny_folder), "--bits", "3", "--group-size", "32", "--steps", "2",
               "--resume", "--checkpoint-dir", str(tmp_path / "nothing"), "-o", str(tmp_path / "q2")])
    assert rc == 2 and "no QAT checkpoint" in capsys.readouterr().err
    plan = tmp_path / "plan.json"  # a plan's formats trained: each layer keeps its own, resumable as any QAT run
    plan.write_text('{"layers": {"re:.*mlp.*": "W3G32", "re:.*layers.*": "W8"}}')
    rc = main(["qat", "--model", str(tiny_folder), "--plan", str(plan), "--steps", "2", "--seq-len", "32",
               "--batch", "1", "-o", str(tmp_path / "p")])
    assert rc == 0 and "plan (2 rules)" in capsys.readouterr().out
    m, _ = llmquant.load(tmp_path / "p")
    assert m.model.layers[1].mlp.down_proj.scheme.bits == 3 and m.model.layers[1].self_attn.o_proj.scheme.bits == 8
    assert m.llmquant_plan.method == "qat" and m.llmquant_plan.params.steps == 2
    assert ckpt.load_checkpoint(f"{tmp_path / 'p'}.qat-ckpt")["step"] == 2
    rc = main(["qat", "--model", str(tiny_folder), "--plan", str(plan), "--bits", "4", "-o", str(tmp_path / "p2")])
    assert rc == 2 and "--plan names each layer's format" in capsys.readouterr().err


def test_frozen_quant_linear_passes_input_gradients():
    """A packed QuantLinear inside a graph (the int8 head while QAT trains the layers before it): the input's
    gradient is the one through its dequantized weight, for the one-row and the many-row kernel paths."""
    from llmquant.algorithms import rtn_quantize
    from llmquant.schemes import resolve_scheme

    torch.manual_seed(0)
    for name in ("W8", "W4G32", "W3G32"):
        f = resolve_scheme(name)
        ql = QuantLinear.from_quantized(*rtn_quantize(torch.randn(64, 96), f), f)
        wd = ql.dequantize_weight(torch.float32)
        for rows in (1, 40):
            x = torch.randn(rows, 96, requires_grad=True)
            y = ql(x)
            (y * y).sum().backward()
            torch.testing.assert_close(x.grad, (2 * y.detach()) @ wd, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert not ql(torch.randn(3, 96)).requires_grad


def test_qat_plan_trains_each_layer_in_its_format(tmp_path, tokenizer):
    """A QAT plan: the plan's formats made by RTN (least-squares clipping), then trained end to end, each
    linear in its own format; the distillation loss falls well below the RTN plan's, bf16 layers and the
    int8 head stay as planned, and the folder reloads to the same logits with the plan (method qat) as its
    recipe. k-quant formats cannot be trained: a clear error."""
    from llmquant.schemes import Plan

    text = default_text()[5000:6200]
    (tmp_path / "t.txt").write_text(text)
    wins = windows(tokenize(tokenizer, text), 4, 32, split="calib")
    teacher = make_tiny_llama()
    teacher.llmquant_tokenizer = tokenizer
    layers = {"re:.*self_attn.k_proj": "bf16", "re:.*self_attn.q_proj": "W8", "re:.*layers.*": "W3G32",
              "lm_head": "W8", "model.embed_tokens": "W8"}
    rtn = copy.deepcopy(teacher)
    llmquant.quantize(rtn, Plan.from_layers(layers, params={"observer": "mse"}), progress=False)
    m = copy.deepcopy(teacher)
    params = dict(steps=6, lr=3e-3, seq_len=32, batch=4, text=str(tmp_path / "t.txt"))
    s = llmquant.quantize(m, Plan.from_layers(layers, method="qat", params=params), progress=False)
    assert len(s.calibration["qat"]["losses"]) == 6
    assert s.calibration["qat"]["losses"][0] == pytest.approx(_kl(rtn, teacher, wins), rel=1e-3)  # started from RTN
    assert _kl(m, teacher, wins) < 0.75 * _kl(rtn, teacher, wins)  # (the frozen int8 head and bf16 layers stay)
    assert m.get_submodule("model.layers.0.mlp.up_proj").scheme.bits == 3
    assert m.get_submodule("model.layers.1.self_attn.q_proj").scheme.bits == 8
    for n in ("model.layers.0.self_attn.k_proj", "lm_head"):  # frozen as planned
        assert torch.equal(m.get_submodule(n).state_dict()["weight" if "k_proj" in n else "qweight"],
                           rtn.get_submodule(n).state_dict()["weight" if "k_proj" in n else "qweight"])
    llmquant.save(m, tokenizer, tmp_path / "out")
    back, _ = llmquant.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(back(wins).logits, m(wins).logits)
    assert back.llmquant_plan.method == "qat" and back.llmquant_plan.params.steps == 6
    with pytest.raises(llmquant.errors.SchemeError, match="cannot be trained"):
        llmquant.quantize(copy.deepcopy(teacher), Plan.from_layers({"re:.*layers.*": "gguf:Q4_1"}, method="qat"),
                          progress=False)
