"""llama.cpp's quantization mixtures (``llama-quantize`` file types such as Q4_K_M) as llmquant plans.

llama.cpp gives each tensor a type from the file type, the tensor's role and its layer
(``llama_tensor_get_type`` in ``src/llama-quant.cpp``). For the roles of a Llama-style model and the
k-quant mixtures (no MoE, no 70B special case):

===========  ========  ==============================  ================================  ==========
file type    default   attn_v                          ffn_down                          attn_output
===========  ========  ==============================  ================================  ==========
Q2_K         Q2_K      Q4_K if n_head/n_kv >= 4, Q3_K  Q3_K                              Q3_K
Q3_K_M       Q3_K      Q5_K in layers 0-1, else Q4_K   Q5_K in the first n/16, Q4_K      Q4_K
Q4_K_M       Q4_K      Q6_K where more_bits, Q4_K      Q6_K where more_bits, Q4_K        Q4_K
Q5_K_M       Q5_K      Q6_K where more_bits, Q5_K      Q6_K where more_bits, Q5_K        Q5_K
Q6_K         Q6_K      Q6_K                            Q6_K                              Q6_K
===========  ========  ==============================  ================================  ==========

``more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (integer division). The output head
(and a tied embedding, which shares its tensor) is Q6_K, or Q8_0 when its width is not a multiple of 256;
an untied embedding takes the default type. A k-quant on a tensor whose width is not a multiple of 256
falls back as llama.cpp does: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and Q2_K / Q3_K -> IQ4_NL,
which llmquant cannot write: Q4_0 (the same 4.5 bits per weight, a linear grid) takes its place.
A width not a multiple of 32 keeps the tensor in fp16.
"""

from __future__ import annotations

import re

import torch.nn as nn

from ...errors import SchemeError
from ...models import arch_for, config_value, hf_to_gguf_name, tied_lm_head
from ...schemes import Plan, gguf_bytes
from ..heads import head_names
from .apply import plan_targets

MIXTURES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K")
_DEFAULT = {"Q2_K": "Q2_K", "Q3_K_M": "Q3_K", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.weight$")


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _role_type(mixture: str, role: str, i: int, n: int, n_gqa: float) -> str:
    base = _DEFAULT[mixture]
    if role == "attn_v":
        if mixture == "Q2_K":
            return "Q4_K" if n_gqa >= 4 else "Q3_K"
        if mixture == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if mixture in ("Q4_K_M", "Q5_K_M") and more_bits(i, n):
            return "Q6_K"
    elif role == "ffn_down":
        if mixture == "Q2_K":
            return "Q3_K"
        if mixture == "Q3_K_M":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if mixture in ("Q4_K_M", "Q5_K_M") and more_bits(i, n):
            return "Q6_K"
    elif role == "attn_output":
        if mixture == "Q2_K":
            return "Q3_K"
        if mixture == "Q3_K_M":
            return "Q4_K"
    return base


def _fit(ggml: str, width: int) -> str:
    """The type llama.cpp writes for ``ggml`` on rows of ``width`` values (its shape fallback)."""
    if ggml.endswith("_K") and width % 256:
        ggml = _FALLBACK[ggml]
    return "fp16" if width % 32 else ggml


def llama_cpp_plan(model: nn.Module, mixture: str = "Q4_K_M", *, head: bool = True, method: str = "rtn",
                   params=None) -> Plan:
    """The plan that gives every Linear (and, with ``head``, the output head and embedding) of ``model``
    the GGUF type llama.cpp's ``llama-quantize`` would give it for ``mixture`` (``Q4_K_M``, ...), as
    ``gguf:`` schemes so that the result exports to GGUF exactly. ``method="gptq"`` (with ``params``, a
    GPTQParams or dict) makes the decoder linears by GPTQ onto those types, in one calibrated pass."""
    key = mixture.upper().removeprefix("GGUF:")
    if key not in MIXTURES:
        raise SchemeError(f"unknown llama.cpp mixture {mixture!r}; known: {', '.join('gguf:' + m for m in MIXTURES)}")
    arch = arch_for(model)
    if arch is None or arch.gguf is None:
        raise SchemeError("llama.cpp mixtures need a model family llama.cpp knows (GGUF tensor names); "
                          f"{type(model).__name__} is not one")
    cfg = model.config
    heads = config_value(cfg, ("num_attention_heads",)) or 1
    n_gqa = heads / (config_value(cfg, ("num_key_value_heads",)) or heads)
    n_layers = int(config_value(cfg, ("num_hidden_layers",)))
    emb_head = head_names(model)
    layers: dict[str, str] = {}
    for name, mod in plan_targets(model).items():
        width = mod.in_features if isinstance(mod, nn.Linear) else mod.embedding_dim
        if name in emb_head:
            if not head:
                continue
            is_output = name == emb_head[-1] and isinstance(mod, nn.Linear)
            if is_output or tied_lm_head(model):
                ggml = "Q6_K" if width % 256 == 0 else "Q8_0"
            else:
                ggml = _DEFAULT[key]
        else:
            gg = hf_to_gguf_name(arch, f"{name}.weight")
            m = _BLK.match(gg or "")
            if m is None:
                continue  # not a tensor llama.cpp quantizes by these rules
            ggml = _role_type(key, m.group(2), int(m.group(1)), n_layers, n_gqa)
        t = _fit(ggml, width)
        layers[name] = t if t == "fp16" else f"gguf:{t}"
    return Plan.from_layers(layers, info={"llama_cpp_mixture": key}, method=method, params=params)


def llama_cpp_bytes(model: nn.Module, mixture: str = "Q4_K_M") -> int:
    """The tensor bytes of the GGUF file llama.cpp's ``llama-quantize`` writes for ``model`` in ``mixture``
    (what :func:`llama_cpp_plan` gives each tensor, the rest in F32 as llama.cpp keeps norms; a tied head
    once), computed from the shapes: a planner budget of "the size of llama.cpp's Q4_K_M" without running
    llama.cpp (``plan_from_sensitivity(sens, max_size=llama_cpp_bytes(model, "Q4_K_M"))``)."""
    plan = llama_cpp_plan(model, mixture)
    targets = plan_targets(model)
    assigned = plan.resolve(targets, head_names(model))
    total, seen = 0, set()
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            fmt = assigned.get(name) if pname == "weight" and name in targets else None
            n = gguf_bytes(fmt, *p.shape) if fmt is not None and p.dim() == 2 else None
            total += n if n is not None else p.numel() * 4
    return total
