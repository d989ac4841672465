"""GGUF export and import: exact GGML blocks (checked with the gguf package's own dequantizer), a file that
transformers loads with the same logits, packed import, and the refusal for schemes that do not map."""

import numpy as np
import pytest
import torch

import llmquant
from llmquant.errors import ExportError
from llmquant.io.ggml_blocks import BLOCK_TYPES, decode, dequantize_bytes, encode, exact_blocks, ggml_type, module_from_blocks
from llmquant.kernels import set_kernel
from llmquant.modules import QuantLinear
from llmquant.schemes import PRESETS, QuantScheme

from conftest import make_tiny_llama


def _bits(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("bt", [b for b in BLOCK_TYPES if not b.kquant], ids=lambda b: b.name)
def test_block_codec_matches_gguf_package(bt):
    """decode(gguf's bytes) -> encode gives the same bytes; a module built from them dequantizes like gguf."""
    from gguf import quants

    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(1)).numpy()
    raw = quants.quantize(w, ggml_type(bt.name))
    c, d, m = decode(raw, bt, 96)
    assert np.array_equal(encode(c, d, m, bt), raw)
    mod = module_from_blocks(raw, bt.name, 96)
    assert np.array_equal(_bits(mod.dequantize_weight().numpy()), _bits(quants.dequantize(raw, ggml_type(bt.name))))


def _qlinear(w, scheme):
    from llmquant.algorithms import rtn_quantize

    q, s, z = rtn_quantize(w, scheme)
    return QuantLinear.from_quantized(q, s, z, scheme)


@pytest.mark.parametrize(
    "scheme,expected",
    [
        ("gguf:Q4_0", "Q4_0"),
        ("gguf:Q4_1", "Q4_1"),
        ("gguf:Q5_0", "Q5_0"),
        ("gguf:Q5_1", "Q5_1"),
        ("gguf:Q8_0", "Q8_0"),
        (QuantScheme(bits=4, group_size=32, scale_dtype="float16"), "Q4_0"),  # full grid, |x|max/7.5
        (QuantScheme(bits=4, symmetric=False, group_size=32, scale_dtype="float16"), "Q5_0"),  # q - z in [-15, 15]
        (QuantScheme(bits=3, group_size=32, scale_dtype="float16"), "Q4_0"),
    ],
)
def test_exact_block_type_bit_for_bit(scheme, expected):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(2)) * 0.1
    ql = _qlinear(w, llmquant.schemes.resolve_scheme(scheme))
    bt, raw = exact_blocks(ql)
    assert bt.name == expected
    assert np.array_equal(_bits(dequantize_bytes(raw, bt.name)), _bits(ql.dequantize_weight().numpy()))


def test_q4_0_preset_is_llama_cpp_grid():
    """gguf:Q4_0 puts each block's signed extreme on code -8 with d = x_e / -8, as llama.cpp's quantizer does:
    the values differ from llama.cpp's only where the fp16 rounding of d moves a rounding decision."""
    from gguf import quants

    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    ours = _qlinear(w, PRESETS["gguf:Q4_0"]).dequantize_weight()
    ref = torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), ggml_type("Q4_0")), ggml_type("Q4_0")))
    assert (ours != ref).float().mean() < 0.005
    assert torch.allclose(((ours - w) ** 2).mean(), ((ref - w) ** 2).mean(), rtol=1e-3)


def _tiny_quantized():
    m = make_tiny_llama(vocab_size=400, hidden=64)
    llmquant.quantize(m, llmquant.QuantConfig(weight="gguf:Q4_0", targets=("re:.*mlp.(gate|up)_proj",)), progress=False)
    llmquant.quantize(m, llmquant.QuantConfig(weight="gguf:Q4_1", targets=("re:.*self_attn.[qk]_proj",)), progress=False)
    llmquant.quantize(m, llmquant.QuantConfig(weight="gguf:Q5_0", targets=("re:.*self_attn.[vo]_proj",)), progress=False)
    llmquant.quantize(m, "gguf:Q8_0", progress=False)  # the rest: down_proj
    set_kernel(m, "reference")  # exact dequantized weights (no fp16 rounding of the fbgemm path)
    return m


