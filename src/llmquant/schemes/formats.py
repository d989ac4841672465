"""Storage formats a mixed-precision plan can give one layer: an integer :class:`QuantScheme` (packed, see
QuantLinear), a 16-bit float format (:class:`FloatFormat`: the weight kept as bf16 or fp16), or ``fp32``
(the layer is left as it is).

Text names, as a plan file writes them: ``"bf16"``, ``"fp16"``, ``"fp32"``, any preset (``"W8"``,
``"W4G64"``, ``"W3G32"``, ...), or a scheme dict. :func:`format_bytes` is the exact number of bytes the
layer's weight takes once stored, which is what budgets are solved against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

import torch

from ..errors import SchemeError
from .primitives import scale_torch_dtype
from .scheme import PRESETS, QuantScheme, resolve_scheme

FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_FLOAT_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                  "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}
_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class FloatFormat:
    """A float storage format for one layer's weight; ``float32`` means "leave the layer as it is"."""

    dtype: str = "bfloat16"  # "bfloat16" | "float16" | "float32"

    def __post_init__(self) -> None:
        if self.dtype not in FLOAT_DTYPES:
            raise SchemeError(f"float format must be one of {list(FLOAT_DTYPES)}, got {self.dtype!r}")

    @property
    def name(self) -> str:
        return _SHORT[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return FLOAT_DTYPES[self.dtype]

    @property
    def bits(self) -> int:
        return torch.finfo(self.torch_dtype).bits


Format = Union[QuantScheme, FloatFormat]
FP32 = FloatFormat("float32")



def packed_numel(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` values of ``bits`` bits, packed densely (:mod:`llmquant.packing`)."""
    return -(-numel * bits // 8)

def resolve_format(spec: "Format | str | Mapping[str, Any]") -> Format:
    """A format from a name (``bf16``, ``fp16``, ``fp32``, a preset), a scheme dict or a format object."""
    if isinstance(spec, (QuantScheme, FloatFormat)):
        return spec
    if isinstance(spec, str) and spec.lower() in _FLOAT_ALIASES:
        return FloatFormat(_FLOAT_ALIASES[spec.lower()])
    if isinstance(spec, Mapping) and set(spec) <= {"dtype"}:
        return FloatFormat(**spec)
    if isinstance(spec, str):
        for s in PRESETS.values():  # accept scheme names too ("int4-g64")
            if s.name == spec.lower():
                return s
        try:
            return resolve_scheme(spec)
        except SchemeError:
            raise SchemeError(
                f"unknown format {spec!r}: use bf16, fp16, fp32 (leave as is), a preset ({', '.join(PRESETS)}) "
                "or a scheme dict"
            ) from None
    return resolve_scheme(spec)


def format_name(fmt: Format) -> str:
    """The preset name when one matches (``W4G64``), else the scheme's own name; ``bf16`` etc. for floats."""
    if isinstance(fmt, FloatFormat):
        return fmt.name
    for k, v in PRESETS.items():
        if v == fmt:
            return k
    return fmt.name


def format_to_json(fmt: Format) -> "str | dict":
    """What a plan file holds: a name when one round-trips, else the scheme dict."""
    if isinstance(fmt, FloatFormat):
        return fmt.name
    name = format_name(fmt)
    return name if name in PRESETS else fmt.to_dict()


def format_bytes(fmt: Format, out_features: int, in_features: int) -> int:
    """Bytes an (out_features, in_features) weight takes stored in ``fmt``: the one definition of a weight's
    stored size. Integer schemes: packed codes + scales + zero points (uint8 for integer zero points, the
    scale dtype otherwise), exactly the tensors :class:`~llmquant.modules.QuantLinear` holds; no bias."""
    n = out_features * in_features
    if isinstance(fmt, FloatFormat):
        return n * fmt.bits // 8
    rows = 1 if fmt.granularity == "tensor" else out_features
    nq = rows * fmt.num_groups(in_features)
    sbytes = scale_torch_dtype(fmt).itemsize
    zbytes = 0 if fmt.symmetric else (1 if fmt.zero_point == "int" else sbytes)
    return packed_numel(n, fmt.bits) + nq * (sbytes + zbytes)


def fake_weight(fmt: Format, weight: torch.Tensor) -> torch.Tensor:
    """What the weight becomes in ``fmt`` (RTN for integer schemes), in the weight's own dtype."""
    from .primitives import fake_quantize

    if isinstance(fmt, FloatFormat):
        return weight.detach().to(fmt.torch_dtype).to(weight.dtype)
    return fake_quantize(weight.detach().float(), fmt).to(weight.dtype)


#: The default candidate list of a sensitivity scan, from most to fewest bits.
DEFAULT_CANDIDATES = ("bf16", "W8", "W4G32", "W4G64", "W4G128", "W3G32", "W3G64", "W3G128", "W2G32")
#: Candidates for a plan written to GGUF (llama.cpp's block types), from most to fewest bits per weight. The
#: k-quants hold rows whose width is a multiple of 256 only; the 32-value types hold the other layers.
GGUF_CANDIDATES = ("gguf:Q8_0", "gguf:Q6_K", "gguf:Q5_1", "gguf:Q5_K", "gguf:Q5_0", "gguf:Q4_1", "gguf:Q4_K",
                   "gguf:Q4_0", "gguf:Q3_K", "gguf:Q2_K")
_GGUF_FLOATS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def gguf_type(fmt: Format, in_features: int | None = None) -> str | None:
    """The GGUF (llama.cpp) tensor type that stores ``fmt`` exactly (``"Q4_K"``, ``"F16"`` ...), or None when
    no type does, or, given ``in_features``, when rows of that width do not fill whole blocks of the type."""
    if isinstance(fmt, FloatFormat):
        return _GGUF_FLOATS[fmt.dtype]
    name = format_name(fmt)
    if not name.startswith("gguf:") or fmt.dynamic:
        return None
    block = fmt.super_group or fmt.group_size
    if in_features is not None and in_features % block:
        return None
    return name.removeprefix("gguf:")


def kquant_scale_bytes(fmt: QuantScheme, out_features: int, in_features: int) -> int:
    """Bytes of a two-level scheme's scales as llama.cpp stores them: per super-block an fp16 ``d`` (and
    ``dmin`` with minima), per group a ``sub_scale_bits``-bit multiplier (and one for the minimum)."""
    supers = out_features * -(-in_features // fmt.super_group)
    groups = out_features * fmt.num_groups(in_features)
    per = 1 if fmt.symmetric else 2
    return per * (2 * supers + -(-groups * fmt.sub_scale_bits // 8))


def gguf_bytes(fmt: Format, out_features: int, in_features: int) -> int | None:
    """Bytes an (out_features, in_features) weight takes in a GGUF file (the tensor data), or None when no
    GGUF type holds ``fmt`` on rows of ``in_features`` values (see :func:`gguf_type`). For the 32-value
    block types this equals :func:`format_bytes`; for the k-quants the scales are counted as stored there
    (Q4_K: 144 bytes per 256 weights, 4.5 bits), not as llmquant keeps them in memory."""
    if gguf_type(fmt, in_features) is None:
        return None
    if isinstance(fmt, QuantScheme) and fmt.super_group is not None:
        return packed_numel(out_features * in_features, fmt.bits) + kquant_scale_bytes(fmt, out_features, in_features)
    return format_bytes(fmt, out_features, in_features)
