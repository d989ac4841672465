"""Distributed runs on torch.distributed (gloo on localhost): two processes give what one process gives
(GPTQ, AWQ, AWQ + GPTQ, static W8A8 with histogram observers, SmoothQuant: the same tensors, bit for bit;
QAT: the same losses and weights within float32 rounding; evaluation: the same sums), through torchrun's
environment, the c10d rendezvous of two "nodes", and ``--workers``; a rank killed mid-run stops the other
with one error naming the rank and the layer, writes nothing, and the run resumes from its checkpoint."""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import llmquant
from llmquant.cli import main as cli

from conftest import make_tiny_llama
from dist_cases import CASES, calib, qat_run

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).resolve().parent
CLI_RUN = ["quantize", "--method", "gptq", "--scheme", "W4G32", "--calib-samples", "8", "--seq-len", "64"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    src = str(HERE.parent / "src")
    return {**os.environ, "OMP_NUM_THREADS": "1", "LLMQUANT_DIST_TIMEOUT": "60",
            "PYTHONPATH": os.pathsep.join([*extra.pop("path", []), src, os.environ.get("PYTHONPATH", "")]), **extra}


def _ranks(args: list[str], world: int = 2, **env) -> list[subprocess.CompletedProcess]:
    """``args`` run as ``world`` ranks with torchrun's environment; their results."""
    port = str(_port())
    procs = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, **env)) for r in range(world)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _tensors(folder) -> dict:
    return {k: v["sha256"] for k, v in json.loads((Path(folder) / "llmquant.json").read_text())["tensors"].items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("dist") / "tiny"
    make_tiny_llama(layers=3).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def two_ranks(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    res = _ranks([str(HERE / "dist_worker.py"), str(ckpt), str(out)])
    for r in res:
        assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "done.json").read_text()) == {"world": 2}
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_give_one_process_tensors(case, two_ranks, ckpt, tmp_path):
    m, _ = llmquant.load_model(ckpt)
    llmquant.quantize(m, CASES[case], calib=calib(), progress=False, output=tmp_path / "one")
    one, two = _tensors(tmp_path / "one"), _tensors(two_ranks / case)
    assert one.keys() == two.keys()
    assert [k for k in one if one[k] != two[k]] == []


def test_qat_and_evaluation_match_one_process(two_ranks, ckpt):
    got = torch.load(two_ranks / "qat_eval.pt")
    losses, state = qat_run(ckpt)
    assert got["losses"] == pytest.approx(losses, rel=1e-5)  # DDP sums the ranks' gradients: fp32 rounding only
    assert state.keys() == got["state"].keys()
    for k in state:
        torch.testing.assert_close(got["state"][k], state[k], rtol=0, atol=1e-5)
    m, tok = llmquant.load_model(ckpt)
    ref, _ = llmquant.load_model(ckpt)
    llmquant.quantize(m, "W3G32", progress=False)
    ev = llmquant.evaluate(m, reference=ref, tokenizer=tok, windows=3, seq_len=32, progress=False).to_dict()
    for k in ("perplexity", "kl", "top1", "tokens", "windows"):  # the same sums, added in window order
        assert got["eval"][k] == ev[k], k
    # sensitivity: each rank measures its windows; Fisher's per-window sums are added in window order (the
    # same numbers), K-FAC's moments per rank then in rank order (float64: equal to rounding), exact KL's
    # sums per rank (one batch each: the batched products round differently); QAT candidates trained on both
    # ranks together (DDP: the trained weights equal one process's up to fp32 rounding)
    from dist_worker import sensitivities

    one = sensitivities(ref)
    assert got["sens"].keys() == one.keys()
    for key, damage in one.items():
        flat = [v for row in damage for v in row]
        rel = 1e-5 if key[0] == "kl" else 1e-4 if key[1] == "qat" else 1e-9
        assert [v for row in got["sens"][key] for v in row] == pytest.approx(flat, rel=rel), key


