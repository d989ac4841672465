"""The per-architecture record: one :class:`ArchSpec` per model family, holding every per-family fact.

- Model-level paths (decoder layers, embedding, final norm, head), and which norm (or linear) feeds which
  linears: ``norm_to_linears`` / ``linear_to_linears``, paths relative to one decoder layer. A scale folded
  into the source (a norm's weight, or a linear's output rows) can be undone in the inputs of the listed
  linears, which is what SmoothQuant and AWQ need.
- ``norm_offset``: the norms' kind: a norm's output is ``n(x) * (norm_offset + weight) (+ bias)``; 0 for
  RMSNorm and LayerNorm, 1 for Gemma's RMSNorm. A scale folded into a norm scales ``norm_offset + weight``.
- Pairs not declared are found by tracing one decoder layer (:mod:`llmquant.models.trace`), which also
  checks declared ones: use that for facts that depend on the config (parallel or sequential blocks).
- ``modules``: the paths inside one decoder layer of a pre-norm attention + gated-MLP block. The pairs
  above, the lean runtime's module lookups and the GGUF tensor names are all derived from them.
- ``runtime``: set when the lean runtime (:mod:`llmquant.runtime`) runs the family.
- ``gguf``: set when GGUF export/import know the family (llama.cpp architecture name, metadata keys, tensor
  names, row orders, and what a config must satisfy for llama.cpp to compute what transformers does).
  Tensor names follow llama.cpp's ``gguf-py/gguf/tensor_mapping.py``; each family's facts were checked by
  loading a tiny exported model in llama.cpp (``tests/test_gguf_families.py``).

The table of families is :data:`llmquant.models.arch.ARCHS`; adding a family is adding an entry there.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Pairs = tuple[tuple[str, tuple[str, ...]], ...]


@dataclass(frozen=True)
class LayerModules:
    """Paths, relative to one decoder layer, of a pre-norm attention + gated-MLP (SwiGLU) block.
    ``q_norm``/``k_norm``: per-head norms of q and k (Qwen3), None for families without them."""

    input_norm: str = "input_layernorm"
    post_norm: str = "post_attention_layernorm"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    q_norm: str | None = None
    k_norm: str | None = None

    @property
    def qkv(self) -> tuple[str, str, str]:
        return (self.q, self.k, self.v)

    @property
    def gate_up(self) -> tuple[str, str]:
        return (self.gate, self.up)

    def norm_to_linears(self) -> Pairs:
        return ((self.input_norm, self.qkv), (self.post_norm, self.gate_up))

    def linear_to_linears(self) -> Pairs:
        # v feeds o only when each head's values map to their own slice of o's input: true without GQA
        # replication of v's rows, so only the up -> down pair is listed.
        return ((self.up, (self.down,)),)


@dataclass(frozen=True)
class RuntimeSpec:
    """What the lean runtime needs beyond ``ArchSpec.modules`` to run a pre-norm, RoPE, GQA decoder with a
    SwiGLU MLP without the model's own forward. A family whose forward differs in other ways (multipliers,
    layers without RoPE, ...) has none, and the runtime refuses it with a clear error."""

    rotary: str = "model.rotary_emb"  # model-level path of the rotary embedding module
    act_attr: str = "hidden_act"  # config attribute naming the MLP activation
    sliding_window_attr: str | None = None  # config attribute: attention window (None: full attention)


@dataclass(frozen=True)
class GGUFSpec:
    """llama.cpp facts of a family. Tensor names come from the record's module paths (``modules``, for
    llama-like blocks) and from ``layer_tensors`` / ``model_tensors`` (any block); a listed module's weight
    and bias both map. Norm weights (GGUF names containing ``norm``) are written as ``ArchSpec.norm_offset +
    weight``: llama.cpp's norms scale by the stored weight alone (its converter adds 1 for Gemma)."""

    arch: str  # GGUF general.architecture
    # (GGUF key without the "<arch>." prefix, source, kind: "u32" | "f32" | "bool" | "str"); the source is candidate
    # config attribute paths (first found wins) or a function of the config; a None value is not written
    metadata: tuple[tuple[str, Any, str], ...]
    # (LayerModules role, config attribute holding the head count its rows are permuted with): llama.cpp's
    # llama converter reorders q/k rows from HF's rotate-half layout to interleaved rope pairs.
    permute_rows: tuple[tuple[str, str], ...] = ()
    biases: tuple[str, ...] = ()  # LayerModules roles whose bias has a GGUF name
    layer_tensors: tuple[tuple[str, str], ...] = ()  # (module path in a decoder layer, GGUF name after "blk.{i}.")
    model_tensors: tuple[tuple[str, str], ...] = ()  # (model-level module path, GGUF name) beyond embed/norm/head
    # (module path in a decoder layer, source of the query head count, source of the key/value group count):
    # a fused q/k/v whose rows HF groups per key/value head ([q heads of the group, k, v] per group) and
    # llama.cpp wants as all q rows, then all k rows, then all v rows (GPT-NeoX, Falcon)
    grouped_qkv: tuple[tuple[str, Any, Any], ...] = ()
    # module paths in a decoder layer whose HF weight is (in, out) (GPT-2's Conv1D): GGUF holds it transposed
    transposed: tuple[str, ...] = ()
    # llama.cpp's loader needs output.weight even when the head is tied to the embedding: written twice
    head_required: bool = False
    # (what llama.cpp needs, in words; predicate on the model): export refuses a model failing one
    requires: tuple[tuple[str, Callable[[Any], bool]], ...] = ()
    # (GGUF tensor name, function of the config giving a float32 array or None): tensors llama.cpp's converter
    # computes from the config (Llama 3's rope frequency factors, ``rope_freqs.weight``)
    computed_tensors: tuple[tuple[str, Callable[[Any], Any]], ...] = ()


