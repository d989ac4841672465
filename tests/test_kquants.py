"""llama.cpp k-quants (Q2_K .. Q6_K): the super-block codec against the gguf package's own dequantizer, RTN
and GPTQ onto the two-level grids exported bit for bit, and GGUF files written and imported packed."""

import numpy as np
import pytest
import torch

import llmquant
from llmquant.algorithms import rtn_quantize
from llmquant.algorithms.gptq import gptq_quantize, hessian_from_inputs
from llmquant.errors import ExportError, SchemeError
from llmquant.io import ggml_kquants as kq
from llmquant.io.ggml_blocks import BY_NAME, decode, dequantize_bytes, exact_blocks, ggml_type, module_from_blocks
from llmquant.kernels import set_kernel
from llmquant.modules import QuantLinear
from llmquant.schemes import PRESETS, QuantScheme, sqnr_db

from conftest import make_tiny_llama

KTYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# where each type keeps its fp16 super-scales d (and dmin) inside the block (ggml-common.h)
_F16_AT = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _bits(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def _random_blocks(name, n, seed):
    """Random super-blocks: every bit pattern is a valid block once d / dmin are finite fp16 numbers."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, BY_NAME[name].bytes_per_block), dtype=np.uint8)
    for at in _F16_AT[name]:
        raw[:, at:at + 2] = rng.uniform(-0.01, 0.01, n).astype(np.float16).reshape(-1, 1).view(np.uint8)
    return raw


def _qlinear(w, scheme, quantize=rtn_quantize):
    q, s, z = quantize(w, scheme)
    return QuantLinear.from_quantized(q, s, z, scheme)


@pytest.mark.parametrize("name", KTYPES)
def test_codec_round_trips_bytes_and_matches_gguf(name):
    """decode -> encode gives the same bytes back, and a module built from them dequantizes exactly as
    gguf.quants.dequantize does (llama.cpp's dequantize_row_*_K in numpy), bit for bit."""
    from gguf import quants

    raw = _random_blocks(name, 4 * 3, seed=KTYPES.index(name)).reshape(4, -1)  # 4 rows of 768 values
    kt = kq.KTYPES[name]
    u, d, sc, dmin, mc = kq.decode(raw, kt)
    assert np.array_equal(kq.encode(u, d, sc, dmin, mc, kt).reshape(raw.shape), raw)
    assert sc.min() >= kt.sc_range[0] and sc.max() <= kt.sc_range[1] and u.max() < 2**kt.bits
    mod = module_from_blocks(raw, name, 768)
    assert mod.scheme == PRESETS[f"gguf:{name}"]
    ref = quants.dequantize(raw, ggml_type(name))
    assert np.array_equal(_bits(mod.dequantize_weight().numpy()), _bits(ref))
    # and the module writes blocks with the same values back (its scales split into d * sc again: the bytes
    # may differ where a product d * sc has several factorizations, e.g. -d * -sc)
    bt, again = exact_blocks(mod)
    assert bt.name == name and np.array_equal(_bits(quants.dequantize(again, ggml_type(name))), _bits(ref))


@pytest.mark.parametrize("name", KTYPES)
def test_rtn_onto_kquant_exports_bit_for_bit(name):
    scheme = PRESETS[f"gguf:{name}"]
    w = torch.randn(24, 512, generator=torch.Generator().manual_seed(5)) * 0.05
    ql = _qlinear(w, scheme)
    found = exact_blocks(ql)
    assert found is not None and found[0].name == name
    raw = found[1]
    assert raw.nbytes == 24 * 512 // 256 * BY_NAME[name].bytes_per_block
    assert np.array_equal(_bits(dequantize_bytes(raw, name)), _bits(ql.dequantize_weight().numpy()))
    c, s, m = decode(raw, BY_NAME[name], 512)
    assert np.array_equal(c, ql.codes().numpy()) and np.array_equal(_bits(s), _bits(ql.scale.numpy()))


def test_kquant_error_falls_with_bits():
    """RTN SQNR on Gaussian weights rises with the type's bits by about 6 dB a bit (Q2_K's 4-bit scales
    and minima cost it more)."""
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(6))
    snr = {n: sqnr_db(w, _qlinear(w, PRESETS[f"gguf:{n}"]).dequantize_weight()) for n in KTYPES}
    assert snr["Q2_K"] < snr["Q3_K"] < snr["Q4_K"] < snr["Q5_K"] < snr["Q6_K"]
    assert 4.5 < snr["Q6_K"] - snr["Q5_K"] < 8 and 4.5 < snr["Q5_K"] - snr["Q4_K"] < 8
    assert snr["Q4_K"] > sqnr_db(w, _qlinear(w, PRESETS["gguf:Q4_0"]).dequantize_weight())


@pytest.mark.parametrize("name", ("Q4_K", "Q6_K", "Q3_K"))
def test_gptq_onto_kquant_grid_beats_rtn_and_exports(name):
    """GPTQ keeps RTN's two-level scales (a super-block's groups share d) and chooses the codes: lower
    output error on correlated inputs, and the result is still exactly the k-quant block."""
    scheme = PRESETS[f"gguf:{name}"]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2048, 512, generator=g) @ (torch.eye(512) + 0.3 * torch.randn(512, 512, generator=g) / 512**0.5)
    w = torch.randn(32, 512, generator=g) * 0.05
    rtn = _qlinear(w, scheme)
    gq = _qlinear(w, scheme, lambda w, s: gptq_quantize(w, hessian_from_inputs(x), s))
    assert torch.equal(gq.scale, rtn.scale)

    def err(m):
        return float(((x @ (m.dequantize_weight() - w).T) ** 2).mean())

    assert err(gq) < 0.9 * err(rtn)
    bt, raw = exact_blocks(gq)
    assert bt.name == name
    assert np.array_equal(_bits(dequantize_bytes(raw, name)), _bits(gq.dequantize_weight().numpy()))


