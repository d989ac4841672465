"""Resume: a run writing an output and killed at any point (kill -9 in a subprocess, or an exception)
continues with ``resume=True`` / ``--resume`` from its last finished layer and gives exactly what an
uninterrupted run gives; a checkpoint of other settings is refused; a run without resume starts over."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import llmquant
from llmquant import AWQParams, QuantConfig
from llmquant.errors import CheckpointError, UsageError

from conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 1000
GPTQ = QuantConfig(weight="W3G32", method="gptq")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "m"
    make_tiny_llama(vocab_size=VOCAB, layers=4).save_pretrained(str(path), max_shard_size="60KB")
    return path


def _calib():
    return torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(1))


def _run(ckpt, out, cfg, **kw):
    m, _ = llmquant.load_model(ckpt, stream=True)
    s = llmquant.quantize(m, cfg, calib=_calib(), progress=False, output=out, shard_size="40KB", **kw)
    return m, s


def _tensors(folder):
    return {k: v["sha256"] for k, v in json.loads((folder / "llmquant.json").read_text())["tensors"].items()}


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    m, s = _run(ckpt, out, GPTQ)
    with torch.no_grad():
        logits = m(_calib()[:2]).logits
    return out, s, logits


# kill -9 at: the end of layer 1's checkpoint; inside layer 2's tensors (the 40th tensor written); a shard
# finished but its data file not yet removed; the final save (every layer done); half-way through giving the
# shards their final names
KILL_SCRIPT = """
import json, os, signal, sys, torch, llmquant
import llmquant.io.shards as sh, llmquant.io.output as out
kind, n = sys.argv[1].split(":")
n, count = int(n), [0]
def hit():
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if kind == "checkpoint":
    orig = out.OutputFolder.checkpoint
    def patched(self, *a):
        orig(self, *a)
        hit()
    out.OutputFolder.checkpoint = patched
elif kind == "add":
    orig = sh.ShardWriter.add
    def patched(self, name, t):
        if not name.startswith("x"):
            hit()
        return orig(self, name, t)
    sh.ShardWriter.add = patched
elif kind == "shard":
    orig_unlink = os.unlink
    def patched(p, *a, **k):
        if str(p).endswith(".part"):
            hit()
        return orig_unlink(p, *a, **k)
    os.unlink = patched
elif kind == "close":  # the shards are being given their final names
    orig_replace = os.replace
    def patched(a, b, *r, **k):
        out = orig_replace(a, b, *r, **k)
        if os.path.basename(str(b)).startswith("model-"):
            hit()
        return out
    os.replace = patched
elif kind == "finish":
    orig = out.OutputFolder._complete
    def patched(self, *a):
        hit()
        return orig(self, *a)
    out.OutputFolder._complete = patched
m, _ = llmquant.load_model(sys.argv[2], stream=True)
calib = torch.randint(0, 1000, (6, 32), generator=torch.Generator().manual_seed(1))
llmquant.quantize(m, llmquant.QuantConfig.from_dict(json.loads(sys.argv[4])), calib=calib, progress=False,
                  output=sys.argv[3], shard_size="40KB", overwrite=True)
