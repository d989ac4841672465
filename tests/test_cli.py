"""The CLI turns every error a user can cause into one line on stderr and exit code 2."""

import json
import subprocess
import sys

import pytest
import torch

from llmquant.cli import main

from conftest import make_tiny_llama


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, pattern):
    assert rc == 2
    lines = [l for l in err.strip().splitlines() if l.startswith("llmquant: error")]
    assert len(lines) == 1 and pattern in lines[0], err
    assert "Traceback" not in err


def test_quantize_eval_inspect(tmp_path, tiny_folder, capsys):
    out = tmp_path / "q"
    rc, o, _ = run(capsys, "quantize", "--model", str(tiny_folder), "--bits", "4", "--group-size", "32", "--asym", "-o", str(out))
    assert rc == 0 and "int4-g32-asym" in o and (out / "llmquant.json").is_file()
    rc, o, _ = run(capsys, "eval", str(out), "--windows", "1", "--seq-len", "64", "--json")
    res = json.loads(o)
    assert rc == 0 and res["kl"] > 0 and 0 < res["top1"] <= 1 and res["perplexity"] > 1
    per_layer = 2 * 72 * 72 + 2 * 36 * 72 + 3 * 72 * 160  # q, o; k, v (2 kv heads of 18); gate, up, down
    assert res["size"]["quantized_params"] == 2 * per_layer + 49152 * 72  # + the tied embedding/head (int8)
    rc, o, _ = run(capsys, "inspect", str(out))
    assert rc == 0 and "model.layers.0.mlp.down_proj" in o and "int4-g32-asym" in o


def test_missing_model_path(tmp_path, capsys):
    rc, _, err = run(capsys, "quantize", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "does not exist")


def test_hub_id_refused(tmp_path, capsys):
    rc, _, err = run(capsys, "quantize", "--model", "HuggingFaceTB/SmolLM2-135M", "-o", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "local")


def test_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x.txt").write_text("hi")
    rc, _, err = run(capsys, "quantize", "--model", str(tmp_path / "m"), "-o", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "not a model folder")


@pytest.mark.parametrize("args,pattern", [(["--bits", "9"], "bits must be"), (["--bits", "1"], "bits must be"),
                                          (["--group-size", "0"], "group size"), (["--scheme", "W9"], "unknown scheme")])
def test_bad_schemes(tmp_path, capsys, args, pattern):
    rc, _, err = run(capsys, "quantize", *args, "-o", str(tmp_path / "o"))
    assert_one_line_error(rc, err, pattern)
    assert not (tmp_path / "o").exists()


def test_nan_weights(tmp_path, capsys, tokenizer):
    m = make_tiny_llama()
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[3, 4] = float("inf")
    m.save_pretrained(str(tmp_path / "bad"))
    tokenizer.save_pretrained(str(tmp_path / "bad"))
    rc, _, err = run(capsys, "quantize", "--model", str(tmp_path / "bad"), "-o", str(tmp_path / "o"))
    assert_one_line_error(rc, err, "NaN/Inf")
    assert not (tmp_path / "o").exists()


def test_empty_text_file(tmp_path, tiny_folder, capsys):
    (tmp_path / "e.txt").write_text("")
    rc, _, err = run(capsys, "eval", "--model", str(tiny_folder), "--text", str(tmp_path / "e.txt"))
    assert_one_line_error(rc, err, "empty")


def test_output_exists_and_corrupt_folder(tmp_path, tiny_folder, capsys):
    out = tmp_path / "q"
    assert run(capsys, "quantize", "--model", str(tiny_folder), "--scheme", "W8", "-o", str(out))[0] == 0
    before = (out / "model.safetensors").read_bytes()
    rc, _, err = run(capsys, "quantize", "--model", str(tiny_folder), "--scheme", "W4G64", "-o", str(out))
    assert_one_line_error(rc, err, "--overwrite")
    assert (out / "model.safetensors").read_bytes() == before
    (out / "model.safetensors").write_bytes(before[:1000])
    rc, _, err = run(capsys, "eval", str(out))
    assert_one_line_error(rc, err, "truncated or corrupt")
    man = json.loads((out / "llmquant.json").read_text())
    (out / "model.safetensors").write_bytes(before)
    name = next(iter(man["tensors"]))
    man["tensors"][name]["sha256"] = "0" * 64
    (out / "llmquant.json").write_text(json.dumps(man))
    rc, _, err = run(capsys, "eval", str(out))
    assert_one_line_error(rc, err, "manifest_sha256 check")  # the manifest was edited after saving
    from llmquant.io.manifest_schema import manifest_digest

    man["manifest_sha256"] = manifest_digest(man)  # re-signed: the tensor's own sha256 is what fails
    (out / "llmquant.json").write_text(json.dumps(man))
    rc, _, err = run(capsys, "eval", str(out))
    assert_one_line_error(rc, err, "sha256")


def test_subprocess_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "llmquant.cli", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "not a folder saved by llmquant" in p.stderr
