"""Every bad input a user can give the CLI ends in one line on stderr and exit code 2, never a traceback.

A table of cases: the problems measured in the issue (argument ranges, outputs that cannot be written,
truncated GGUF files, windows beyond the model's context, missing relative paths, damaged and tampered
folders) and a sweep of each subcommand's arguments (missing, malformed, out of range). Each case runs
``llmquant.cli.main`` in-process on tiny models; placeholders such as ``{q}`` name the fixture files below.
"""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import llmquant
from llmquant.cli import main

from conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _read_only_dir(base: Path) -> Path:
    """A directory nothing can be created in: a chmod'ed one, or (as root, who ignores modes) /sys or /proc."""
    d = base / "read-only"
    d.mkdir()
    d.chmod(0o555)
    for cand in (d, Path("/sys"), Path("/proc")):
        try:
            probe = tempfile.mkdtemp(dir=cand)
        except OSError:
            return cand
        shutil.rmtree(probe)
    raise AssertionError("no read-only directory found to test with")


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_bpe_tokenizer):
    base = tmp_path_factory.mktemp("bad")
    tok = tiny_bpe_tokenizer
    m = make_tiny_llama(vocab_size=400, hidden=64)
    tiny = base / "tiny"
    m.save_pretrained(str(tiny))
    tok.save_pretrained(str(tiny))
    llmquant.quantize(m, "gguf:Q4_0", progress=False)
    q = base / "q"
    llmquant.save(m, tok, q)
    gguf = base / "m.gguf"
    llmquant.export(m, tok, gguf, progress=False)
    raw = gguf.read_bytes()
    (base / "trunc.gguf").write_bytes(raw[: len(raw) // 3])
    (base / "header.gguf").write_bytes(raw[:30])
    (base / "empty.gguf").write_bytes(b"")
    (base / "afile").write_text("not a folder")
    (base / "empty.txt").write_text("")
    (base / "nonempty").mkdir()
    (base / "nonempty" / "x").write_text("x")
    (base / "emptydir").mkdir()
    (base / "workdir" / "models").mkdir(parents=True)  # the cwd of every case: `models/x` is a missing local path
    # a folder whose manifest was edited by hand (a scheme field), one whose manifest is gone, one not JSON
    for name in ("tampered", "nomanifest", "badjson"):
        shutil.copytree(q, base / name)
    man = json.loads((q / "llmquant.json").read_text())
    layer = next(iter(man["quantized_layers"].values()))
    layer["scheme"]["restricted_range"] = not layer["scheme"]["restricted_range"]
    (base / "tampered" / "llmquant.json").write_text(json.dumps(man))
    (base / "nomanifest" / "llmquant.json").unlink()
    (base / "badjson" / "llmquant.json").write_text('{"format": "llmquant", ')
    # a Hugging Face folder whose checkpoint lacks one weight
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny, base / "tiny_missing")
    sd = load_file(str(tiny / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(base / "tiny_missing" / "model.safetensors"), metadata={"format": "pt"})
    names = {p.name.replace(".", "_"): str(p) for p in base.iterdir()}
    names.update(base=str(base), ro=str(_read_only_dir(base)), new=str(base / "out-new"))
    return names


O = ["-o", "{new}"]
T = ["--model", "{tiny}"]
CASES = [
    # ---- the problems measured in the issue ----
    (["eval", "{q}", "--windows", "0"], "--windows: must be an integer >= 1"),
    (["eval", "{q}", "--windows", "-1"], "--windows: must be an integer >= 1"),
    (["eval", "{q}", "--seq-len", "0"], "--seq-len: must be a token count >= 2"),
    (["eval", "{q}", "--seq-len", "9000", "--no-reference"], "longer than the model's context (256 tokens"),
    (["qat", *T, "--lr", "nan", *O], "--lr: expected a finite number"),
    (["generate", "--model", "{q}", "--prompt", ""], "the prompt is empty"),
    (["quantize", *T, "--group-size", "1000000000000", *O], "group size must be an integer from 1 to"),
    (["quantize", *T, "-o", "{afile}/sub"], "is a file, so nothing can be created below it"),
    (["quantize", *T, "-o", "{afile}/a/b/c"], "is a file, so nothing can be created below it"),
    (["quantize", *T, "-o", "{afile}", "--overwrite"], "is an existing file, and llmquant writes a folder"),
    (["quantize", *T, "-o", "{ro}/out"], "is not writable"),
    (["quantize", *T, "-o", "{nonempty}"], "choose another -o or pass --overwrite"),
    (["eval", "--model", "{trunc_gguf}", "--no-reference"], "trunc.gguf is not a valid GGUF file"),
    (["eval", "--model", "{header_gguf}", "--no-reference"], "header.gguf is not a valid GGUF file"),
    (["eval", "--model", "{empty_gguf}", "--no-reference"], "empty.gguf is empty"),
    (["quantize", "--model", "./nope", *O], "model path './nope' does not exist"),
    (["quantize", "--model", "models/x", *O], "model path 'models/x' does not exist"),
    (["quantize", "--model", "../nope/x", *O], "does not exist"),
    (["quantize", "--model", "someorg/somemodel", *O], "does not exist as a local path"),
    (["eval", "{tampered}"], "fails its manifest_sha256 check"),
    (["inspect", "{tampered}"], "fails its manifest_sha256 check"),
    (["eval", "{nomanifest}"], "its llmquant.json manifest is missing"),
    (["quantize", "--model", "{nomanifest}", *O], "its llmquant.json manifest is missing"),
    (["inspect", "{nomanifest}"], "has no llmquant.json"),
    (["inspect", "{badjson}"], "is not valid JSON"),
    (["eval", "--model", "{tiny_missing}", "--no-reference"], "lacks 1 weight(s)"),
    # ---- the parser ----
    ([], "the following arguments are required: command"),
    (["bogus"], "invalid choice: 'bogus'"),
    # ---- quantize ----
    (["quantize"], "required: -o/--output"),
    (["quantize", *O, "--bits", "x"], "--bits: invalid int value"),
    (["quantize", *O, "--bits", "9"], "bits must be an integer from 2 to 8"),
    (["quantize", *O, "--bits", "1"], "bits must be an integer from 2 to 8"),
    (["quantize", *O, "--group-size", "0"], "group size must be"),
    (["quantize", *O, "--group-size", "-5"], "group size must be"),
    (["quantize", *O, "--scheme", "W9"], "unknown scheme preset"),
    (["quantize", *O, "--scheme", "W4G64", "--bits", "4"], "either --scheme"),
    (["quantize", *O, "--granularity", "row"], "invalid choice: 'row'"),
    (["quantize", *O, "--method", "bogus"], "unknown method 'bogus'"),
    (["quantize", *O, "--method", "rtn,dynamic"], "cannot be composed"),
    (["quantize", *O, "--method", ","], "method must be a name"),
    (["quantize", *O, "--method", "gptq", "--calib-samples", "0"], "--calib-samples: must be an integer >= 1"),
    (["quantize", *O, "--method", "gptq", "--seq-len", "1"], "--seq-len: must be a token count >= 2"),
    (["quantize", *O, "--method", "smoothquant", "--alpha", "x"], "--alpha takes a number"),
    (["quantize", *O, "--method", "smoothquant", "--alpha", "2"], "smooth_alpha must be in [0, 1]"),
    (["quantize", *O, "--method", "smoothquant", "--alpha", "nan"], "smooth_alpha must be in [0, 1]"),
    (["quantize", *O, "--method", "dynamic", "--outlier-threshold", "-1"], "--outlier-threshold: must be a number > 0"),
    (["quantize", *O, "--method", "dynamic", "--outlier-threshold", "inf"], "expected a finite number"),
    (["quantize", *O, "--method", "dynamic", "--rotation", "3"], "rotation must be a power of two"),
    (["quantize", *O, "--method", "dynamic", "--weight-bits", "5"], "--weight-bits: invalid choice"),
    (["quantize", *O, "--method", "dynamic", "--bits", "4"], "--method dynamic takes --weight-bits"),
    (["quantize", *O, "--act-order"], "--act-order applies to --method gptq only"),
    (["quantize", *O, "--method", "gptq", "--rotation", "64"], "apply to --method dynamic only"),
    (["quantize", *O, "--plan", "{base}/nope.json"], "does not exist"),
    (["quantize", *O, "--plan", "{afile}"], "the plan is not valid JSON"),
    (["quantize", *O, "--recipe", "{base}/nope"], "neither a preset nor an existing folder"),
    (["quantize", *O, "--recipe", "{emptydir}"], "holds no llmquant.json"),
    (["quantize", *O, "--recipe", "{tampered}"], "fails its manifest_sha256 check"),
    (["quantize", "--model", "{emptydir}", "--stream", *O], "holds no config.json"),
    (["quantize", *O, "--resume"], "no interrupted run to resume"),
    (["quantize", "--model", "{afile}", *O], "is a file but not a .gguf"),
    (["quantize", "--model", "{emptydir}", *O], "not a model folder"),
    (["quantize", *T, "--targets", "model.nothing", *O], "targets name modules that do not exist"),
    (["quantize", *T, "--targets", "re:(", *O], "bad regex 're:('"),
    (["quantize", *T, "--method", "gptq", "--seq-len", "64", "--calib", "{empty_txt}", *O], "empty"),
    (["quantize", *T, "--method", "gptq", "--seq-len", "64", "--calib", "{base}/nope.txt", *O], "nope.txt' does not exist"),
    (["quantize", *T, "--method", "gptq", "--seq-len", "4096", *O], "longer than the model's context"),
    (["quantize", *T, "--workers", "0", *O], "--workers: must be an integer >= 1"),
    (["quantize", *T, "--timeout", "0", *O], "--timeout: must be a number > 0"),
    # ---- imatrix ----
    (["imatrix"], "required: -o/--output"),
    (["imatrix", *T, "--calib-samples", "0", *O], "--calib-samples: must be an integer >= 1"),
    (["imatrix", *T, "-o", "{afile}"], "exists; choose another -o or pass --overwrite"),
    (["imatrix", *T, "--calib", "{base}/nope.txt", *O], "nope.txt' does not exist"),
    (["imatrix", "--model", "{base}/nowhere", *O], "does not exist"),
    # ---- eval ----
    (["eval"], "give either a quantized folder or --model"),
    (["eval", "{q}", "--model", "{tiny}"], "give either a quantized folder or --model"),
    (["eval", "{q}", "--windows", "x"], "--windows: expected an integer"),
    (["eval", "{q}", "--seq-len", "1"], "--seq-len: must be a token count >= 2"),
    (["eval", "{q}", "--no-reference", "--text", "{empty_txt}"], "empty"),
    (["eval", "{q}", "--no-reference", "--text", "{base}/nope.txt"], "nope.txt' does not exist"),
    (["eval", "{q}", "--reference", "{base}/nope"], "does not exist"),
    (["eval", "{afile}"], "is a file but not a .gguf"),
    (["eval", "{base}/nowhere"], "does not exist"),
    # ---- inspect ----
    (["inspect"], "required: folder"),
    (["inspect", "{base}/nowhere"], "not a folder saved by llmquant"),
    (["inspect", "{tiny}"], "has no llmquant.json"),
    # ---- compare ----
    (["compare", "--profile", "huge"], "--profile: invalid choice"),
    (["compare", "--threads", "0"], "--threads: must be a thread count from 1 to 1024"),
    (["compare", "--threads", "100000"], "--threads: must be a thread count from 1 to 1024"),
    (["compare", "-o", "{afile}"], "is an existing file, and llmquant writes a folder"),
    (["compare", *T, "--strategies", "bogus", "-o", "{new}"], "unknown strategies"),
    (["compare", *T, "--with-llama-cpp", "Q9_Z", "-o", "{new}"], "llama.cpp file type 'Q9_Z' unknown"),
    # ---- sensitivity / plan ----
    (["sensitivity", "--method", "exact"], "--method: invalid choice"),
    (["sensitivity", "--windows", "0"], "--windows: must be an integer >= 1"),
    (["sensitivity", "--seq-len", "1"], "--seq-len: must be a token count >= 2"),
    (["sensitivity", "--samples", "0"], "--samples: must be an integer >= 1"),
    (["sensitivity", "--top", "0"], "--top: must be an integer >= 1"),
    (["sensitivity", "--json", "{afile}/x.json"], "is a file, so nothing can be created below it"),
    (["sensitivity", "--chart", "{ro}/x.png"], "is not writable"),
    (["sensitivity", *T, "--candidates", "W9", "--windows", "1", "--seq-len", "16"], "unknown format 'W9'"),
    (["plan", *O], "give exactly one of --target-bits"),
    (["plan", *O, "--target-bits", "4", "--max-size", "60MB"], "give exactly one of --target-bits"),
    (["plan", *O, "--target-bits", "nan"], "--target-bits: expected a finite number"),
    (["plan", *O, "--target-bits", "-1"], "--target-bits: must be a number > 0"),
    (["plan", *O, "--max-size", "lots"], "cannot read size 'lots'"),
    (["plan", "--target-bits", "4", "-o", "{afile}/plan.json"], "is a file, so nothing can be created below it"),
    (["plan", "--target-bits", "4", "-o", "{emptydir}"], "is an existing folder, and llmquant writes a file"),
    # ---- export ----
    (["export", "{q}", "-o", "{new}"], "required: --format"),
    (["export", "{q}", "--format", "onnx", "-o", "{new}"], "--format: invalid choice"),
    (["export", "{q}", "--format", "gguf", "-o", "{afile}"], "exists; choose another -o or pass --overwrite"),
    (["export", "{q}", "--format", "gguf", "-o", "{emptydir}", "--overwrite"], "is an existing folder"),
    (["export", "{q}", "--format", "compressed-tensors", "-o", "{afile}", "--overwrite"], "is an existing file"),
    (["export", "{q}", "--format", "compressed-tensors", "--requant", "Q4_0", "-o", "{new}"], "apply to --format gguf only"),
    (["export", "{q}", "--format", "gguf", "--tokenizer-gguf", "{base}/nope.gguf", "-o", "{new}"], "does not exist"),
    (["export", "{q}", "--format", "gguf", "--tokenizer-gguf", "{trunc_gguf}", "-o", "{new}"], "not a valid GGUF file"),
    (["export", "{q}", "--format", "gguf", "--requant", "Q3_K", "-o", "{new}"], "Q4_0, Q4_1"),
    (["export", "{q}", "--format", "gguf", "--float-type", "F7", "-o", "{new}"], "float type 'F7' unknown"),
    (["export", "{tiny}", "--packed", "--format", "gguf", "-o", "{new}"], "packed loading reads GGUF files only"),
    (["export", "{tampered}", "--format", "gguf", "-o", "{new}"], "fails its manifest_sha256 check"),
    # ---- generate / chat ----
    (["generate"], "give the text to continue: --prompt TEXT"),
    (["generate", "--prompts-file", "{base}/nope.txt"], "cannot read --prompts-file"),
    (["generate", "--prompts-file", "{empty_txt}"], "has no prompt (every line is blank)"),
    (["generate", "--prompt", "hi", "--prompt", " "], "the prompt is empty"),
    (["generate", "--prompt", "   "], "the prompt is empty"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens: must be an integer >= 1"),
    (["generate", "--model", "{q}", "--prompt", "hi", "--max-new-tokens", "100000"], "exceeds the model's context of 256"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature: must be a number >= 0"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature: expected a finite number"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p: must be a number in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "--top-p: must be a number in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-k", "-1"], "--top-k: must be an integer >= 0"),
    (["generate", "--prompt", "hi", "--threads", "0"], "--threads: must be a thread count"),
    (["generate", "--prompt", "hi", "--threads", "1000000"], "--threads: must be a thread count"),
    (["generate", "--prompt", "hi", "--seed", "-1"], "--seed: must be a seed from 0"),
    (["generate", "--model", "{q}", "--prompt", "hi", "--kernel", "bogus"], "unknown kernel 'bogus'"),
    (["generate", "--model", "{nomanifest}", "--prompt", "hi"], "its llmquant.json manifest is missing"),
    (["chat", "--max-new-tokens", "0"], "--max-new-tokens: must be an integer >= 1"),
    (["chat", "--top-p", "2"], "--top-p: must be a number in (0, 1]"),
    # ---- demo ----
    (["demo", "--windows", "0"], "--windows: must be an integer >= 1"),
    (["demo", "--schemes", "W9"], "unknown scheme preset 'W9'"),
    (["demo", "--schemes", ","], "--schemes is empty"),
    # ---- qat ----
    (["qat"], "required: -o/--output"),
    (["qat", *O, "--lr", "0"], "--lr: must be a number > 0"),
    (["qat", *O, "--lr=-1e-4"], "--lr: must be a number > 0"),
    (["qat", *O, "--lr", "inf"], "--lr: expected a finite number"),
    (["qat", *O, "--steps", "0"], "--steps: must be an integer >= 1"),
    (["qat", *O, "--seq-len", "1"], "--seq-len: must be a token count >= 2"),
    (["qat", *O, "--batch", "0"], "--batch: must be an integer >= 1"),
    (["qat", *O, "--grad-accum", "0"], "--grad-accum: must be an integer >= 1"),
    (["qat", *O, "--lora-rank", "-1"], "--lora-rank: must be an integer >= 0"),
    (["qat", *O, "--max-minutes", "0"], "--max-minutes: must be a number > 0"),
    (["qat", *O, "--checkpoint-every", "0"], "--checkpoint-every: must be an integer >= 1"),
    (["qat", *O, "--loss", "mse"], "--loss: invalid choice"),
    (["qat", *O, "--bits", "9"], "bits must be an integer from 2 to 8"),
    (["qat", *O, "--group-size", "0"], "group size must be"),
    (["qat", "-o", "{afile}", "--overwrite"], "is an existing file, and llmquant writes a folder"),
    (["qat", *O, "--checkpoint-dir", "{afile}/ck"], "is a file, so nothing can be created below it"),
    (["qat", "-o", "{ro}/out"], "is not writable"),
]


def _fill(argv, paths):
    return [a.format(**paths) for a in argv]


@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(c[0])[:70] or "no-args" for c in CASES])
def test_bad_input_is_one_clean_line(argv, expected, paths, capsys, monkeypatch):
    monkeypatch.chdir(Path(paths["base"]) / "workdir")
    monkeypatch.setenv("LLMQUANT_CACHE", str(Path(paths["base"]) / "cache"))
    rc = main(_fill(argv, paths))
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("llmquant: error:")]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and expected in lines[0], err
    assert not Path(paths["new"]).exists()  # nothing written