def _logits(m):
    with torch.no_grad():
        return m(torch.arange(48)[None] * 7 % 400).logits


def test_gguf_file_round_trip(tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """QuantLinear -> GGUF blocks -> gguf.quants.dequantize == dequantize_weight, bit for bit; transformers
    loads the file (gguf_file=) with the same logits and tokenizer; llmquant imports it packed."""
    from gguf import GGUFReader, quants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmquant.models import arch_for, gguf_to_hf_name, rope_row_order

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    m = _tiny_quantized()
    rep = llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "m.gguf", progress=False)
    assert rep.type_counts() == {"Q4_0": 4, "Q4_1": 4, "Q5_0": 4, "Q8_0": 3, "F32": 5} and not rep.inexact
    arch = arch_for("llama")
    mods = dict(m.named_modules())
    for t in GGUFReader(str(tmp_path / "m.gguf")).tensors:
        mod = mods[gguf_to_hf_name(arch, t.name)[: -len(".weight")]] if "blk" in t.name and "norm" not in t.name else None
        if mod is None:
            continue
        deq = quants.dequantize(np.asarray(t.data), t.tensor_type)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):  # undo llama.cpp's rope row order
            heads = 4 if "attn_q" in t.name else 2
            un = np.empty_like(deq)
            un[rope_row_order(deq.shape[0], heads)] = deq
            deq = un
        assert np.array_equal(_bits(deq), _bits(mod.dequantize_weight().numpy())), t.name

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    ref = _logits(m)
    assert torch.allclose(_logits(hf), ref, atol=1e-5, rtol=0)
    tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "def quantize(x): return round(x / s) <|im_end|>"
    assert tok(text).input_ids == tiny_bpe_tokenizer(text).input_ids

    packed, _ = llmquant.load_model(tmp_path / "m.gguf", packed=True)
    info = packed.llmquant_gguf_import
    assert info.type_counts() == {"Q4_0": 4, "Q4_1": 4, "Q5_0": 4, "Q8_0": 3} and not info.kept_float
    assert info.embedding == ("model.embed_tokens", "lm_head") and packed.lm_head.qweight is packed.model.embed_tokens.qweight
    for name, mod in packed.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(mod.codes(), mods[name].codes()) or mod.scheme.bits != mods[name].scheme.bits
            assert torch.equal(mod.dequantize_weight(), mods[name].dequantize_weight()), name
    set_kernel(packed, "reference")
    assert torch.equal(_logits(packed), ref)


def test_unmappable_scheme_refused_or_requantized(tmp_path, tiny_bpe_tokenizer):
    m = make_tiny_llama(vocab_size=400, hidden=64)
    llmquant.quantize(m, "W4G64", progress=False)  # groups of 64, fp32 scales: no GGML type holds that
    with pytest.raises(ExportError, match=r"no exact GGUF block type.*gguf:Q4_0 -> Q4_0.*--requant"):
        llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "x.gguf", progress=False)
    assert not list(tmp_path.iterdir())  # nothing half-written
    rep = llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "x.gguf", requant="Q4_0", progress=False)
    assert len(rep.inexact) == 14 and all(t.type == "Q4_0" for t in rep.inexact)
    # re-quantizing int4 values onto another int4 grid costs about one grid's error: finite, well below signal
    assert all(12 < t.sqnr_db < 60 and t.max_abs_err > 0 for t in rep.inexact)
    with pytest.raises(ExportError, match="Q4_0, Q4_1"):
        llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "y.gguf", requant="Q3_K", progress=False)


