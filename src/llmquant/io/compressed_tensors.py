"""Export to the compressed-tensors checkpoint layout (vllm-project/compressed-tensors), which transformers
(with the ``compressed-tensors`` package) and vLLM load with ``from_pretrained(DIR)``.

Layout per quantized linear ``L`` (x_hat = (q - zp) * scale, codes on the signed grid [-2^(b-1), 2^(b-1)-1]):
  ``pack-quantized`` (2..7 bits): ``L.weight_packed`` int32 (out, ceil(in*b/32)) holding ``q + 2^(b-1)``
  densely, 32 values per b words, per row; ``L.weight_scale`` (out, groups); ``L.weight_shape`` [out, in];
  asymmetric: ``L.weight_zero_point`` int32, ``zp + 2^(b-1)`` packed the same way along the output dim.
  ``naive-quantized`` / ``int-quantized`` (8 bits; int-quantized when activations are int8 too):
  ``L.weight`` int8, ``L.weight_scale``, asymmetric ``L.weight_zero_point`` int8; static activations add
  ``L.input_scale`` (and ``L.input_zero_point``).
llmquant's unsigned stored codes ``q - qmin`` are exactly these offset codes for both symmetric and
asymmetric schemes, so values carry over bit for bit. Scales are written in float32 (widening fp16/bf16
scales is exact), because compressed-tensors dequantizes in the scale's dtype.
A quantized embedding is written as its dequantized float weight (compressed-tensors quantizes linears
only); a quantized output head is a quantized linear like the others.
Not representable, refused with a message: float zero points / float minima (the format's zero points are
integers) and ragged groups (compressed-tensors requires in_features to be a multiple of the group size;
the layer is not padded, since padding would change the model's shapes).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import ExportError, OutputExistsError
from ..models import tied_lm_head
from ..modules import QuantEmbedding, QuantLinear
from ..packing import pack

log = logging.getLogger(__name__)

_STRATEGY = {"group": "group", "channel": "channel", "tensor": "tensor", "token": "token"}


def _args(s, is_activation: bool = False) -> dict:
    d = {
        "num_bits": s.bits,
        "type": "int",
        "symmetric": s.symmetric,
        "strategy": _STRATEGY[s.granularity],
        "group_size": s.group_size if s.granularity == "group" else None,
        "dynamic": bool(s.dynamic) if is_activation else False,
        "actorder": None,
        "observer": None if (is_activation and s.dynamic) else "minmax",
        "observer_kwargs": {},
    }
    return d


def _pack_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (rows, cols) -> int32 (rows, ceil(cols*bits/32)), per row as compressed-tensors packs."""
    rows, cols = u.shape
    padded = -(-cols // 32) * 32
    if padded != cols:
        u = torch.cat([u, u.new_zeros(rows, padded - cols)], dim=1)
    words = pack(u.to(torch.uint8), bits).view(torch.int32).reshape(rows, padded * bits // 32)
    return words[:, : -(-cols * bits // 32)].contiguous()


def _check(name: str, m: QuantLinear) -> str | None:
    s = m.scheme
    if not s.symmetric and s.zero_point != "int":
        return f"{name}: zero_point={s.zero_point!r} (compressed-tensors zero points are integers; use an int zero point or a symmetric scheme)"
    if s.granularity == "group" and m.in_features % s.group_size:
        return (f"{name}: in_features {m.in_features} is not a multiple of group size {s.group_size} (ragged last group); "
                f"use a group size dividing {m.in_features} or per-channel")
    a = m.activation_scheme
    if a is not None and (a.bits != 8 or s.bits != 8):
        return f"{name}: activation quantization is exported for W8A8 only"
    return None


def _layer_tensors(name: str, m: QuantLinear) -> dict[str, torch.Tensor]:
    s = m.scheme
    out: dict[str, torch.Tensor] = {}
    u = (m.codes().to(torch.int32) - s.qmin)  # llmquant's unsigned codes
    offset = 1 << (s.bits - 1)
    scale = m.scale.float()
    if s.granularity == "tensor":
        scale = scale.reshape(1)
    out[f"{name}.weight_scale"] = scale.contiguous()
    z = m.zero_point()
    if s.bits == 8:
        out[f"{name}.weight"] = (u - offset).to(torch.int8)
        if z is not None:
            out[f"{name}.weight_zero_point"] = (z.to(torch.int32) - s.qmin - offset).to(torch.int8).reshape(scale.shape)
    else:
        out[f"{name}.weight_packed"] = _pack_rows(u, s.bits)
        out[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features], dtype=torch.int64)
        if z is not None:
            zu = (z.to(torch.int32) - s.qmin).reshape(m.out_features, -1)
            out[f"{name}.weight_zero_point"] = _pack_rows(zu.t().contiguous(), s.bits).t().contiguous()
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.detach().contiguous()
    a = m.activation_scheme
    if a is not None and not a.dynamic:
        out[f"{name}.input_scale"] = m.input_scale.float().reshape(1)
        if getattr(m, "input_zero", None) is not None:
            out[f"{name}.input_zero_point"] = m.input_zero.round().to(torch.int8).reshape(1)
    return out


def _format(m: QuantLinear) -> str:
    if m.scheme.bits < 8:
        return "pack-quantized"
    return "int-quantized" if m.activation_scheme is not None else "naive-quantized"


def _conv1d_origin(model: nn.Module, names) -> list[str]:
    """The quantized layers that the model's own class builds as Conv1D (weight in x out), not nn.Linear."""
    from ..models import is_linear

    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError, TypeError, AttributeError, ImportError):
        return []
    out = []
    for n in names:
        try:
            m = fresh.get_submodule(n)
        except AttributeError:
            continue
        if is_linear(m) and not isinstance(m, nn.Linear):
            out.append(n)
    return out


def export_compressed_tensors(model: nn.Module, tokenizer, folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` to ``folder`` in the compressed-tensors layout; see the module doc."""
    from safetensors.torch import save_file

    out = Path(folder).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputExistsError(f"{str(out)!r} exists and is not empty; choose another -o or pass --overwrite")
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    out_head = getattr(model, "get_output_embeddings", lambda: None)()
    heads = {n: quant.pop(n) for n in [n for n, m in quant.items() if m is out_head]}
    tied = tied_lm_head(model)
    if not quant:
        raise ExportError("the model has no quantized layers; quantize it first (llmquant quantize)")
    from ..modules.experts import ExpertLinears

    conv1d = _conv1d_origin(model, quant)
    if conv1d:
        raise ExportError(f"{conv1d[0]} (and {len(conv1d) - 1} more) are GPT-2-style Conv1D modules in "
                          f"{type(model).__name__}'s own code, quantized as the linears they compute; compressed-tensors "
                          "readers replace nn.Linear modules only, so they would not load them: save the llmquant folder "
                          "instead")
    experts = [n for n, m in model.named_modules() if isinstance(m, ExpertLinears)]
    if experts:
        raise ExportError(f"{type(model).__name__}'s mixture-of-experts weights are quantized one linear per expert "
                          f"({experts[0]}.gate_up_proj.0, ...); compressed-tensors readers expect transformers' fused "
                          "experts, which this export does not write yet: save the llmquant folder instead")
    problems = [p for n, m in quant.items() if (p := _check(n, m))]
    if problems:
        raise ExportError(f"{len(problems)} layer(s) cannot be written as compressed-tensors: " + "; ".join(problems[:3]))

    tensors: dict[str, torch.Tensor] = {}
    groups: dict[tuple, list[str]] = defaultdict(list)
    for n, m in heads.items():
        if not tied:
            tensors[f"{n}.weight"] = m.dequantize_weight(dtype=torch.float32).contiguous().cpu()
            if m.bias is not None:
                tensors[f"{n}.bias"] = m.bias.detach().float().contiguous().cpu()
    for n, m in quant.items():
        tensors.update(_layer_tensors(n, m))
        a = m.activation_scheme
        groups[(m.scheme.to_json(), None if a is None else a.to_json(), _format(m))].append(n)
    # a quantized embedding and output head (QuantConfig.head) have no compressed-tensors form that
    # transformers loads: their dequantized weights, which are what the model computes, as float tensors
    # (a tied pair once, tied again by config.tie_word_embeddings)
    embeddings = {n: m for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    for n, m in embeddings.items():
        tensors[f"{n}.weight"] = m.dequantize_weight(dtype=torch.float32).contiguous().cpu()
    skip = tuple(f"{n}." for n in (*quant, *embeddings, *heads))
    seen = set()
    for n, t in model.state_dict().items():
        if n.startswith(skip):
            continue
        if t.numel() and t.data_ptr() in seen:
            continue  # tied lm_head: transformers re-ties it from config.tie_word_embeddings
        seen.add(t.data_ptr())
        tensors[n] = t.detach().contiguous().cpu()

    config_groups = {}
    formats = set()
    for i, ((w_json, a_json, fmt), names) in enumerate(groups.items()):
        from ..schemes import QuantScheme

        w = QuantScheme.from_json(w_json)
        a = None if a_json is None else QuantScheme.from_json(a_json)
        config_groups[f"group_{i}"] = {
            "targets": sorted(names),
            "weights": _args(w),
            "input_activations": None if a is None else _args(a, is_activation=True),
            "output_activations": None,
            "format": fmt,
        }
        formats.add(fmt)
    qcfg = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": [],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "producer": "llmquant"})
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        if tied:
            cfg["tie_word_embeddings"] = True
        cfg["quantization_config"] = qcfg
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(str(tmp))
            except Exception as e:  # noqa: BLE001
                log.warning("generation config not saved: %s", e)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote compressed-tensors checkpoint %s (%d quantized layers, %s)", out, len(quant), qcfg["format"])
    return out
