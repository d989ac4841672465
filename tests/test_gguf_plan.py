"""The planner choosing llama.cpp types: GGUF byte counts (one definition, equal to the gguf package's
block sizes), k-quants only where a layer's rows fill whole super-blocks, budgets in GGUF tensor bytes, and
a planned model whose exported GGUF holds exactly the planned types and bytes."""

import json

import gguf
import numpy as np
import pytest
import torch

import llmquant
from llmquant.errors import BudgetError
from llmquant.flows.mixed import plan_from_sensitivity
from llmquant.io.ggml_blocks import BLOCK_TYPES
from llmquant.schemes import GGUF_CANDIDATES, format_bytes, gguf_bytes, gguf_type, resolve_format

from conftest import make_tiny_llama
from test_cli import assert_one_line_error, run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gguf_bytes_are_the_gguf_block_sizes():
    for name in GGUF_CANDIDATES:
        fmt = resolve_format(name)
        t = gguf.GGMLQuantizationType[name.removeprefix("gguf:")]
        values, nbytes = gguf.GGML_QUANT_SIZES[t]
        assert gguf_type(fmt, 512) == t.name
        assert gguf_bytes(fmt, 3, 512) == 3 * 512 // values * nbytes
        assert gguf_bytes(fmt, 3, 512 + 32) == (None if values == 256 else 3 * 544 // values * nbytes)
        if values == 32:  # the 32-value types: llmquant's folder stores exactly those bytes
            assert gguf_bytes(fmt, 3, 512) == format_bytes(fmt, 3, 512)
        else:  # k-quants: llmquant keeps the two-level scales as float32 products, GGUF as fp16 x integers
            assert gguf_bytes(fmt, 3, 512) < format_bytes(fmt, 3, 512)
    for bt in BLOCK_TYPES:  # the exporter's block table comes from the same definition
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[bt.name]] == (bt.block_values, bt.bytes_per_block)
    assert gguf_bytes(resolve_format("fp16"), 3, 72) == 3 * 72 * 2 and gguf_type(resolve_format("bf16")) == "BF16"
    assert gguf_type(resolve_format("W4G64")) is None and gguf_bytes(resolve_format("W4G64"), 3, 512) is None
    assert gguf_type(resolve_format("gguf:Q8_0-act")) is None


def _mixed_width_model():
    """Attention and MLP inputs 160 wide (32-value blocks only), down_proj inputs 512 wide (k-quants fit)."""
    return make_tiny_llama(vocab_size=400, hidden=160, intermediate=512, heads=5, kv_heads=1)


def test_gguf_plan_fits_rows_and_budget_and_exports_exactly(tmp_path, tiny_bpe_tokenizer):
    model = _mixed_width_model()
    ids = torch.randint(0, 400, (3000,), generator=torch.Generator().manual_seed(1))
    sens = llmquant.sensitivity(model, ids, GGUF_CANDIDATES, include_head=True, windows=2, seq_len=64, samples=1,
                                cache=False, progress=False)
    nweights = sum(u.numel for u in sens.units)
    plan = plan_from_sensitivity(sens, target_bits=4.6)
    info = plan.info
    assert info["bytes"] == "GGUF tensor data" and "GGUF tensor bytes" in info["budget"]
    assert info["planned_bytes"] <= 4.6 * nweights / 8
    layers = plan.to_dict()["layers"]
    assert len(layers) == 2 * 7 + 2  # the decoder linears, and the tied head with its embedding
    kq = {k: v for k, v in layers.items() if v.endswith("_K")}
    assert kq and all(k.endswith("down_proj") for k in kq)  # the only rows 512 wide
    # a tighter budget gives less (predicted) damage-for-bytes: fewer bytes, more damage
    tight = plan_from_sensitivity(sens, target_bits=4.2)
    assert tight.info["planned_bytes"] < info["planned_bytes"] and tight.info["predicted_kl"] > info["predicted_kl"]
    # counted as folder bytes, the k-quants cost more (float32 scales), so the same budget buys less
    folder = plan_from_sensitivity(sens, target_bits=4.6, size="folder")
    assert folder.info["bytes"] == "llmquant folder" and folder.info["predicted_kl"] >= info["predicted_kl"]

    llmquant.quantize(model, plan, progress=False)
    out = tmp_path / "planned.gguf"
    llmquant.export(model, tiny_bpe_tokenizer, out, progress=False)
    from llmquant.models import hf_to_gguf_name, arch_for

    arch = arch_for(model)
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    got = 0
    for name, fmt in layers.items():
        if name == "lm_head":
            continue  # tied: stored once, as the embedding
        t = tensors[hf_to_gguf_name(arch, f"{name}.weight")]
        assert t.tensor_type.name == fmt.removeprefix("gguf:"), name
        got += int(t.n_bytes)
    assert got == info["planned_bytes"]


