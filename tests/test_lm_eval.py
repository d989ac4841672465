"""lm-evaluation-harness scores llmquant models: the adapter's accuracy on the shipped local task equals a
direct loop over the same items; rolling log-likelihood and generation match the model's own; the CLI scores
a quantized folder and its float original and records the figures in the folder's model card."""

import json

import pytest
import torch
import torch.nn.functional as F

import llmquant
from llmquant.cli import main
from llmquant.errors import EvaluationError
from llmquant.eval import harness
from llmquant.eval.tasks.llmquant_pydoc_cloze.pydoc_cloze import read_items

from conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
TASK = "llmquant_pydoc_cloze"


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_bpe_tokenizer):
    """A float tiny model (Hugging Face folder) and its W4G64 quantization (llmquant folder)."""
    d = tmp_path_factory.mktemp("lmeval")
    m = make_tiny_llama(vocab_size=400, hidden=64, layers=2)
    with torch.no_grad():  # a sharper next-token distribution, so the choices differ in likelihood
        m.lm_head.weight.mul_(3)
    m.save_pretrained(d / "float")
    tiny_bpe_tokenizer.save_pretrained(d / "float")
    q, tok = llmquant.load_model(d / "float")
    llmquant.quantize(q, "W4G64", progress=False)
    llmquant.save(q, tok, d / "w4g64")
    return d / "float", d / "w4g64"


def _direct_accuracy(model, tok) -> float:
    """The task scored by hand: each choice's summed log-probability after the context, the best one picked."""
    right = 0
    for item in read_items():
        ctx = tok.encode(item["context"], add_special_tokens=False)
        scores = []
        for choice in item["choices"]:
            whole = tok.encode(item["context"] + " " + choice, add_special_tokens=False)
            with torch.no_grad():
                logp = F.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
            cont = whole[len(ctx):]
            scores.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        right += int(max(range(len(scores)), key=scores.__getitem__) == item["answer"])
    return right / len(read_items())


def test_adapter_accuracy_equals_a_direct_loop(folders):
    import lm_eval

    _, quant = folders
    res = lm_eval.simple_evaluate(model="llmquant", model_args={"path": str(quant)}, tasks=[TASK],
                                  task_manager=harness.task_manager(), bootstrap_iters=0, log_samples=False)
    acc = res["results"][TASK]["acc,none"]
    model, tok = llmquant.load(quant)
    assert len(read_items()) == 100
    assert acc == pytest.approx(_direct_accuracy(model, tok), abs=1e-12)
    assert acc > 0.25  # better than chance: the items are not noise to the scorer


def test_rolling_and_generation_match_the_model(folders, tiny_bpe_tokenizer):
    from lm_eval.api.instance import Instance

    model, tok = llmquant.load(folders[1])
    lm = harness.LLMQuantLM(model=model, tokenizer=tok, max_length=64)
    text = "The import statement binds names in the local namespace."
    ids = [lm.prefix_token_id] + tok.encode(text, add_special_tokens=False)  # one window: every token predicted
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
    want = sum(logp[i, t].item() for i, t in enumerate(ids[1:]))
    req = Instance("loglikelihood_rolling", {}, (text,), 0)
    assert lm.loglikelihood_rolling([req], disable_tqdm=True)[0] == pytest.approx(want, rel=1e-5)
    ctx = "def f(x):"
    gen = Instance("generate_until", {}, (ctx, {"until": ["\n\n"], "max_gen_toks": 6}), 0)
    out = lm.generate_until([gen], disable_tqdm=True)[0]
    ctx_ids = torch.tensor([tok.encode(ctx, add_special_tokens=False)])
    full = tok.decode(model.generate(ctx_ids, max_new_tokens=6, do_sample=False)[0, ctx_ids.shape[1]:])
    assert out == full.split("\n\n")[0] and out


def test_cli_scores_quantized_and_float_and_records_them(folders, capsys):
    _, quant = folders
    rc = main(["eval", str(quant), "--tasks", TASK, "--limit", "20", "--windows", "1", "--seq-len", "32"])
    out = capsys.readouterr().out
    assert rc == 0 and f"{TASK} acc" in out and "float original" in out
    figures = json.loads((quant / "llmquant_eval.json").read_text())
    assert set(figures) == {"float original", "quantized"} and 0 <= figures["quantized"][f"{TASK} acc"] <= 1
    card = (quant / "README.md").read_text()
    assert "## Measured" in card and f"{TASK} acc" in card


@pytest.mark.parametrize("task, says", [("no_such_task_xyz", "not found"), ("hellaswag", "could not be loaded")])
def test_tasks_that_cannot_run_offline_are_one_line_errors(folders, capsys, task, says):
    _, quant = folders
    assert main(["eval", str(quant), "--no-reference", "--windows", "1", "--seq-len", "32", "--tasks", task]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "--include-path" in err
    with pytest.raises(EvaluationError):
        harness.run_tasks(*llmquant.load(quant), [task])