def test_every_subcommand_is_swept():
    """The table reaches every subcommand the parser has."""
    from llmquant.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) <= {c[0][0] for c in CASES if c[0]}


def test_file_is_never_turned_into_a_folder(paths, capsys):
    """`-o FILE --overwrite` is refused before any work, and the file is left as it was."""
    before = Path(paths["afile"]).read_text()
    assert main(["quantize", "--model", paths["tiny"], "-o", paths["afile"], "--overwrite"]) == 2
    assert Path(paths["afile"]).is_file() and Path(paths["afile"]).read_text() == before
    assert not list(Path(paths["base"]).glob(".afile*"))  # no temporary or .old leftovers beside it


def test_refused_outputs_leave_nothing_and_good_ones_pass(tmp_path):
    from llmquant.errors import OutputExistsError, OutputLocationError
    from llmquant.io.paths import check_output_location

    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputLocationError, match="is a file"):
        check_output_location(tmp_path / "f" / "sub")
    with pytest.raises(OutputLocationError, match="existing file"):
        check_output_location(tmp_path / "f", overwrite=True)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_output_location(tmp_path / "f", kind="file")
    assert check_output_location(tmp_path / "f", overwrite=True, kind="file") == tmp_path / "f"
    assert check_output_location(tmp_path / "a" / "b" / "c") == tmp_path / "a" / "b" / "c"
    (tmp_path / "d").mkdir()
    assert check_output_location(tmp_path / "d") == tmp_path / "d"  # an empty folder may be written into
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]  # probes removed, nothing created


