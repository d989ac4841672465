"""Streaming: a model whose decoder layers are read from its safetensors shards when the pipeline reaches
them quantizes to exactly what the model loaded whole quantizes to; damaged checkpoints give one clear error."""

import json

import pytest
import torch

import llmquant
from llmquant import AWQParams, BlockQATParams, QuantConfig
from llmquant.errors import CalibrationError, CorruptFileError, LLMQuantError, SchemeError, UnsupportedError

from conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 1000


def shards_dtype(path):
    from safetensors import safe_open

    f = sorted(path.glob("*.safetensors"))[0]
    with safe_open(str(f), framework="pt") as h:
        return h.get_tensor(next(iter(h.keys()))).dtype


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
    "blockqat": QuantConfig(weight="W3G32", method="blockqat", method_params=BlockQATParams(steps=4, lr=1e-4)),
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
    emb = streamed.model.embed_tokens.weight  # in the checkpoint's dtype, memory-mapped
    assert not emb.is_meta and emb.dtype == shards_dtype(shards)
    llmquant.quantize(whole, CASES[name], calib=calib, progress=False)
    s = llmquant.quantize(streamed, CASES[name], calib=calib, progress=False)
    assert s.peak_memory_mb > 0 and "peak memory" in str(s)
    a, b = whole.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # quantized layers bit for bit; the float embedding/head equal in value (stored as in the checkpoint)
        assert torch.equal(a[k], b[k].to(a[k].dtype)) and (a[k].dtype == b[k].dtype or "layers" not in k), k
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
    # an index naming a file that is not there; a tensor in a dtype the layer cannot hold
    from safetensors.torch import load_file, save_file

    (ckpt / shard).unlink()
    with pytest.raises(CorruptFileError, match=shard.replace(".", r"\.")):
        llmquant.load_model(ckpt, stream=True)
    ckpt = _save(tmp_path / "m2", torch.float32)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.up_proj.weight"
    tensors = load_file(str(ckpt / index[name]))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, str(ckpt / index[name]))
    m, _ = llmquant.load_model(ckpt, stream=True)
    with pytest.raises(CorruptFileError, match=f"{index[name]}.*int32.*float"):
        llmquant.quantize(m, "W4G32", progress=False, output=tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_cli_stream(shards, tmp_path):
    from llmquant.cli import main

    assert main(["quantize", "--model", str(shards), "--stream", "--scheme", "W4G32", "-o", str(tmp_path / "s")]) == 0
    assert main(["quantize", "--model", str(shards), "--scheme", "W4G32", "-o", str(tmp_path / "w")]) == 0
    a = json.loads((tmp_path / "s" / "llmquant.json").read_text())["tensors"]
    b = json.loads((tmp_path / "w" / "llmquant.json").read_text())["tensors"]
    assert a.keys() == b.keys()
    assert {k: v["sha256"] for k, v in a.items() if "layers" in k} == {k: v["sha256"] for k, v in b.items() if "layers" in k}
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():  # the float embedding is kept as the checkpoint stores it: the same values
        assert torch.equal(llmquant.load(tmp_path / "s")[0](ids).logits, llmquant.load(tmp_path / "w")[0](ids).logits)


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


@pytest.mark.parametrize("name", ["rtn", "gptq", "plan"])
def test_output_written_as_it_goes(shards, calib, name, tmp_path):
    """quantize(..., output=) writes each layer when it is done (a streamed model's layers then leave memory);
    the folder holds several shards and equals saving the whole-model result; the model runs afterwards."""
    whole, _ = llmquant.load_model(shards)
    llmquant.quantize(whole, CASES[name], calib=calib, progress=False)
    llmquant.save(whole, None, tmp_path / "w")
    streamed, _ = llmquant.load_model(shards, stream=True)
    written = []
    import llmquant.io.output as output

    orig = output.OutputFolder.layer_done

    def spy(self, index, prefix, layer, summary=None):
        orig(self, index, prefix, layer, summary)
        written.append(index)
        assert all(p.is_meta for p in layer.parameters()) and all(b.is_meta for b in layer.buffers())

    output.OutputFolder.layer_done = spy
    try:
        llmquant.quantize(streamed, CASES[name], calib=calib, progress=False, output=tmp_path / "s", shard_size="40KB")
    finally:
        output.OutputFolder.layer_done = orig
    assert written == [0, 1, 2]
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    a = json.loads((tmp_path / "w" / "llmquant.json").read_text())["tensors"]
    b = json.loads((tmp_path / "s" / "llmquant.json").read_text())["tensors"]
    assert {k: v["sha256"] for k, v in a.items() if "layers" in k} == {k: v["sha256"] for k, v in b.items() if "layers" in k}
    assert not any(t.is_meta for t in streamed.state_dict().values())  # read back from the folder, memory-mapped
    loaded, _ = llmquant.load(tmp_path / "s")
    with torch.no_grad():
        ref = whole(calib[:2]).logits
        assert torch.equal(loaded(calib[:2]).logits, ref) and torch.equal(streamed(calib[:2]).logits, ref)
    assert not list(tmp_path.glob(".s.*"))  # no temporary folder or lock left


def test_failed_or_killed_run_keeps_the_old_output(shards, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    llmquant.quantize(llmquant.load_model(shards)[0], "W8", progress=False, output=out)
    before = json.loads((out / "llmquant.json").read_text())["tensors"]
    m, _ = llmquant.load_model(shards, stream=True)
    import llmquant.io.output as output

    orig = output.OutputFolder.layer_done

    def fail_at_1(self, index, *a):
        if index == 1:
            raise OSError(28, "No space left on device")
        orig(self, index, *a)

    output.OutputFolder.layer_done = fail_at_1
    try:  # fails after a layer was written: the old output stays
        with pytest.raises(OSError, match="No space"):
            llmquant.quantize(m, "W4G32", progress=False, output=out, overwrite=True)
    finally:
        output.OutputFolder.layer_done = orig
    assert json.loads((out / "llmquant.json").read_text())["tensors"] == before
    # layer 0 was finished: its checkpoint stays for --resume (test_resume.py), nothing else
    assert [p.name for p in tmp_path.glob(".out.*")] == [".out.partial"]
    # a kill -9 in the middle of a streamed run: the old output loads as before; the next run clears the leftovers
    script = (
        "import time, llmquant, llmquant.io.output as f\n"
        "orig = f.OutputFolder.layer_done\n"
        "def slow(self, *a):\n"
        "    orig(self, *a); print('layer', flush=True); time.sleep(30)\n"
        "f.OutputFolder.layer_done = slow\n"
        f"m, _ = llmquant.load_model({str(shards)!r}, stream=True)\n"
        f"llmquant.quantize(m, 'W4G32', progress=False, output={str(out)!r}, overwrite=True)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.stdout.readline().strip() == "layer"
    assert list(tmp_path.glob(".out.partial/*.part"))
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert json.loads((out / "llmquant.json").read_text())["tensors"] == before
    llmquant.load(out)
    llmquant.quantize(llmquant.load_model(shards)[0], "W8", progress=False, output=out, overwrite=True)
    assert not list(tmp_path.glob(".out.*"))


def test_memory_budget_refused_up_front(shards, calib, tmp_path):
    from llmquant.errors import BudgetError

    m, _ = llmquant.load_model(shards, stream=True)
    with pytest.raises(BudgetError, match=r"needs at least [0-9.]+ [MG]B"):
        llmquant.quantize(m, CASES["gptq"], calib=calib, progress=False, max_memory="1MB", output=tmp_path / "o")
    assert all(p.is_meta for p in m.model.layers.parameters())  # nothing was read or quantized
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))
    with pytest.raises(SchemeError, match="max_memory"):
        llmquant.quantize(m, "W4G32", progress=False, max_memory="lots")
    from llmquant.cli import main

    assert main(["quantize", "--model", str(shards), "--stream", "--max-memory", "1MB", "-o", str(tmp_path / "c")]) == 2
    assert not (tmp_path / "c").exists()
    s = llmquant.quantize(m, "W4G32", progress=False, max_memory="64GB")
    assert s.memory_budget["max_memory_mb"] == 64000 and not s.memory_budget["activations_spilled"]


def test_budget_arithmetic():
    from llmquant.flows.budget import Estimate, check

    e = Estimate(base=100, layer=50, work=20, activations=400, one_batch=30)
    assert (e.minimum, e.in_memory) == (200, 570)
    assert check(e, None) is False and check(e, 570) is False and check(e, 569) is True and check(e, 200) is True
    with pytest.raises(Exception, match="at least 0 MB"):
        check(e, 199)


@pytest.mark.parametrize("name", ["gptq", "awq+gptq", "static"])
def test_spilled_activations_give_the_same_result(shards, calib, name, monkeypatch):
    """Calibration activations kept in a file on disk (what a budget too small for them does) quantize
    exactly as in memory."""
    import llmquant.flows.budget as budget

    a, _ = llmquant.load_model(shards, stream=True)
    llmquant.quantize(a, CASES[name], calib=calib, progress=False)
    used = []
    orig = budget.SpilledList.__setitem__

    def spy(self, j, t):
        used.append(j)
        orig(self, j, t)

    monkeypatch.setattr(budget, "check", lambda est, limit: True)
    monkeypatch.setattr(budget.SpilledList, "__setitem__", spy)
    b, _ = llmquant.load_model(shards, stream=True)
    s = llmquant.quantize(b, CASES[name], calib=calib, progress=False, max_memory="64GB")
    assert s.memory_budget["activations_spilled"] and used
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_disk_full_is_a_clean_error_and_keeps_the_old_output(shards, tmp_path, monkeypatch):
    from llmquant.errors import OutputLocationError
    from llmquant.io.shards import ShardWriter

    out = tmp_path / "out"
    llmquant.quantize(llmquant.load_model(shards)[0], "W8", progress=False, output=out)
    before = json.loads((out / "llmquant.json").read_text())["tensors"]
    calls = []
    orig = ShardWriter.add

    def add(self, name, t):
        calls.append(name)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        orig(self, name, t)

    monkeypatch.setattr(ShardWriter, "add", add)
    m, _ = llmquant.load_model(shards, stream=True)
    with pytest.raises(OutputLocationError, match="is full"):
        llmquant.quantize(m, "W4G32", progress=False, output=out, overwrite=True)
    assert json.loads((out / "llmquant.json").read_text())["tensors"] == before
    assert not list(tmp_path.glob(".out.*"))


def test_gguf_file_streams_layer_by_layer(tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """A .gguf file streams too: each layer's tensors are dequantized from the memory-mapped file when the
    pipeline reaches it (q/k rows back in Hugging Face order), bit-identical to the model loaded whole."""
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    m = make_tiny_llama(vocab_size=400, hidden=64, layers=3)
    llmquant.quantize(m, llmquant.QuantConfig(weight="gguf:Q4_1", targets=("re:.*self_attn.[qk]_proj",)), progress=False)
    llmquant.quantize(m, "gguf:Q8_0", progress=False)
    llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "m.gguf", progress=False)
    whole, _ = llmquant.load_model(tmp_path / "m.gguf")
    streamed, tok = llmquant.load_model(tmp_path / "m.gguf", stream=True)
    assert tok is not None and all(p.is_meta for p in streamed.model.layers.parameters())
    calib = torch.randint(0, 400, (4, 32), generator=torch.Generator().manual_seed(2))
    llmquant.quantize(whole, CASES["gptq"], calib=calib, progress=False)
    llmquant.quantize(streamed, CASES["gptq"], calib=calib, progress=False, output=tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(whole(calib[:2]).logits, streamed(calib[:2]).logits)
    assert json.loads((tmp_path / "s" / "llmquant.json").read_text())["base_model"] == str((tmp_path / "m.gguf").resolve())


def test_sensitivity_streams_layer_by_layer(shards, tmp_path, tiny_bpe_tokenizer):
    """The Fisher sensitivity of a streamed model (forward, then backward one layer at a time) equals the
    whole model's; the layers go back to the checkpoint; `plan --stream` solves a plan from it."""
    ids = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(3))
    cands = ["W4G32", "W8", "W3G32"]
    whole, _ = llmquant.load_model(shards)
    streamed, _ = llmquant.load_model(shards, stream=True)
    a = llmquant.sensitivity(whole, ids, cands, cache=False, progress=False, windows=3, seq_len=32)
    b = llmquant.sensitivity(streamed, ids, cands, cache=False, progress=False, windows=3, seq_len=32)
    assert [u.name for u in a.units] == [u.name for u in b.units]
    assert torch.allclose(torch.tensor(b.damage), torch.tensor(a.damage), rtol=1e-5, atol=0)
    assert (a.fp32_bytes, a.nbytes) == (b.fp32_bytes, b.nbytes)
    # what the output stores besides the planned linears: the same (the embedding/head at the default int8
    # format, whichever dtype the checkpoint and the loaded model hold it in)
    assert b.fixed_bytes == a.fixed_bytes
    assert all(p.is_meta for p in streamed.model.layers.parameters())
    with pytest.raises(SchemeError, match="fisher"):
        llmquant.sensitivity(streamed, ids, cands, method="kl", cache=False, progress=False)
    with pytest.raises(SchemeError, match="include-head|outside"):
        llmquant.sensitivity(streamed, ids, cands, include_head=True, cache=False, progress=False)
    from llmquant.cli import main

    import shutil

    text, folder = tmp_path / "t.txt", tmp_path / "m"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    shutil.copytree(shards, folder)
    tiny_bpe_tokenizer.save_pretrained(str(folder))
    assert main(["plan", "--model", str(folder), "--stream", "--text", str(text), "--windows", "2", "--seq-len", "32",
                 "--candidates", "W4G32,W8", "--target-bits", "6", "--no-cache", "-o", str(tmp_path / "p.json")]) == 0
    assert len(json.loads((tmp_path / "p.json").read_text())["layers"]) == len(a.units)


def test_shard_writer_plain_float_checkpoint_loads(tmp_path):
    """A float checkpoint written tensor by tensor with ShardWriter (as benchmarks/bench_streaming.py writes its
    random ones) loads whole and streamed when its shards carry plain metadata; with the default metadata
    (producer: llmquant) it is taken for an llmquant folder missing its manifest and refused."""
    from llmquant.io.shards import ShardWriter

    src = make_tiny_llama(vocab_size=VOCAB, layers=2, tie=False)
    sd = src.state_dict()
    for meta, folder in (({"format": "pt"}, tmp_path / "plain"), (None, tmp_path / "marked")):
        folder.mkdir()
        w = ShardWriter(folder, 40_000, metadata=meta)
        for name, t in sd.items():
            w.add(name, t)
        w.close()
        src.config.save_pretrained(str(folder))
        assert len(list(folder.glob("*.safetensors"))) > 1
    for stream in (False, True):
        m, _ = llmquant.load_model(tmp_path / "plain", stream=stream)
        if not stream:
            assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(CorruptFileError, match="producer: llmquant"):
        llmquant.load_model(tmp_path / "marked")


def _rows_equal_whole(path):
    """Every parameter of ``path`` loaded with shard=True: on the meta device, and any block of its rows
    read from the file equals those rows of the model loaded whole (the tied head is the embedding)."""
    whole, _ = llmquant.load_model(path)
    empty, _ = llmquant.load_model(path, shard=True)
    assert all(p.is_meta for p in empty.parameters()) and not any(b.is_meta for b in empty.buffers())
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    src, ref = empty.llmquant_row_source, dict(whole.named_parameters())
    assert [n for n, _ in empty.named_parameters()] == list(ref)
    for n, p in empty.named_parameters():
        for start, stop in ((0, (p.shape[0] + 1) // 2), ((p.shape[0] + 1) // 2, p.shape[0]), (1, 2)):
            got = src.rows(n, start, stop)
            assert got.dtype == ref[n].dtype and torch.equal(got, ref[n][start:stop]), (n, start, stop)


def test_loaded_sharded_reads_rows_of_every_tensor(shards, tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """load_model(shard=True) reads nothing, and the rows it reads later are the model's: from safetensors
    shards (bf16 and fp32 files, read as fp32) and from a .gguf file (q/k rows in Hugging Face order)."""
    _rows_equal_whole(shards)
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    llmquant.export(make_tiny_llama(vocab_size=400, hidden=64, layers=2), tiny_bpe_tokenizer, tmp_path / "m.gguf",
                    progress=False)
    _rows_equal_whole(tmp_path / "m.gguf")


def test_what_cannot_be_loaded_sharded_is_refused(shards, tmp_path):
    """A folder llmquant saved (packed codes) or one without safetensors weights cannot be read by rows: a
    clear error, and the qat CLI loads it whole instead (saying so); a model loaded with shard=True is only
    trained sharded in a distributed run."""
    import argparse
    import logging

    from llmquant.cli.commands import _load_for_qat
    from llmquant.flows import distributed

    m, tok = llmquant.load_model(shards)
    llmquant.quantize(m, "W4G32", progress=False)
    llmquant.save(m, tok, tmp_path / "q")
    with pytest.raises(UnsupportedError, match="saved by llmquant.*cannot be loaded sharded"):
        llmquant.load_model(tmp_path / "q", shard=True)
    (tmp_path / "nosafe").mkdir()
    (tmp_path / "nosafe" / "config.json").write_text((shards / "config.json").read_text())
    with pytest.raises(UnsupportedError, match="holds no model.safetensors"):
        llmquant.load_model(tmp_path / "nosafe", shard=True)
    empty, _ = llmquant.load_model(shards, shard=True)
    with pytest.raises(SchemeError, match="loaded with shard=True"):
        llmquant.train_qat(empty, torch.arange(200) % VOCAB, steps=1, batch=2, seq_len=32, progress=False)
    distributed._ACTIVE = distributed.Group(0, 2, 5.0, "gloo")  # nothing collective happens in the load
    try:
        args = argparse.Namespace(model=str(tmp_path / "q"), shard=True)
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("llmquant").addHandler(handler)
        try:
            whole, _ = _load_for_qat(args, None)
        finally:
            logging.getLogger("llmquant").removeHandler(handler)
        assert not any(p.is_meta for p in whole.parameters())
        assert any("loads it whole" in r.getMessage() for r in records)
        lazy, _ = _load_for_qat(argparse.Namespace(model=str(shards), shard=True), None)
        assert all(p.is_meta for p in lazy.parameters())
    finally:
        distributed._ACTIVE = None