def test_cli_export_errors_are_one_line(tmp_path, tiny_bpe_tokenizer, capsys):
    from llmquant.cli import main

    m = make_tiny_llama(vocab_size=400, hidden=64)
    llmquant.quantize(m, "W4G64", progress=False)
    llmquant.save(m, tiny_bpe_tokenizer, tmp_path / "q")
    assert main(["export", str(tmp_path / "q"), "--format", "gguf", "-o", str(tmp_path / "q.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmquant: error:") and "\n" not in err and "--requant" in err
    assert main(["export", str(tmp_path / "q"), "--format", "gguf", "--requant", "Q8_0", "-o", str(tmp_path / "q.gguf")]) == 0
    assert "re-quantized, not exact" in capsys.readouterr().out


@pytest.mark.integration
def test_default_model_q4_1_file_imports_packed_and_exports_its_own_bytes():
    """The default model's Q4_1 file loads as packed int4 whose values equal transformers' dequantized load,
    and writing those modules back gives the file's own block bytes (q/k permutation included)."""
    from gguf import GGUFReader

    from llmquant.io import default_model_file
    from llmquant.models import arch_for, hf_to_gguf_name, rope_row_order

    model, tok = llmquant.load_model(packed=True)
    info = model.llmquant_gguf_import
    # the linears' Q4_1 blocks, and the tied embedding/head's Q8_0 blocks (one QuantEmbedding + QuantLinear pair)
    assert info.type_counts() == {"Q4_1": 210, "Q8_0": 1} and not info.kept_float
    assert model.lm_head.qweight is model.model.embed_tokens.qweight and model.lm_head.scheme.name == "int8-g32-r"
    float_model, _ = llmquant.load_model()
    fw = dict(float_model.named_parameters())
    tensors = {t.name: t for t in GGUFReader(str(default_model_file())).tensors}
    arch = arch_for("llama")
    for name, mod in model.named_modules():
        if not (isinstance(mod, QuantLinear) and name.startswith(("model.layers.0.", "model.layers.29."))):
            continue
        assert mod.scheme == PRESETS["gguf:Q4_1"] and mod.qweight.numel() == mod.in_features * mod.out_features // 2
        assert torch.equal(mod.dequantize_weight(), fw[f"{name}.weight"])
        bt, raw = exact_blocks(mod)
        t = tensors[hf_to_gguf_name(arch, f"{name}.weight")]
        if name.endswith(("q_proj", "k_proj")):
            raw = raw[rope_row_order(raw.shape[0], 9 if name.endswith("q_proj") else 3)]
        assert bt.name == "Q4_1" and np.array_equal(raw, np.asarray(t.data))


def test_hf_tokenizer_conversion_reproduces_shipped_gguf(tokenizer, tmp_path):
    """Converting SmolLM2's Hugging Face tokenizer gives the shipped GGUF's tokenizer keys exactly."""
    import gguf

    from llmquant.io import default_model_file
    from llmquant.io.gguf_tokenizer import add_hf_bpe_tokenizer

    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    add_hf_bpe_tokenizer(w, tokenizer, 49152, pre="smollm")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    shipped = gguf.GGUFReader(str(default_model_file())).fields
    ours = gguf.GGUFReader(str(tmp_path / "t.gguf")).fields
    keys = [k for k in shipped if k.startswith("tokenizer.")]
    assert len(keys) >= 10 and set(k for k in ours if k.startswith("tokenizer.")) == set(keys)
    for k in keys:
        assert ours[k].contents() == shipped[k].contents(), k


def test_activation_quantized_model_refused(tmp_path, tiny_bpe_tokenizer):
    m = make_tiny_llama(vocab_size=400, hidden=64)
    a = QuantScheme(bits=8, granularity="token", dynamic=True)
    llmquant.quantize(m, llmquant.QuantConfig(weight="gguf:Q8_0", activation=a), progress=False)
    with pytest.raises(ExportError, match="weight-only.*compressed-tensors"):
        llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "a.gguf", progress=False)
    # llama.cpp's own activation rounding (Q8_0 blocks of 32) is what llama.cpp does anyway: accepted
    m = make_tiny_llama(vocab_size=400, hidden=64)
    llmquant.quantize(m, llmquant.QuantConfig(weight="gguf:Q4_0", activation="gguf:Q8_0-act"), progress=False)
    rep = llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "b.gguf", progress=False)
    assert rep.type_counts()["Q4_0"] == 14 and not rep.inexact
