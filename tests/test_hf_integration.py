"""transformers loads llmquant folders (from_pretrained, generate, pipeline, save_pretrained), older folders
still load, refused folders fail in one line, and every folder carries a model card."""

import json

import pytest
import torch
import yaml

import llmquant
from llmquant.cli import main
from llmquant.errors import ForeignFormatError, NewerFormatError
from llmquant.io.manifest_schema import manifest_digest
from llmquant.modules import QuantLinear

from conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.arange(40)[None] * 7 % 400


def _logits(m):
    with torch.no_grad():
        return m(IDS).logits


@pytest.fixture
def saved(tmp_path, tiny_bpe_tokenizer):
    m = make_tiny_llama(vocab_size=400)
    llmquant.quantize(m, "W4G64", progress=False)
    m.llmquant_source = "tiny-llama"
    llmquant.save(m, tiny_bpe_tokenizer, tmp_path / "w4g64")
    return tmp_path / "w4g64"


def test_from_pretrained_matches_llmquant_load(saved):
    from transformers import AutoModelForCausalLM

    ours, _ = llmquant.load(saved)
    theirs = AutoModelForCausalLM.from_pretrained(saved)
    q = theirs.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.qweight.dtype == torch.uint8 and q.scheme.bits == 4
    assert torch.equal(_logits(theirs), _logits(ours))
    assert theirs.lm_head.qweight is theirs.model.embed_tokens.qweight  # still tied (Q8_0, stored once)
    assert theirs.llmquant_config.weight.group_size == 64


def test_generate_and_pipeline_match(saved, tiny_bpe_tokenizer):
    from transformers import AutoModelForCausalLM, pipeline

    ours, _ = llmquant.load(saved)
    theirs = AutoModelForCausalLM.from_pretrained(saved)
    a = ours.generate(IDS[:, :6], max_new_tokens=12, do_sample=False)
    b = theirs.generate(IDS[:, :6], max_new_tokens=12, do_sample=False)
    assert a.shape == (1, 18) and torch.equal(a, b)
    pipe = pipeline("text-generation", model=theirs, tokenizer=tiny_bpe_tokenizer)
    text = pipe("def f(x):", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    ids = tiny_bpe_tokenizer("def f(x):", return_tensors="pt").input_ids
    want = tiny_bpe_tokenizer.decode(ours.generate(ids, max_new_tokens=8, do_sample=False)[0], skip_special_tokens=True)
    assert text == want and len(text) > len("def f(x):")


def test_save_pretrained_writes_an_llmquant_folder(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(saved)
    before = _logits(theirs)
    theirs.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "llmquant.json").is_file() and (tmp_path / "again" / "README.md").is_file()
    assert torch.equal(_logits(llmquant.load(tmp_path / "again")[0]), before)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again")), before)
    # a model quantized by llmquant.quantize saves the same way
    m = make_tiny_llama(vocab_size=400)
    llmquant.quantize(m, "W8", progress=False)
    m.save_pretrained(tmp_path / "w8")
    assert torch.equal(_logits(llmquant.load(tmp_path / "w8")[0]), _logits(m))


def test_a_dtype_asked_of_from_pretrained_keeps_the_saved_tensors(saved):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    assert torch.equal(_logits(theirs), _logits(llmquant.load(saved)[0]))


def _rewrite_manifest(folder, **changes):
    p = folder / "llmquant.json"
    m = json.loads(p.read_text())
    m.update(changes)
    m["manifest_sha256"] = manifest_digest(m)
    p.write_text(json.dumps(m))


def test_folders_of_format_version_1_still_load(saved):
    before = _logits(llmquant.load(saved)[0])
    _rewrite_manifest(saved, format_version=1)  # as llmquant wrote folders before transformers could load them
    cfg = json.loads((saved / "config.json").read_text())
    del cfg["quantization_config"]
    (saved / "config.json").write_text(json.dumps(cfg))
    (saved / "README.md").unlink()
    assert torch.equal(_logits(llmquant.load(saved)[0]), before)


def test_newer_format_and_foreign_quant_method_are_one_line_errors(saved, capsys):
    from transformers import AutoModelForCausalLM

    _rewrite_manifest(saved, format_version=99)
    with pytest.raises(NewerFormatError, match="upgrade llmquant"):
        llmquant.load(saved)
    assert main(["inspect", str(saved)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "newer llmquant" in err and "pip install -U llmquant" in err
    cfg = json.loads((saved / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NewerFormatError):
        AutoModelForCausalLM.from_pretrained(saved)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ForeignFormatError, match="'gptq'"):
        llmquant.load(saved)
    assert main(["eval", str(saved), "--no-reference"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another tool's quantization" in err


def test_model_card_is_yaml_and_markdown_naming_the_scheme(saved):
    text = (saved / "README.md").read_text()
    assert text.startswith("---\n")
    _, header, body = text.split("---\n", 2)
    meta = yaml.safe_load(header)
    assert meta["library_name"] == "llmquant" and meta["base_model"] == "tiny-llama"
    assert {"llmquant", "rtn", "int4-g64"} <= set(meta["tags"])
    assert "## What was quantized" in body and "int4-g64" in body
    assert "AutoModelForCausalLM.from_pretrained(\"w4g64\")" in body and "llama-cli" in body
    assert "## Measured" not in body
    from llmquant.io.model_card import record_figures

    record_figures(saved, "W4G64", {"perplexity": 12.5, "kl": 0.031})
    body = (saved / "README.md").read_text().split("---\n", 2)[2]
    assert "## Measured" in body and "| W4G64 | 12.5 | 0.031 |" in body and "| run | perplexity | kl |" in body
