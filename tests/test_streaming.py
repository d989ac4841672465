"""Streaming: a model whose decoder layers are read from its safetensors shards when the pipeline reaches
them quantizes to exactly what the model loaded whole quantizes to; damaged checkpoints give one clear error."""

import json

import pytest
import torch

import llmquant
from llmquant import AWQParams, QuantConfig
from llmquant.errors import CalibrationError, CorruptFileError, LLMQuantError, SchemeError, UnsupportedError

from conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 1000


def _save(path, dtype, tie=True):
    m = make_tiny_llama(vocab_size=VOCAB, layers=3, tie=tie)
    m.to(dtype).save_pretrained(str(path), max_shard_size="60KB")
    return path


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def shards(request, tmp_path_factory):
    path = _save(tmp_path_factory.mktemp("ckpt") / "m", request.param)
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 3
    return path


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(1))


CASES = {
    "rtn": QuantConfig(weight="W4G32"),
    "gptq": QuantConfig(weight="W3G32", method="gptq"),
    "awq+gptq": QuantConfig(weight="W4G32", method=["awq", "gptq"], method_params=[AWQParams(grid=4), None]),
    "static": QuantConfig(method="static"),
    "smoothquant": QuantConfig(method="smoothquant"),
    "dynamic": QuantConfig(method="dynamic"),
    "plan": {"layers": {"model.layers.1.mlp.down_proj": "W8", "re:.*self_attn.*": "bf16", "re:.*mlp.*": "W4G32"}},
}


@pytest.mark.parametrize("name", list(CASES))
def test_streamed_equals_whole(shards, calib, name, tmp_path):
    whole, _ = llmquant.load_model(shards)
    streamed, _ = llmquant.load_model(shards, stream=True)
    assert any(p.is_meta for p in streamed.model.layers.parameters())  # the layers are not read yet
    assert not any(p.is_meta for p in streamed.model.embed_tokens.parameters())
    llmquant.quantize(whole, CASES[name], calib=calib, progress=False)
    s = llmquant.quantize(streamed, CASES[name], calib=calib, progress=False)
    assert s.peak_memory_mb > 0 and "peak memory" in str(s)
    a, b = whole.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.is_meta for p in streamed.parameters()) and not hasattr(streamed, "llmquant_layer_source")
    llmquant.save(streamed, None, tmp_path / "out")
    loaded, _ = llmquant.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(calib[:2]).logits, whole(calib[:2]).logits)


def test_streamed_model_refuses_what_needs_it_whole(shards, calib):
    m, _ = llmquant.load_model(shards, stream=True)
    with pytest.raises(SchemeError, match="needs the whole model in memory"):
        llmquant.quantize(m, QuantConfig(method="qat"))
    with pytest.raises(UnsupportedError, match="quantize it first"):
        llmquant.evaluate(m, windows=1, progress=False)
    with pytest.raises(CalibrationError, match="layer by layer only"):  # a static head needs a whole-model pass
        llmquant.quantize(m, QuantConfig(method="static", ignore=()), calib=calib, progress=False)


def test_damaged_checkpoints_name_the_file(tmp_path):
    ckpt = _save(tmp_path / "m", torch.float32)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (ckpt / shard).rename(tmp_path / "aside")
    with pytest.raises(CorruptFileError, match="shards that are not there.*" + shard.replace(".", r"\.")):
        llmquant.load_model(ckpt, stream=True)
    (tmp_path / "aside").write_bytes((tmp_path / "aside").read_bytes()[:100])  # truncated
    (tmp_path / "aside").rename(ckpt / shard)
    with pytest.raises(CorruptFileError, match=shard.replace(".", r"\.")):
        llmquant.load_model(ckpt, stream=True)
    with pytest.raises(LLMQuantError, match="safetensors"):
        llmquant.load_model(tmp_path, stream=True)


def test_cli_stream(shards, tmp_path):
    from llmquant.cli import main

    assert main(["quantize", "--model", str(shards), "--stream", "--scheme", "W4G32", "-o", str(tmp_path / "s")]) == 0
    assert main(["quantize", "--model", str(shards), "--scheme", "W4G32", "-o", str(tmp_path / "w")]) == 0
    a = json.loads((tmp_path / "s" / "llmquant.json").read_text())["tensors"]
    b = json.loads((tmp_path / "w" / "llmquant.json").read_text())["tensors"]
    assert {k: v["sha256"] for k, v in a.items()} == {k: v["sha256"] for k, v in b.items()}


def test_streamed_float_reference_gives_the_same_evaluation(tmp_path, tokenizer, capsys):
    """A float reference loaded with stream=True is run layer by layer (one layer in memory at a time)
    and gives exactly the KL / top-1 of the reference loaded whole."""
    ckpt = tmp_path / "m"
    make_tiny_llama(layers=3).to(torch.bfloat16).save_pretrained(str(ckpt), max_shard_size="2MB")
    tokenizer.save_pretrained(str(ckpt))
    whole, tok = llmquant.load_model(ckpt)
    q, _ = llmquant.load_model(ckpt)
    llmquant.quantize(q, "W4G32", progress=False)
    a = llmquant.evaluate(q, reference=whole, windows=2, seq_len=64, progress=False)
    streamed, _ = llmquant.load_model(ckpt, stream=True)
    b = llmquant.evaluate(q, reference=streamed, windows=2, seq_len=64, progress=False)
    assert a.kl > 0 and (a.perplexity, a.kl, a.top1) == (b.perplexity, b.kl, b.top1)
    assert any(p.is_meta for p in streamed.model.layers.parameters())  # its layers went back to the checkpoint

    from llmquant.cli import main

    llmquant.save(q, tok, tmp_path / "q")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "q"), "--reference", str(ckpt), "--stream-reference", "--windows", "2",
                 "--seq-len", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kl"] == b.kl