@dataclass(frozen=True)
class ArchSpec:
    """One model family. ``norm_to_linears``/``linear_to_linears`` default to ``modules``' pairs when
    neither is given; ``runtime`` needs ``modules``."""

    model_types: tuple[str, ...]  # Hugging Face config.model_type values
    layers: str = "model.layers"  # path of the ModuleList of decoder layers
    embed: str = "model.embed_tokens"  # input embedding
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    norm_to_linears: Pairs = ()
    linear_to_linears: Pairs = ()
    norm_offset: float = 0.0  # a norm scales by norm_offset + weight (Gemma: 1)
    modules: LayerModules | None = None
    runtime: RuntimeSpec | None = None
    gguf: GGUFSpec | None = None
    # linears inside a decoder layer kept in float unless targets name them (a MoE router that is a Linear)
    float_modules: tuple[str, ...] = ()

    def __post_init__(self):
        if self.runtime is not None and self.modules is None:
            raise ValueError(f"ArchSpec {self.model_types}: runtime facts need modules=LayerModules(...)")
        if self.modules is not None and not self.norm_to_linears and not self.linear_to_linears:
            object.__setattr__(self, "norm_to_linears", self.modules.norm_to_linears())
            object.__setattr__(self, "linear_to_linears", self.modules.linear_to_linears())


# llama.cpp tensor names: (ArchSpec attribute, name) for model-level tensors, (LayerModules role, name) per layer
_GGUF_GLOBAL = (("embed", "token_embd"), ("final_norm", "output_norm"), ("lm_head", "output"))
_GGUF_LAYER = (
    ("input_norm", "attn_norm"),
    ("q", "attn_q"),
    ("k", "attn_k"),
    ("v", "attn_v"),
    ("o", "attn_output"),
    ("post_norm", "ffn_norm"),
    ("gate", "ffn_gate"),
    ("up", "ffn_up"),
    ("down", "ffn_down"),
    ("q_norm", "attn_q_norm"),
    ("k_norm", "attn_k_norm"),
)


def _layer_param(spec: ArchSpec, role: str, kind: str = "weight") -> str:
    return f"{spec.layers}.{{i}}.{getattr(spec.modules, role)}.{kind}"


@functools.cache
def gguf_tensor_names(spec: ArchSpec) -> tuple[tuple[str, str], ...]:
    """(HF parameter name, GGUF tensor name) of every tensor GGUF has a place for; ``{i}`` is the decoder
    layer index. Empty for a family without GGUF facts."""
    if spec.gguf is None:
        return ()
    names = [(f"{getattr(spec, attr)}.weight", f"{gg}.weight") for attr, gg in _GGUF_GLOBAL]
    names.append((f"{spec.final_norm}.bias", "output_norm.bias"))
    gguf_of = dict(_GGUF_LAYER)
    if spec.modules is not None:
        for role, gg in _GGUF_LAYER:
            if getattr(spec.modules, role) is not None:
                names.append((_layer_param(spec, role), f"blk.{{i}}.{gg}.weight"))
        names += [(_layer_param(spec, role, "bias"), f"blk.{{i}}.{gguf_of[role]}.bias") for role in spec.gguf.biases]
    for kind in ("weight", "bias"):
        names += [(f"{spec.layers}.{{i}}.{path}.{kind}", f"blk.{{i}}.{gg}.{kind}") for path, gg in spec.gguf.layer_tensors]
        names += [(f"{path}.{kind}", f"{gg}.{kind}") for path, gg in spec.gguf.model_tensors]
    return tuple(names)


@functools.cache
def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