@pytest.fixture(scope="module")
def cli_reference(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cliref") / "one"
    assert cli([*CLI_RUN, "--model", str(ckpt), "-o", str(out)]) == 0
    return out


def test_two_nodes_through_the_c10d_rendezvous(ckpt, cli_reference, tmp_path):
    port = str(_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-id", "t", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "llmquant",
                *CLI_RUN, "--model", str(ckpt), "-o", str(tmp_path / "out")]
    procs = [subprocess.Popen(torchrun, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert _tensors(tmp_path / "out") == _tensors(cli_reference)


def test_killed_rank_stops_the_run_cleanly_and_it_resumes(ckpt, cli_reference, tmp_path):
    """--workers 2 with rank 1 killed (kill -9) in decoder layer 1: rank 0 says which rank and where, the
    output is not written, and --resume (here with two workers again) finishes it: the reference tensors."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        if os.environ.get("RANK") == "1" and os.environ.get("KILL_LAYER"):
            import llmquant.flows.pipeline as P
            _run_block = P.run_block
            def dying(stages, ctx):
                if ctx.prefix.endswith("." + os.environ["KILL_LAYER"]):
                    os.kill(os.getpid(), 9)
                return _run_block(stages, ctx)
            P.run_block = dying
    """))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llmquant", *CLI_RUN, "--model", str(ckpt), "-o", str(out), "--workers", "2",
           "--timeout", "30"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(path=[str(hook)], KILL_LAYER="1"), timeout=300)
    assert r.returncode != 0
    assert "rank 1 stopped answering during decoder layer 1" in r.stderr, r.stderr[-3000:]
    assert "worker rank 1 of 2 exited with signal 9" in r.stderr
    assert not out.exists() and llmquant.io.read_progress(out)["done"] == 1
    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed after decoder layer 1" in r.stdout
    assert _tensors(out) == _tensors(cli_reference)


def test_a_checkpoint_of_two_ranks_resumes_in_one_process(ckpt, tmp_path):
    out = tmp_path / "out"
    res = _ranks([str(HERE / "dist_worker.py"), str(ckpt), str(out), "--kill-rank", "1", "--kill-layer", "2"])
    assert res[1].returncode == -9 and res[0].returncode != 0
    assert "DistributedError: rank 1 stopped answering during decoder layer 2" in res[0].stderr
    assert not (out / "gptq").exists()
    m, _ = llmquant.load_model(ckpt)
    s = llmquant.quantize(m, CASES["gptq"], calib=calib(), progress=False, output=out / "gptq", resume=True)
    assert s.resumed_after == 2
    m, _ = llmquant.load_model(ckpt)
    llmquant.quantize(m, CASES["gptq"], calib=calib(), progress=False, output=tmp_path / "one")
    assert _tensors(out / "gptq") == _tensors(tmp_path / "one")


def test_too_few_batches_for_the_ranks_is_refused(ckpt):
    from llmquant.errors import CalibrationError
    from llmquant.flows import distributed

    distributed._ACTIVE = distributed.Group(7, 8, 5.0, "gloo")  # rank 7 of eight, one batch: refused before any collective
    try:
        m, _ = llmquant.load_model(ckpt)
        with pytest.raises(CalibrationError, match="cannot be shared by 8 ranks"):
            llmquant.quantize(m, CASES["gptq"].with_(calibration=CASES["gptq"].calibration.__class__(batch_size=6)),
                              calib=calib(), progress=False)
    finally:
        distributed._ACTIVE = None


@pytest.mark.parametrize("shard", [False, True], ids=["ddp", "fsdp"])
def test_qat_checkpoint_of_two_ranks_resumes_in_one_process(ckpt, tmp_path, shard):
    """QAT with two ranks (whole copies, or sharded with FSDP2), rank 1 killed after the step-2 checkpoint:
    rank 0 names it; one process resumes from step 2 and ends where an uninterrupted one-process run ends
    (float32 rounding apart)."""
    res = _ranks([str(HERE / "dist_worker.py"), str(ckpt), str(tmp_path), "--qat-kill", *(["--shard"] if shard else [])])
    assert res[1].returncode == -9 and res[0].returncode != 0
    assert "rank 1 stopped answering during QAT step" in res[0].stderr, res[0].stderr[-2000:]
    losses, state = qat_run(ckpt, steps=4, checkpoint_dir=tmp_path, checkpoint_every=2, resume=True)
    straight_losses, straight = qat_run(ckpt, steps=4)
    assert losses == pytest.approx(straight_losses, rel=1e-5)
    for k in state:
        torch.testing.assert_close(state[k], straight[k], rtol=0, atol=1e-5)