def test_gguf_plan_errors():
    model = _mixed_width_model()
    ids = torch.randint(0, 400, (2000,), generator=torch.Generator().manual_seed(1))
    sens = llmquant.sensitivity(model, ids, ("gguf:Q4_K", "gguf:Q2_K"), windows=1, seq_len=32, samples=1,
                                cache=False, progress=False)
    with pytest.raises(BudgetError, match=r"no candidate GGUF type holds .*rows of 160"):
        plan_from_sensitivity(sens, target_bits=4.0)
    assert sens.damage[0] == [float("inf")] * 2  # not measured: no GGUF file could hold them
    with pytest.raises(BudgetError, match=r"no candidate holds .*rows of 160"):
        plan_from_sensitivity(sens, target_bits=7.0, size="folder")
    sens = llmquant.sensitivity(model, ids, ("W8", "W4G32"), windows=1, seq_len=32, samples=1, cache=False,
                                progress=False)
    with pytest.raises(BudgetError, match="no candidate is a GGUF type"):
        plan_from_sensitivity(sens, target_bits=5.0, size="gguf")
    assert plan_from_sensitivity(sens, target_bits=5.0).info["bytes"] == "llmquant folder"  # auto


def test_cli_plan_gguf(tmp_path, tiny_bpe_tokenizer, capsys, monkeypatch):
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    _mixed_width_model().save_pretrained(str(folder))
    tiny_bpe_tokenizer.save_pretrained(str(folder))
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and the number {i}." for i in range(600)))
    fast = ("--windows", "1", "--seq-len", "32", "--samples", "1", "--text", str(text))
    rc, o, _ = run(capsys, "plan", "--model", str(folder), *fast, "--candidates", "gguf", "--include-head",
                   "--target-bits", "4.8", "-o", str(tmp_path / "p.json"))
    assert rc == 0, o
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["info"]["bytes"] == "GGUF tensor data" and all(v.startswith("gguf:") for v in d["layers"].values())
    # a budget of "llama.cpp's Q3_K_M for this model"
    rc, o, _ = run(capsys, "plan", "--model", str(folder), *fast, "--candidates", "gguf", "--include-head",
                   "--max-size", "gguf:Q3_K_M", "-o", str(tmp_path / "q3.json"))
    assert rc == 0 and "llama.cpp's Q3_K_M file" in o, o
    from llmquant.flows.mixed import llama_cpp_bytes

    q3 = json.loads((tmp_path / "q3.json").read_text())["info"]
    assert q3["total_bytes"] <= llama_cpp_bytes(_mixed_width_model(), "Q3_K_M")
    rc, _, err = run(capsys, "plan", "--model", str(folder), *fast, "--max-size", "gguf:Q9_K", "-o", str(tmp_path / "x.json"))
    assert_one_line_error(rc, err, "not a llama.cpp mixture")
    # widths no GGUF block type fills (72): one line naming the layer
    narrow = tmp_path / "narrow"
    make_tiny_llama(vocab_size=400).save_pretrained(str(narrow))
    tiny_bpe_tokenizer.save_pretrained(str(narrow))
    rc, _, err = run(capsys, "plan", "--model", str(narrow), *fast, "--candidates", "gguf", "--target-bits", "5",
                     "-o", str(tmp_path / "n.json"))
    assert_one_line_error(rc, err, "rows of 72")
    assert not (tmp_path / "n.json").exists()
    assert np.isfinite(d["info"]["predicted_kl"])


@pytest.mark.parametrize("mixture", ["Q4_K_M", "Q2_K"])
def test_llama_cpp_bytes_is_the_size_of_llama_cpps_own_file(mixture, tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """The budget "as large as llama.cpp's Q4_K_M" computed from shapes equals the tensor bytes of the file
    llama.cpp's own quantizer writes for the model (fallback types included: on rows of 160, Q5_0 for
    Q4_K_M; IQ4_NL, the size of Q4_0, for Q2_K)."""
    from llmquant.eval.llama_cpp import llama_cpp_quantize
    from llmquant.flows.mixed import llama_cpp_bytes

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    model = _mixed_width_model()
    llmquant.export(model, tiny_bpe_tokenizer, tmp_path / "f32.gguf", float_type="F32", progress=False)
    llama_cpp_quantize(tmp_path / "f32.gguf", tmp_path / "q.gguf", mixture)
    theirs = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors)
    assert llama_cpp_bytes(model, mixture) == theirs