def _translate(pairs, name: str) -> str | None:
    for src, dst in pairs:
        m = _template_regex(src).match(name)
        if m:
            return dst.format(i=m.group("i")) if "{i}" in dst else dst
    return None


def hf_to_gguf_name(spec: ArchSpec, hf_name: str) -> str | None:
    """The GGUF tensor name of a Hugging Face parameter, or None if the family has no place for it."""
    return _translate(gguf_tensor_names(spec), hf_name)


def gguf_to_hf_name(spec: ArchSpec, gguf_name: str) -> str | None:
    return _translate(((gg, hf) for hf, gg in gguf_tensor_names(spec)), gguf_name)


def gguf_to_hf_names(spec: ArchSpec, gguf_name: str) -> list[str]:
    """Every Hugging Face name a GGUF tensor may come from: more than one where a family's configs name the
    same tensor differently (Falcon's attn_norm: input_layernorm, or ln_mlp in the 40B layout)."""
    return [n for hf, gg in gguf_tensor_names(spec) if (n := _translate(((gg, hf),), gguf_name)) is not None]


def permute_heads_for(spec: ArchSpec, hf_name: str) -> str | None:
    """Config attribute with the head count ``hf_name``'s rows are permuted by (rope pair order), or None."""
    for role, attr in spec.gguf.permute_rows if spec.gguf else ():
        if _template_regex(_layer_param(spec, role)).match(hf_name) or _template_regex(_layer_param(spec, role, "bias")).match(hf_name):
            return attr
    return None


def rope_row_order(rows: int, n_head: int) -> list[int]:
    """Row order llama.cpp's llama converter writes q/k in: GGUF row r holds HF row ``order[r]``.

    HF keeps, per head, the first halves of the rope pairs then the second halves; llama.cpp interleaves
    them (``reshape(n_head, 2, rows/n_head/2).swapaxes(1, 2)``)."""
    half = rows // n_head // 2
    return [h * 2 * half + j * half + p for h in range(n_head) for p in range(half) for j in range(2)]


def grouped_qkv_order(rows: int, n_head: int, n_groups: int) -> list[int]:
    """Row order of a fused q/k/v that HF stores per key/value group (``[q of the group's heads, k, v]``
    each ``head_dim`` rows) and llama.cpp as all q, all k, all v: GGUF row r holds HF row ``order[r]``."""
    per, (hd, rest) = n_head // n_groups, divmod(rows, n_head + 2 * n_groups)
    if rest or n_head % n_groups:
        raise ValueError(f"{rows} rows do not hold {n_head} query heads in {n_groups} key/value groups")
    group = (per + 2) * hd
    q = [g * group + i * hd + p for g in range(n_groups) for i in range(per) for p in range(hd)]
    k = [g * group + per * hd + p for g in range(n_groups) for p in range(hd)]
    v = [g * group + (per + 1) * hd + p for g in range(n_groups) for p in range(hd)]
    return q + k + v


def row_order_for(spec: ArchSpec, hf_name: str, config, rows: int) -> list[int] | None:
    """The row order llama.cpp's converter writes tensor ``hf_name`` (weight or bias, ``rows`` rows) in, or
    None when it keeps Hugging Face's: GGUF row r holds HF row ``order[r]``."""
    attr = permute_heads_for(spec, hf_name)
    if attr is not None:
        return rope_row_order(rows, int(config_value(config, (attr,))))
    for path, heads, groups in spec.gguf.grouped_qkv if spec.gguf else ():
        base = f"{spec.layers}.{{i}}.{path}"
        if _template_regex(f"{base}.weight").match(hf_name) or _template_regex(f"{base}.bias").match(hf_name):
            return grouped_qkv_order(rows, int(resolve(config, heads)), int(resolve(config, groups)))
    return None


def gguf_value_change(spec: ArchSpec, hf_name: str, gguf_name: str) -> tuple[bool, float]:
    """How a tensor's values differ between HF and GGUF beyond row order: (transposed, offset added), the
    offset being ``norm_offset`` for a norm weight (llama.cpp's norms scale by the stored weight alone)."""
    transposed = any(_template_regex(f"{spec.layers}.{{i}}.{p}.weight").match(hf_name)
                     for p in (spec.gguf.transposed if spec.gguf else ()))
    norm = "norm" in gguf_name and gguf_name.endswith(".weight")
    return transposed, spec.norm_offset if norm else 0.0


def resolve(config, source):
    """A Source's value: ``source(config)`` for a function, else :func:`config_value`."""
    return source(config) if callable(source) else config_value(config, source)


def config_value(config, attrs: tuple[str, ...]):
    """The first of ``attrs`` (dotted paths into dicts/attributes) the config has, else None."""
    for path in attrs:
        obj = config
        for part in path.split("."):
            obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None
