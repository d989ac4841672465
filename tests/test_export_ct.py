"""compressed-tensors export: transformers (with the compressed-tensors package) loads the folder and gives
llmquant's logits; the packed layout is compressed-tensors' own; unrepresentable schemes are refused."""

import json

import pytest
import torch

import llmquant
from llmquant.errors import ExportError
from llmquant.kernels import set_kernel
from llmquant.modules import QuantLinear

from conftest import make_tiny_llama


def _logits(m):
    with torch.no_grad():
        return m(torch.arange(40)[None] * 7 % 1000).logits


def _quantized(*presets, hidden=64):
    m = make_tiny_llama(vocab_size=1000, hidden=hidden)
    if len(presets) == 2:  # mixed: mlp on the first scheme, attention on the second
        llmquant.quantize(m, llmquant.QuantConfig(weight=presets[0], targets=("re:.*mlp.*",)), progress=False)
    llmquant.quantize(m, presets[-1], progress=False)
    set_kernel(m, "reference")
    return m


@pytest.mark.parametrize("presets,fmt", [(("W4G32",), "pack-quantized"), (("W3G32", "gguf:Q4_0"), "pack-quantized"), (("W8",), "naive-quantized")])
def test_transformers_loads_same_logits(tmp_path, presets, fmt):
    from transformers import AutoModelForCausalLM

    m = _quantized(*presets)
    llmquant.export(m, None, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == fmt
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    assert torch.allclose(_logits(hf), _logits(m), atol=1e-5, rtol=0)


def test_asymmetric_layout_and_logits(tmp_path):
    """Asymmetric int4: codes and packed zero points are compressed-tensors' own layout (checked with its
    unpacker); transformers 5.24 + compressed-tensors 0.20 load it with dequantize=True (their compressed
    module path expects unpacked zero points, see vllm-project/llm-compressor#1618)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    m = _quantized("W4G32A")
    llmquant.export(m, None, tmp_path / "ct", format="compressed-tensors")
    sd = load_file(str(tmp_path / "ct" / "model.safetensors"))
    lin: QuantLinear = m.model.layers[0].mlp.down_proj
    name = "model.layers.0.mlp.down_proj"
    q = unpack_from_int32(sd[f"{name}.weight_packed"], 4, torch.Size([lin.out_features, lin.in_features]))
    zp = unpack_from_int32(sd[f"{name}.weight_zero_point"], 4, torch.Size(lin.scale.shape), packed_dim=0)
    assert torch.equal(q.to(torch.int16) + 8, lin.codes())
    assert torch.equal(zp.to(torch.int16) + 8, lin.zero_point())
    hf = AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "ct"), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    assert torch.allclose(_logits(hf), _logits(m), atol=1e-5, rtol=0)


def test_unrepresentable_refused(tmp_path):
    m = _quantized("W4G64", hidden=72)  # 72 = 64 + a ragged group of 8
    with pytest.raises(ExportError, match="not a multiple of group size 64.*ragged"):
        llmquant.export(m, None, tmp_path / "a", format="compressed-tensors")
    m = _quantized("gguf:Q4_1")  # a float minimum has no integer zero point
    with pytest.raises(ExportError, match="zero_point='min'"):
        llmquant.export(m, None, tmp_path / "b", format="compressed-tensors")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_w8a8_dynamic_int_quantized(tmp_path):
    """W8A8 with dynamic per-token int8 activations: int-quantized; transformers fake-quantizes the inputs
    the same way (scale max|x| / 127.5 per token), so logits agree to float tolerance."""
    from transformers import AutoModelForCausalLM

    from llmquant.schemes import QuantScheme

    m = make_tiny_llama(vocab_size=1000, hidden=64)
    a = QuantScheme(bits=8, granularity="token", dynamic=True)
    llmquant.quantize(m, llmquant.QuantConfig(weight="W8", activation=a), progress=False)
    llmquant.export(m, None, tmp_path / "ct", format="compressed-tensors")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized" and qc["config_groups"]["group_0"]["input_activations"]["dynamic"]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), dtype=torch.float32)
    assert hf.model.layers[0].mlp.down_proj.quantization_scheme.input_activations.strategy == "token"
    # against llmquant's reference numerics: an int8 GEMM kernel's fp32 order (1e-6 per layer) moves some
    # activation across a rounding boundary of the next layer's int8 grid, and whole-model logits then differ
    # by up to 0.06 on this tiny model (measured with int8_int_mm)
    from llmquant.kernels import set_kernel

    set_kernel(m, "dequant_cached")
    assert torch.allclose(_logits(hf), _logits(m), atol=1e-4, rtol=0)
