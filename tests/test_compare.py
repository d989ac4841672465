import json
import math

import pytest
import torch

import llmquant
from llmquant.report.runner import Candidate, Profile
from llmquant.report.candidates import default_candidates

TINY = Profile("tiny", eval_windows=1, calib_samples=2, qat_steps=2, sensitivity_samples=1, prefill_len=16,
               new_tokens=3, speed_repeats=1, seq_len=64)


def _boom(ctx):
    raise RuntimeError("this strategy broke")


def test_compare_tiny_model_writes_report(tmp_path, tiny_folder):
    cands = default_candidates() + [Candidate("QAT", "QAT that fails", _boom)]
    threads = torch.get_num_threads()
    res = llmquant.compare(str(tiny_folder), profile=TINY, out_dir=tmp_path / "r", progress=False, candidates=cands,
                           threads=1)
    assert res["env"]["threads"] == 1 and torch.get_num_threads() == threads  # set for the run, then restored
    for f in ("report.md", "report.json", "report.html"):
        assert (tmp_path / "r" / f).stat().st_size > 500
    rows = res["rows"]
    labels = [r["label"] for r in rows]
    assert labels[0] == "fp32" and "QAT that fails" in labels
    assert {r["strategy"] for r in rows} == {"fp32", "PTQ", "Dynamic", "QAT", "Mixed"}
    failed = [r for r in rows if r["status"] != "ok"]
    assert [r["label"] for r in failed] == ["QAT that fails"], [(r["label"], r.get("error")) for r in failed]
    assert "this strategy broke" in failed[0]["error"]
    assert len(rows) == len(default_candidates()) + 1  # the tiny profile runs every configuration
    for r in rows:
        if r["status"] == "ok":
            for k in ("perplexity", "kl", "top1", "size_bytes", "prefill_tok_s", "decode_tok_s", "build_wall_s",
                      "build_cpu_s", "build_peak_rss_mb", "eval_wall_s", "speed_wall_s"):
                assert math.isfinite(r[k]), (r["label"], k)
    by = {r["label"]: r for r in rows}
    assert by["fp32"]["kl"] == 0.0
    # Each builder really transformed the model: every configuration that stores weights differently is
    # smaller than fp32 and measurably different from it, and no two configurations measure the same.
    ok = [r for r in rows if r["status"] == "ok"]
    fp32 = by["fp32"]
    for r in ok:
        if r["label"] not in ("fp32", "bf16 autocast"):
            assert r["kl"] > 0, r["label"]
            assert r["size_bytes"] < fp32["size_bytes"] and r["bits_per_weight"] < 32, r["label"]
    assert len({r["kl"] for r in ok}) == len(ok), [(r["label"], r["kl"]) for r in ok]
    assert by["bf16 weights"]["size_bytes"] < 0.51 * fp32["size_bytes"]
    # ... and against each other: fewer bits, smaller and further from fp32; the same format, the same size
    w8, w4 = by["PTQ RTN int8 (W8)"], by["PTQ RTN int4 g64 (W4G64)"]
    assert w4["size_bytes"] < w8["size_bytes"] and w4["kl"] > w8["kl"]
    assert by["PTQ GPTQ int3 g32"]["size_bytes"] < by["PTQ GPTQ int4 g64"]["size_bytes"] == w4["size_bytes"]
    assert by["QAT int4 g64"]["size_bytes"] == w4["size_bytes"] > by["QAT int3 g32"]["size_bytes"]
    assert by["Mixed plan 3.5 bits/w"]["size_bytes"] < by["Mixed plan 4.5 bits/w"]["size_bytes"] < w8["size_bytes"]
    dyn8, dyn4 = by["Dynamic W8A8 (per token)"], by["Dynamic W4A8 (g128)"]
    assert dyn4["size_bytes"] < dyn8["size_bytes"] and dyn4["kl"] > dyn8["kl"] > w8["kl"]  # + activation error
    # autocast runs the same fp32 weights in bf16 matmuls: same size, a small but real difference
    assert by["bf16 autocast"]["size_bytes"] == by["fp32"]["size_bytes"] and 0 < by["bf16 autocast"]["kl"] < 0.05
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| Strategy | Accuracy | Complexity | Performance | Resources |" in md and "this strategy broke" in md
    assert "timed at the start and at the end of the run" in md and len(by["fp32"]["prefill_tok_s_runs"]) == 2
    assert "by its most accurate configuration" in md and "by its smallest configuration" in md
    assert "Smallest within 1%" in md or "No configuration stays within 1%" in md
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # frontier, speed-ups, sensitivity, weight histogram
    assert json.loads((tmp_path / "r" / "report.json").read_text())["env"]["torch"].startswith("2.13")