def test_two_level_scheme_checks():
    with pytest.raises(SchemeError, match="go together"):
        QuantScheme(bits=4, group_size=32, super_group=256)
    with pytest.raises(SchemeError, match="multiple of the group size"):
        QuantScheme(bits=4, group_size=32, super_group=48, sub_scale_bits=6)
    with pytest.raises(SchemeError, match="zero_point 'min'"):
        QuantScheme(bits=4, symmetric=False, group_size=32, super_group=256, sub_scale_bits=6)
    s = PRESETS["gguf:Q4_K"]
    assert QuantScheme.from_json(s.to_json()) == s and s.name == "int4-g32-asymm-s256x6"


def _tiny_kquant():
    m = make_tiny_llama(vocab_size=400, hidden=256)
    llmquant.quantize(m, llmquant.QuantConfig(weight="gguf:Q4_K", targets=("re:.*mlp.(gate|up)_proj", "re:.*self_attn.[qk]_proj")), progress=False)
    llmquant.quantize(m, llmquant.QuantConfig(weight="gguf:Q6_K", targets=("re:.*self_attn.v_proj",)), progress=False)
    llmquant.quantize(m, llmquant.QuantConfig(weight="gguf:Q3_K", targets=("re:.*self_attn.o_proj",)), progress=False)
    llmquant.quantize(m, "gguf:Q8_0", progress=False)  # down_proj: 160 inputs, not a multiple of 256
    set_kernel(m, "reference")
    return m


def _logits(m):
    with torch.no_grad():
        return m(torch.arange(48)[None] * 7 % 400).logits


def test_kquant_gguf_file_round_trip(tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """A model on k-quant grids -> a GGUF file whose tensors dequantize (gguf package) to the modules'
    weights bit for bit; transformers loads it with the same logits; llmquant imports it packed."""
    from gguf import GGUFReader, quants
    from transformers import AutoModelForCausalLM

    from llmquant.models import arch_for, gguf_to_hf_name, rope_row_order

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    m = _tiny_kquant()
    rep = llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "m.gguf", progress=False)
    assert rep.type_counts() == {"Q4_K": 8, "Q6_K": 2, "Q3_K": 2, "Q8_0": 3, "F32": 5} and not rep.inexact
    mods = dict(m.named_modules())
    checked = 0
    for t in GGUFReader(str(tmp_path / "m.gguf")).tensors:
        if "blk" not in t.name or "norm" in t.name:
            continue
        mod = mods[gguf_to_hf_name(arch_for("llama"), t.name)[: -len(".weight")]]
        deq = quants.dequantize(np.asarray(t.data), t.tensor_type)
        if t.name.endswith(("attn_q.weight", "attn_k.weight")):  # undo llama.cpp's rope row order
            un = np.empty_like(deq)
            un[rope_row_order(deq.shape[0], 4 if "attn_q" in t.name else 2)] = deq
            deq = un
        assert np.array_equal(_bits(deq), _bits(mod.dequantize_weight().numpy())), t.name
        checked += 1
    assert checked == 14
    ref = _logits(m)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    assert torch.allclose(_logits(hf), ref, atol=1e-5, rtol=0)

    packed, _ = llmquant.load_model(tmp_path / "m.gguf", packed=True)
    assert packed.llmquant_gguf_import.type_counts() == {"Q4_K": 8, "Q6_K": 2, "Q3_K": 2, "Q8_0": 3}
    for name, mod in packed.named_modules():
        if isinstance(mod, QuantLinear):
            assert mod.scheme == mods[name].scheme and torch.equal(mod.codes(), mods[name].codes()), name
            assert torch.equal(mod.dequantize_weight(), mods[name].dequantize_weight()), name
    set_kernel(packed, "reference")
    assert torch.equal(_logits(packed), ref)


def test_kquant_needs_whole_super_blocks(tmp_path, tiny_bpe_tokenizer):
    m = make_tiny_llama(vocab_size=400, hidden=64)  # 64 inputs: no 256-value super-block fits
    llmquant.quantize(m, "gguf:Q4_K", progress=False)
    with pytest.raises(ExportError, match="super-blocks of 256"):
        llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "x.gguf", progress=False)
    assert not list(tmp_path.iterdir())


