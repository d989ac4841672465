import json

import pytest
import torch

import llmquant
from llmquant.errors import CorruptFileError, ModelNotFoundError, OutputExistsError
from llmquant.modules import QuantLinear

from conftest import make_tiny_llama


def _logits(m, n=40):
    with torch.no_grad():
        return m(torch.arange(n)[None] * 7 % 1000).logits


@pytest.mark.parametrize("preset", ["W8", "W4G32A", "W3G32", "W2G32", "gguf:Q4_1", "gguf:Q4_0"])
def test_save_load_bit_identical(tmp_path, preset, tokenizer):
    m = make_tiny_llama()
    llmquant.quantize(m, preset, progress=False)
    before = _logits(m)
    llmquant.save(m, tokenizer, tmp_path / "q")
    m2, tok2 = llmquant.load(tmp_path / "q")
    assert torch.equal(_logits(m2), before)
    assert tok2 is not None and len(tok2) == len(tokenizer)
    # same modules, same packed bytes
    for (n1, a), (n2, b) in zip(m.named_modules(), m2.named_modules()):
        assert n1 == n2 and type(a) is type(b)
        if isinstance(a, QuantLinear):
            assert torch.equal(a.qweight, b.qweight) and a.scheme == b.scheme
    # the tied embedding and head became int8 (per row: width 72 is not a multiple of Q8_0's 32-value blocks)
    # and stayed tied: one set of tensors, saved once
    assert m2.lm_head.qweight is m2.model.embed_tokens.qweight and m2.lm_head.scheme.name == "int8-ch"
    tensors = json.loads((tmp_path / "q" / "llmquant.json").read_text())["tensors"]
    assert any(k.startswith("lm_head") for k in tensors) != any(k.startswith("model.embed_tokens") for k in tensors)
    assert not list(tmp_path.glob(".q.tmp-*"))


def test_head_fp32_keeps_the_tied_float_pair(tmp_path):
    m = make_tiny_llama()
    s = llmquant.quantize(m, llmquant.QuantConfig(weight="W4G32", head="fp32"), progress=False)
    assert not s.head and len(s.layers) == 2 * 7
    llmquant.save(m, None, tmp_path / "q")
    m2, _ = llmquant.load(tmp_path / "q")
    assert m2.lm_head.weight is m2.model.embed_tokens.weight
    assert not any(k.startswith("lm_head") for k in json.loads((tmp_path / "q" / "llmquant.json").read_text())["tensors"])


def test_head_formats_save_load_and_cost(tmp_path):
    """Any scheme or float format for the tied pair: tied, saved once, bit-identical after load; fewer bits,
    further from the logits with the float pair."""
    def w8(head):
        m = make_tiny_llama(hidden=256, vocab_size=1000)
        return m, llmquant.quantize(m, llmquant.QuantConfig(weight="W8", head=head), progress=False)

    ref = _logits(w8("fp32")[0])
    err = {}
    for head in ["bf16", "gguf:Q6_K", "W4G32"]:
        m, s = w8(head)
        assert s.head["tied"] and s.head["modules"] == ["model.embed_tokens", "lm_head"]
        before = _logits(m)
        llmquant.save(m, None, tmp_path / head)
        m2, _ = llmquant.load(tmp_path / head)
        assert torch.equal(_logits(m2), before)
        err[head] = float((before - ref).pow(2).mean())
    assert 0 < err["bf16"] < err["gguf:Q6_K"] < err["W4G32"], err


def test_bias_and_untied_lm_head(tmp_path):
    m = make_tiny_llama(tie=False)
    cfg = llmquant.QuantConfig(weight="W4G64", ignore=())  # lm_head quantized too
    s = llmquant.quantize(m, cfg, progress=False)
    assert "lm_head" in [l.name for l in s.layers]
    before = _logits(m)
    llmquant.save(m, None, tmp_path / "q")
    m2, tok = llmquant.load(tmp_path / "q")
    assert tok is None
    assert torch.equal(_logits(m2), before)


def test_quantizing_tied_lm_head_unties_it(tmp_path):
    m = make_tiny_llama(tie=True)
    emb = m.model.embed_tokens.weight.detach().clone()
    s = llmquant.quantize(m, llmquant.QuantConfig(weight="W8", ignore=(), head="fp32"), progress=False)
    assert s.untied_lm_head and isinstance(m.lm_head, QuantLinear)
    assert torch.equal(m.model.embed_tokens.weight, emb)
    before = _logits(m)
    llmquant.save(m, None, tmp_path / "q")
    assert torch.equal(_logits(llmquant.load(tmp_path / "q")[0]), before)


def _saved(tmp_path):
    m = make_tiny_llama()
    llmquant.quantize(m, "W4G64", progress=False)
    d = tmp_path / "q"
    llmquant.save(m, None, d)
    return d


def test_truncated_safetensors(tmp_path):
    d = _saved(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="truncated or corrupt"):
        llmquant.load(d)


def test_flipped_byte_fails_sha(tmp_path):
    d = _saved(tmp_path)
    f = d / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[-10] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(CorruptFileError, match="sha256"):
        llmquant.load(d)


def test_manifest_shape_mismatch(tmp_path):
    """An edited manifest fails its digest; re-signed, a shape the model config cannot take fails the schema,
    and a dtype the file does not hold fails the comparison with model.safetensors."""
    from llmquant.io.manifest_schema import manifest_digest

    d = _saved(tmp_path)
    man = json.loads((d / "llmquant.json").read_text())
    k = "model.norm.weight"
    man["tensors"][k]["shape"] = [1, 2, 3]
    (d / "llmquant.json").write_text(json.dumps(man))
    with pytest.raises(CorruptFileError, match="manifest_sha256 check"):
        llmquant.load(d)
    man["manifest_sha256"] = manifest_digest(man)
    (d / "llmquant.json").write_text(json.dumps(man))
    with pytest.raises(CorruptFileError, match=r"recorded as \[1, 2, 3\], the model needs \[72\]"):
        llmquant.load(d)
    man["tensors"][k].update(shape=[72], dtype="float16")
    man["manifest_sha256"] = manifest_digest(man)
    (d / "llmquant.json").write_text(json.dumps(man))
    with pytest.raises(CorruptFileError, match="manifest says"):
        llmquant.load(d)


def test_missing_manifest_and_folder(tmp_path):
    d = _saved(tmp_path)
    (d / "llmquant.json").unlink()
    with pytest.raises(ModelNotFoundError, match="llmquant.json"):
        llmquant.load(d)
    with pytest.raises(ModelNotFoundError):
        llmquant.load(tmp_path / "nowhere")


def test_existing_output_never_half_overwritten(tmp_path):
    d = _saved(tmp_path)
    snapshot = {p.name: p.read_bytes() for p in d.iterdir()}
    m = make_tiny_llama(seed=1)
    with pytest.raises(OutputExistsError):
        llmquant.save(m, None, d)

    class Boom:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        llmquant.save(m, Boom(), d, overwrite=True)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == snapshot
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    llmquant.save(m, None, d, overwrite=True)  # an overwrite asked for replaces the whole folder
    assert (d / "llmquant.json").read_bytes() != snapshot["llmquant.json"]