def test_progress_shows_the_step_and_weights_time_left(tiny_folder, capsys):
    seen = []

    def build(ctx):
        ctx.step("my step")
        seen.append(ctx.profile.name)
        return ctx.reference, {"steps": ["nothing"]}

    cands = [Candidate("fp32", "fp32", lambda ctx: (ctx.reference, {})),
             Candidate("PTQ", "slow one", build, cost=lambda p: 5.0 * p.calib_samples)]
    llmquant.compare(str(tiny_folder), profile=TINY, progress=True, candidates=cands, strategies=("ptq",))
    err = capsys.readouterr().err
    assert seen == ["tiny"] and "2/2 PTQ: slow one - my step" in err and "100%" in err


def test_unknown_strategy_and_profile():
    with pytest.raises(llmquant.LLMQuantError, match="unknown strategies"):
        llmquant.compare(None, strategies=("ptq", "magic"), progress=False)
    with pytest.raises(llmquant.LLMQuantError, match="unknown profile"):
        llmquant.compare(None, profile="huge", progress=False)
    with pytest.raises(llmquant.LLMQuantError, match="threads must be"):
        llmquant.compare(None, threads=0, progress=False)


def test_reference_logits_match_a_live_reference(tiny_folder):
    import os

    ref, tok = llmquant.load_model(str(tiny_folder))
    q, _ = llmquant.load_model(str(tiny_folder))
    llmquant.quantize(q, "W4G32A", progress=False)
    ids = llmquant.data.token_windows(tok, None, 2, 64)
    cached = llmquant.ReferenceLogits(ref, ids)
    live = llmquant.evaluate(q, reference=ref, tokenizer=tok, windows=2, seq_len=64, progress=False)
    fast = llmquant.evaluate(q, reference=cached, tokenizer=tok, windows=2, seq_len=64, progress=False)
    assert live.kl > 0 and fast.kl == pytest.approx(live.kl, rel=1e-5) and fast.top1 == live.top1
    with pytest.raises(llmquant.LLMQuantError, match="other windows"):
        llmquant.evaluate(q, reference=cached, tokenizer=tok, windows=2, seq_len=32, progress=False)
    path = cached.path
    assert os.path.exists(path)
    cached.close()
    assert not os.path.exists(path)


def test_compare_with_llama_cpp_rows(tmp_path, tokenizer):
    """--with-llama-cpp: llama.cpp's own Q8_0 and Q4_K_M of the same model, made by its quantizer and
    evaluated inside llama.cpp: sizes are the files', Q4_K_M further from fp32 than Q8_0, and Q8_0's KL
    agrees with llmquant's own RTN W8 in magnitude (both are 8-bit weights)."""
    from conftest import make_tiny_llama

    folder = tmp_path / "tiny64"  # widths that are multiples of llama.cpp's 32-value blocks
    make_tiny_llama(hidden=64).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    res = llmquant.compare(str(folder), profile=TINY, strategies=("ptq",), progress=False, threads=1,
                           candidates=[c for c in default_candidates() if c.label in ("fp32", "PTQ RTN int8 (W8)")],
                           llama_cpp=["Q8_0", "Q4_K_M"])
    by = {r["label"]: r for r in res["rows"]}
    assert all(r["status"] == "ok" for r in res["rows"]), [(r["label"], r.get("error")) for r in res["rows"]]
    q8, q4 = by["llama.cpp Q8_0"], by["llama.cpp Q4_K_M"]
    assert q8["strategy"] == "llama.cpp" and q8["kernel"] == "llama.cpp"
    assert 0 < q8["kl"] < q4["kl"] and q4["size_bytes"] < q8["size_bytes"] < by["fp32"]["size_bytes"]
    assert 0.2 < q8["kl"] / by["PTQ RTN int8 (W8)"]["kl"] < 5
    assert q8["decode_tok_s"] > 0 and q8["prefill_tok_s"] > 0
