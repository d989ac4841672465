"""`llmquant generate` and `llmquant chat` on a tiny quantized model: the same tokens as the Python API."""

import io

import torch

import llmquant
from llmquant.cli import main


def test_generate_and_chat(tmp_path, tiny_folder, capsys, monkeypatch):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_folder), "--scheme", "W8", "-o", str(out)]) == 0
    capsys.readouterr()
    argv = ["--model", str(out), "--max-new-tokens", "6", "--threads", "1", "--stats"]
    assert main(["generate", *argv, "--prompt", "def f(x):"]) == 0
    o, e = capsys.readouterr()
    model, tok = llmquant.load(out)
    ids = llmquant.generate(model, "def f(x):", 6, threads=1)
    assert o == tok.decode(ids[0], skip_special_tokens=True) + "\n"
    assert "threads 1" in e and "tok/s" in e
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhow are you?\n/exit\n"))
    assert main(["chat", *argv, "--system", "Be brief."]) == 0
    o, e = capsys.readouterr()
    assert len(o.strip().splitlines()) >= 2 and e.count("threads 1") == 2
    assert main(["generate", *argv, "--prompt", "def f(x):", "--temperature", "0", "--no-stream"]) == 0  # 0: greedy
    assert capsys.readouterr()[0] == tok.decode(ids[0], skip_special_tokens=True) + "\n"
    # several prompts: one batch, each continuation after its prompt, as the Python API's batch gives them
    pf = tmp_path / "prompts.txt"
    pf.write_text("class A:\n\nimport os\n")
    assert main(["generate", *argv, "--prompt", "def f(x):", "--prompts-file", str(pf)]) == 0
    o, e = capsys.readouterr()
    prompts = ["def f(x):", "class A:", "import os"]
    batch = llmquant.generate(model, prompts, 6, threads=1)
    want = "".join(f"--- [{i + 1}/3] {p}\n{tok.decode(r, skip_special_tokens=True)}\n"
                   for i, (p, r) in enumerate(zip(prompts, batch)))
    assert o == want and "over 3 sequences" in e
    rc = main(["generate", *argv, "--prompt", "x", "--temperature", "-1"])
    assert rc == 2 and "temperature" in capsys.readouterr().err
    torch.set_num_threads(2)