def test_llama_cpp_mixture_rules():
    """llama.cpp's Q4_K_M / Q3_K_M / Q2_K per-tensor types (llama_tensor_get_type) for an 8-layer model:
    attn_v and ffn_down in Q6_K where use_more_bits (layers 0, 3, 6, 7), the head (tied) in Q6_K, widths
    that are not multiples of 256 (down_proj: 160) on llama.cpp's fallback types."""
    from llmquant.flows.mixed.llama_presets import more_bits

    m = make_tiny_llama(vocab_size=400, hidden=256, layers=8)
    assert [i for i in range(8) if more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(32) if more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    lay = llmquant.llama_cpp_plan(m, "Q4_K_M").to_dict()["layers"]
    assert lay["model.embed_tokens"] == lay["lm_head"] == "gguf:Q6_K"
    for i in range(8):
        p = f"model.layers.{i}."
        big = i in (0, 3, 6, 7)
        assert lay[p + "self_attn.v_proj"] == ("gguf:Q6_K" if big else "gguf:Q4_K")
        assert lay[p + "mlp.down_proj"] == ("gguf:Q8_0" if big else "gguf:Q5_0")  # Q6_K / Q4_K fallbacks
        assert all(lay[p + r] == "gguf:Q4_K" for r in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj",
                                                        "mlp.gate_proj", "mlp.up_proj"))
    q3 = llmquant.llama_cpp_plan(m, "gguf:Q3_K_M").to_dict()["layers"]
    assert [q3[f"model.layers.{i}.self_attn.v_proj"] for i in (0, 1, 2)] == ["gguf:Q5_K", "gguf:Q5_K", "gguf:Q4_K"]
    assert q3["model.layers.5.self_attn.o_proj"] == "gguf:Q4_K" and q3["model.layers.5.mlp.up_proj"] == "gguf:Q3_K"
    q2 = llmquant.llama_cpp_plan(m, "Q2_K", head=False).to_dict()["layers"]
    assert "lm_head" not in q2 and q2["model.layers.1.self_attn.v_proj"] == "gguf:Q3_K"  # n_head / n_kv = 2 < 4
    assert q2["model.layers.1.mlp.down_proj"] == "gguf:Q4_0"  # Q3_K on 160 columns: IQ4_NL there, Q4_0 here
    with pytest.raises(SchemeError, match="unknown llama.cpp mixture"):
        llmquant.llama_cpp_plan(m, "Q4_K_X")


def test_q4_k_m_model_exports_exactly(tmp_path, tiny_bpe_tokenizer, monkeypatch):
    """quantize(model, "gguf:Q4_K_M") -> GGUF with llama.cpp's mixture, every tensor exact, the tied head
    written once as token_embd (Q6_K); transformers reads the file back with the same logits."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    m = make_tiny_llama(vocab_size=400, hidden=256, layers=8)
    llmquant.quantize(m, "gguf:Q4_K_M", progress=False)
    set_kernel(m, "reference")
    rep = llmquant.export(m, tiny_bpe_tokenizer, tmp_path / "m.gguf", progress=False)
    assert not rep.inexact
    assert rep.type_counts() == {"Q4_K": 44, "Q6_K": 5, "Q8_0": 4, "Q5_0": 4, "F32": 17}
    assert [t.type for t in rep.tensors if t.name == "token_embd.weight"] == ["Q6_K"]
    assert not any(t.name == "output.weight" for t in rep.tensors)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    assert torch.allclose(_logits(hf), _logits(m), atol=1e-5, rtol=0)


def test_cli_quantize_llama_cpp_mixture(tmp_path, tiny_folder, capsys, monkeypatch):
    """`llmquant quantize --scheme gguf:Q4_K_M` applies the mixture for the loaded model (its width, 72, has
    no whole 32-value block: llama.cpp keeps such tensors in fp16, so does the plan; down_proj, 160 wide, gets
    Q4_K's fallback Q5_0 in layer 0, Q6_K's Q8_0 in layer 1 of 2: use_more_bits); other flags refused."""
    import json

    from test_cli import assert_one_line_error, run

    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    rc, o, _ = run(capsys, "quantize", "--model", str(tiny_folder), "--scheme", "gguf:Q4_K_M", "-o", str(tmp_path / "q"))
    assert rc == 0
    man = json.loads((tmp_path / "q" / "llmquant.json").read_text())
    assert man["plan"]["info"] == {"llama_cpp_mixture": "Q4_K_M"}
    layers = dict(man["plan"]["layers"])
    assert {v for k, v in layers.items() if "down_proj" not in k} == {"fp16"}
    assert [layers[f"model.layers.{i}.mlp.down_proj"] for i in (0, 1)] == ["gguf:Q5_0", "gguf:Q8_0"]  # 160 wide
    rc, _, err = run(capsys, "quantize", "--model", str(tiny_folder), "--scheme", "gguf:Q4_K_M", "--bits", "4",
                     "-o", str(tmp_path / "c"))
    assert_one_line_error(rc, err, "llama.cpp's per-tensor mixture")
