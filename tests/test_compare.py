import json
import math

import llmquant
from llmquant.report.runner import Candidate
from llmquant.report.candidates import default_candidates


def _boom(ctx):
    raise RuntimeError("this strategy broke")


def test_compare_tiny_model_writes_report(tmp_path, tiny_folder):
    cands = default_candidates() + [Candidate("QAT", "QAT that fails", _boom)]
    res = llmquant.compare(str(tiny_folder), profile="quick", out_dir=tmp_path / "r", progress=False,
                                  strategies=("ptq", "mixed", "qat"), candidates=cands)
    for f in ("report.md", "report.json", "report.html"):
        assert (tmp_path / "r" / f).stat().st_size > 500
    rows = res["rows"]
    labels = [r["label"] for r in rows]
    assert labels[0] == "fp32" and "QAT that fails" in labels and "bf16 weights" in labels
    for r in rows:
        if r["status"] == "ok":
            for k in ("perplexity", "kl", "top1", "size_bytes", "prefill_tok_s", "decode_tok_s", "build_wall_s"):
                assert math.isfinite(r[k]), (r["label"], k)
    failed = [r for r in rows if r["status"] != "ok"]
    assert [r["label"] for r in failed] == ["QAT that fails"] and "this strategy broke" in failed[0]["error"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| Strategy | Accuracy | Complexity | Performance | Resources |" in md and "this strategy broke" in md
    assert "Smallest within 1%" in md or "No configuration stays within 1%" in md
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert json.loads((tmp_path / "r" / "report.json").read_text())["env"]["torch"].startswith("2.13")