print("finished")
"""


def _killed_run(ckpt, out, point, cfg):
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, point, str(ckpt), str(out), json.dumps(cfg.to_dict())],
                       capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])


@pytest.mark.parametrize("point", ["checkpoint:2", "add:40", "shard:3", "finish:1", "close:2"])
def test_kill_and_resume_is_identical(ckpt, reference, tmp_path, point):
    ref_out, ref_summary, ref_logits = reference
    out = tmp_path / "out"
    _killed_run(ckpt, out, point, GPTQ)
    assert not out.exists() and (tmp_path / ".out.partial").is_dir()
    m, s = _run(ckpt, out, GPTQ, resume=True)
    assert s.resumed_after == {"checkpoint:2": 2, "add:40": 2, "shard:3": 1, "finish:1": 4, "close:2": 4}[point]
    assert _tensors(out) == _tensors(ref_out)
    assert [r.__dict__ for r in s.layers] == [r.__dict__ for r in ref_summary.layers]
    assert s.layer_errors == ref_summary.layer_errors
    with torch.no_grad():
        assert torch.equal(m(_calib()[:2]).logits, ref_logits)  # the returned model runs (memory-mapped layers)
        assert torch.equal(llmquant.load(out)[0](_calib()[:2]).logits, ref_logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no checkpoint, lock or temporary left


@pytest.mark.parametrize("cfg", [QuantConfig(weight="W4G32"),
                                 QuantConfig(weight="W4G32", method=["awq", "gptq"], method_params=[AWQParams(grid=4), None]),
                                 QuantConfig(method="static")], ids=["rtn", "awq+gptq", "static"])
def test_interrupted_then_resumed_in_process(ckpt, tmp_path, cfg):
    """Every layer-wise strategy (data-free, float-propagating, static activations) resumes exactly; an
    exception (Ctrl-C) keeps the checkpoint, the second interruption too."""
    _, ref = _run(ckpt, tmp_path / "ref", cfg)
    import llmquant.io.output as output

    orig = output.OutputFolder.checkpoint
    for stop_after in (0, 2):
        def interrupt(self, model, index, *a):
            orig(self, model, index, *a)
            if index == stop_after:
                raise KeyboardInterrupt

        output.OutputFolder.checkpoint = interrupt
        try:
            with pytest.raises(KeyboardInterrupt):
                _run(ckpt, tmp_path / "out", cfg, resume=stop_after > 0)
        finally:
            output.OutputFolder.checkpoint = orig
    _, s = _run(ckpt, tmp_path / "out", cfg, resume=True)
    assert s.resumed_after == 3
    assert _tensors(tmp_path / "out") == _tensors(tmp_path / "ref")
    assert [r.__dict__ for r in s.layers] == [r.__dict__ for r in ref.layers]


def test_resume_refuses_other_settings_and_missing_checkpoints(ckpt, tmp_path, caplog):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="no interrupted run to resume"):
        _run(ckpt, out, GPTQ, resume=True)
    with pytest.raises(UsageError, match="output="):
        llmquant.quantize(make_tiny_llama(vocab_size=VOCAB), "W4G32", progress=False, resume=True)
    import llmquant.io.output as output

    orig = output.OutputFolder.checkpoint

    def interrupt(self, model, index, *a):
        orig(self, model, index, *a)
        raise KeyboardInterrupt

    output.OutputFolder.checkpoint = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(ckpt, out, GPTQ)
    finally:
        output.OutputFolder.checkpoint = orig
    progress = llmquant.io.read_progress(out)
    assert progress["done"] == 1 and progress["total"] == 4
    with pytest.raises(CheckpointError, match=r"other settings \(config differ\)"):
        _run(ckpt, out, QuantConfig(weight="W4G32", method="gptq"), resume=True)
    m, _ = llmquant.load_model(ckpt, stream=True)
    with pytest.raises(CheckpointError, match="calibration differ"):
        llmquant.quantize(m, GPTQ, calib=_calib()[:4], progress=False, output=out, shard_size="40KB", resume=True)
    with pytest.raises(CheckpointError, match="shard_bytes differ"):
        m, _ = llmquant.load_model(ckpt, stream=True)
        llmquant.quantize(m, GPTQ, calib=_calib(), progress=False, output=out, shard_size="80KB", resume=True)
    assert llmquant.io.read_progress(out)["done"] == 1  # refusals leave the checkpoint as it was
    # the CLI refuses --resume without a checkpoint before loading anything, in one line
    from llmquant.cli import main

    assert main(["quantize", "--model", str(tmp_path / "nowhere"), "-o", str(tmp_path / "o2"), "--resume"]) == 2
    # a run without --resume starts over, saying what it discards
    with caplog.at_level("WARNING"):
        _run(ckpt, out, GPTQ)
    assert "discarding the checkpoint of an interrupted run" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_damaged_checkpoint_is_refused(ckpt, tmp_path):
    out = tmp_path / "out"
    _killed_run(ckpt, out, "checkpoint:2", GPTQ)
    shard = next((tmp_path / ".out.partial").glob(".shard-00000.safetensors"))
    shard.unlink()
    with pytest.raises(CheckpointError, match="damaged"):
        _run(ckpt, out, GPTQ, resume=True)
    (tmp_path / ".out.partial" / ".llmquant-resume" / "progress.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read"):
        _run(ckpt, out, GPTQ, resume=True)