def test_qat_sharded_with_fsdp2_matches_one_process_and_its_checkpoint_resumes_anywhere(ckpt, tmp_path):
    """QAT with the model sharded over two ranks (FSDP2): the same losses and trained weights as one process
    (float32 rounding apart), whole weights again after training, and a checkpoint in the one-process form
    that one process resumes to where an uninterrupted one-process run ends."""
    res = _ranks([str(HERE / "dist_worker.py"), str(ckpt), str(tmp_path), "--qat-fsdp"])
    for r in res:
        assert r.returncode == 0, r.stderr[-3000:]
    got = torch.load(tmp_path / "qat_fsdp.pt")
    losses, state = qat_run(ckpt, steps=4)
    assert got["losses"] == pytest.approx(losses, rel=1e-5)
    assert state.keys() == got["state"].keys()
    for k in state:
        assert type(got["state"][k]) is torch.Tensor, k  # not a shard
        torch.testing.assert_close(got["state"][k], state[k], rtol=0, atol=1e-5)
    assert got["resumed"] == pytest.approx(losses, rel=1e-5)  # two ranks resuming their own step-2 file
    for k in state:
        torch.testing.assert_close(got["resumed_state"][k], state[k], rtol=0, atol=1e-5)
    ck = torch.load(tmp_path / "step2" / "qat_checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and sorted(ck["optimizer"]["state"]) == list(range(len(ck["optimizer"]["state"])))
    resumed, rstate = qat_run(ckpt, steps=4, checkpoint_dir=tmp_path / "step2", resume=True)
    assert resumed == pytest.approx(losses, rel=1e-5)
    for k in state:
        torch.testing.assert_close(rstate[k], state[k], rtol=0, atol=1e-5)


def test_layer_training_is_refused_in_a_distributed_run(ckpt):
    from llmquant.errors import UnsupportedError
    from llmquant.flows import distributed

    distributed._ACTIVE = distributed.Group(0, 2, 5.0, "gloo")  # refused before any collective
    try:
        m, _ = llmquant.load_model(ckpt)
        with pytest.raises(UnsupportedError, match="does not split over processes"):
            llmquant.quantize(m, llmquant.QuantConfig(weight="W4G32", method="blockqat"), calib=calib(), progress=False)
    finally:
        distributed._ACTIVE = None


def test_qat_loaded_sharded_matches_loaded_whole_and_holds_one_shard_per_rank(ckpt, tmp_path):
    """Sharded QAT of a model loaded with shard=True (each rank reads only its rows of every tensor from the
    safetensors file) gives the same losses, trained weights and saved codes, bit for bit, as loading it
    whole then sharding; after the read each rank holds half of every parameter (student and teacher) and
    no whole one; only the writer gathers the trained model whole (the other rank's is left empty); the
    step-2 checkpoint resumes, loaded sharded, to the same end; the tied head stays tied, as in one process."""
    res = _ranks([str(HERE / "dist_worker.py"), str(ckpt), str(tmp_path), "--qat-shard-load"])
    for r in res:
        assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"qat_shard_load.{r}.pt") for r in (0, 1)]
    for got in ranks:
        runs = got["runs"]
        assert runs["sharded"][0] == runs["whole"][0] and len(runs["whole"][0]) == 4
        assert runs["resumed"][0] == runs["whole"][0]
        assert runs["frozen-sharded"][0] == runs["frozen-whole"][0]
        for k, v in runs["frozen-whole"][1].items():
            assert torch.equal(runs["frozen-sharded"][1][k], v), k
        for tag in ("sharded", "resumed"):
            if tag == "sharded" and got["rank"] == 1:  # freed (and not converted): only the writer gathers it whole
                kept = {k.rsplit(".", 1)[1] for k, v in runs[tag][1].items() if v is not None}
                assert kept == {"initialized"}, kept  # buffers only: every parameter is empty
                continue
            assert runs[tag][1].keys() == runs["whole"][1].keys()
            for k, v in runs["whole"][1].items():
                assert torch.equal(runs[tag][1][k], v), (tag, k)
    assert _tensors(tmp_path / "sharded-out") == _tensors(tmp_path / "whole-out") == _tensors(tmp_path / "resumed-out")
    qat_run(ckpt, steps=4, save=tmp_path / "one-out")
    assert _tensors(tmp_path / "one-out").keys() == _tensors(tmp_path / "whole-out").keys()  # the tied head stored once
    m, _ = llmquant.load_model(ckpt)
    whole = {n: p.numel() for n, p in m.named_parameters()}
    for got in ranks:
        held = got["held"]
        assert {k.split(".", 1)[1] for k in held if k.startswith("teacher.")} == set(whole)
        for k, (kind, shape, numel, meta) in held.items():
            assert kind == "DTensor" and not meta, k  # a shard, read
            half = -(-shape[0] // 2)  # torch.chunk's halves of the rows: rank 0 the first, rank 1 the rest
            assert numel == (half if got["rank"] == 0 else shape[0] - half) * math.prod(shape[1:]), k
        teacher = sum(n for k, (_, _, n, _) in held.items() if k.startswith("teacher."))
        assert abs(teacher - sum(whole.values()) / 2) <= sum(whole.values()) * 0.01