def test_library_faces_of_the_same_checks(paths):
    """The checks live in the library too, not only in the parser."""
    from llmquant.errors import EvaluationError, GenerationError, SchemeError
    from llmquant.schemes import QATParams, QuantScheme

    model, tok = llmquant.load_model(paths["q"])
    with pytest.raises(EvaluationError, match="windows"):
        llmquant.evaluate(model, windows=0, progress=False)
    with pytest.raises(EvaluationError, match="context"):
        llmquant.evaluate(model, windows=1, seq_len=257, progress=False)
    with pytest.raises(GenerationError, match="empty"):
        llmquant.generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=1)
    with pytest.raises(GenerationError, match="finite"):
        llmquant.generate(model, "hi", max_new_tokens=1, do_sample=True, temperature=float("nan"))
    for bad in (float("nan"), float("inf"), 0.0, -1.0, "1e-4"):
        with pytest.raises(SchemeError, match="lr"):
            QATParams(lr=bad)
    with pytest.raises(SchemeError, match="group size"):
        QuantScheme(group_size=10**12)
    # a group wider than the row is one group of the row: no padding up to the group size
    w = torch.randn(4, 64)
    wide = llmquant.schemes.primitives.compute_qparams(w, QuantScheme(group_size=1 << 20))
    row = llmquant.schemes.primitives.compute_qparams(w, QuantScheme(granularity="channel"))
    assert torch.equal(wide[0], row[0])
