import json
import math

import llmquant
from llmquant.report.runner import Candidate, Profile
from llmquant.report.candidates import default_candidates

TINY = Profile("tiny", eval_windows=1, calib_samples=2, qat_steps=2, sensitivity_samples=1, prefill_len=16,
               new_tokens=3, speed_repeats=1, seq_len=64)


def _boom(ctx):
    raise RuntimeError("this strategy broke")


def test_compare_tiny_model_writes_report(tmp_path, tiny_folder):
    cands = default_candidates() + [Candidate("QAT", "QAT that fails", _boom)]
    res = llmquant.compare(str(tiny_folder), profile=TINY, out_dir=tmp_path / "r", progress=False, candidates=cands)
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
                      "build_cpu_s", "build_peak_rss_mb"):
                assert math.isfinite(r[k]), (r["label"], k)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| Strategy | Accuracy | Complexity | Performance | Resources |" in md and "this strategy broke" in md
    assert "Smallest within 1%" in md or "No configuration stays within 1%" in md
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4  # frontier, speed-ups, sensitivity, weight histogram
    assert json.loads((tmp_path / "r" / "report.json").read_text())["env"]["torch"].startswith("2.13")


def test_unknown_strategy_and_profile():
    import pytest

    with pytest.raises(llmquant.LLMQuantError, match="unknown strategies"):
        llmquant.compare(None, strategies=("ptq", "magic"), progress=False)
    with pytest.raises(llmquant.LLMQuantError, match="unknown profile"):
        llmquant.compare(None, profile="huge", progress=False)
