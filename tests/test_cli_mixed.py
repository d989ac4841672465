"""CLI for mixed precision: sensitivity, plan, quantize --plan, and their one-line errors."""

import json


from test_cli import assert_one_line_error, run

FAST = ("--windows", "1", "--seq-len", "32", "--samples", "1", "--candidates", "bf16,W8,W4G32,W3G32,W2G32")


def test_sensitivity_plan_quantize(tmp_path, tiny_folder, capsys, monkeypatch):
    global FAST
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "calib.txt"  # a short text keeps tokenization out of the test's time
    text.write_text(" ".join(f"word{i % 97} and the number {i}." for i in range(1500)))
    FAST = FAST + ("--text", str(text))
    rc, o, _ = run(capsys, "sensitivity", "--model", str(tiny_folder), *FAST, "--top", "3", "--json", str(tmp_path / "s.json"))
    assert rc == 0 and "W2G32" in o and "14 layers x 5 candidates" in o and (tmp_path / "s.json").is_file()
    plan = tmp_path / "plan.json"
    rc, o, _ = run(capsys, "plan", "--model", str(tiny_folder), *FAST, "--target-bits", "4.5", "-o", str(plan),
                   "--chart", str(tmp_path / "chart.png"))
    assert rc == 0 and plan.is_file() and (tmp_path / "chart.png").stat().st_size > 1000
    d = json.loads(plan.read_text())
    assert len(d["layers"]) == 14 and d["info"]["bits_per_weight"] <= 4.5
    out = tmp_path / "q"
    rc, o, _ = run(capsys, "quantize", "--model", str(tiny_folder), "--plan", str(plan), "-o", str(out))
    assert rc == 0 and (out / "llmquant.json").is_file()
    man = json.loads((out / "llmquant.json").read_text())
    assert man["plan"]["layers"] == [[k, v] for k, v in d["layers"].items()]
    # GPTQ candidates measured by the K-FAC estimate: the plan is made by GPTQ (its file says so) and
    # quantize --plan calibrates for it without being told the method again
    gplan = tmp_path / "gplan.json"
    rc, o, _ = run(capsys, "plan", "--model", str(tiny_folder), *FAST, "--method", "kfac", "--quantizer", "gptq",
                   "--windows", "4", "--target-bits", "4.6", "-o", str(gplan))  # cross-fitted: two folds
    assert rc == 0 and "gptq" in o
    gd = json.loads(gplan.read_text())
    assert gd["method"] == "gptq" and gd["params"]["act_order"] == "full" and gd["info"]["sensitivity"]["method"] == "kfac"
    rc, o, _ = run(capsys, "quantize", "--model", str(tiny_folder), "--plan", str(gplan), "--calib", str(text),
                   "--calib-samples", "2", "--seq-len", "32", "-o", str(tmp_path / "gq"))
    assert rc == 0 and json.loads((tmp_path / "gq" / "llmquant.json").read_text())["plan"]["method"] == "gptq"
    aplan = tmp_path / "aplan.json"  # AWQ candidates: the same, made and applied by AWQ
    rc, o, _ = run(capsys, "plan", "--model", str(tiny_folder), *FAST, "--method", "kfac", "--quantizer", "awq",
                   "--windows", "4", "--target-bits", "4.6", "-o", str(aplan))
    assert rc == 0 and json.loads(aplan.read_text())["method"] == "awq"
    rc, o, _ = run(capsys, "quantize", "--model", str(tiny_folder), "--plan", str(aplan), "--calib", str(text),
                   "--calib-samples", "2", "--seq-len", "32", "-o", str(tmp_path / "aq"))
    assert rc == 0 and json.loads((tmp_path / "aq" / "llmquant.json").read_text())["plan"]["method"] == "awq"
    rc, _, err = run(capsys, "plan", "--model", str(tiny_folder), *FAST, "--quantizer", "gptq", "--target-bits", "4.6",
                     "-o", str(tmp_path / "p4.json"))
    assert_one_line_error(rc, err, "needs method='kfac'")
    # a hand-written plan naming a layer that does not exist, and impossible budgets: one line, exit 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": {"model.layers.7.mlp.up_proj": "W8"}}))
    assert_one_line_error(*run(capsys, "quantize", "--model", str(tiny_folder), "--plan", str(bad), "-o", str(tmp_path / "b"))[::2],
                          "not Linear/Embedding")
    rc, _, err = run(capsys, "plan", "--model", str(tiny_folder), *FAST, "--target-bits", "2.0", "-o", str(tmp_path / "p2.json"))
    assert_one_line_error(rc, err, "below the smallest candidate plan")
    rc, _, err = run(capsys, "plan", "--model", str(tiny_folder), *FAST, "--max-size", "9GB", "-o", str(tmp_path / "p3.json"))
    assert_one_line_error(rc, err, "above the model's fp32 size")
    rc, _, err = run(capsys, "quantize", "--model", str(tiny_folder), "--plan", str(plan), "--bits", "4", "-o", str(tmp_path / "c"))
    assert_one_line_error(rc, err, "--plan names each layer's format")
