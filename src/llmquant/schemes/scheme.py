"""QuantScheme (how one tensor is quantized), QuantConfig (which modules, with which schemes) and presets.

Both are frozen dataclasses that round-trip through JSON and carry a ``version``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from ..errors import SchemeError
from .methods import params_to_json

SCHEME_VERSION = 1
GRANULARITIES = ("tensor", "channel", "group", "token")
ZERO_POINT_KINDS = ("int", "float", "min")
SCALE_DTYPES = ("float32", "float16", "bfloat16")
# no layer has more input features than this; a larger group is one scale per row under another name
MAX_GROUP_SIZE = 1 << 20


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor (a weight, or an activation) is quantized.

    Values are stored as integers ``q`` in ``[qmin, qmax]`` with ``x ~= (q - zero) * scale``.
    """

    bits: int = 4  # 2..8 integer bits per value
    symmetric: bool = True  # symmetric: zero = 0, grid [-2^(b-1), 2^(b-1)-1], scale = max|x| / (2^b - 1) * 2
    granularity: str = "group"  # "tensor" | "channel" (one scale per output row) | "group" | "token"
    group_size: int | None = 128  # values per scale along the input dim; the last group may be ragged
    # asymmetric only: "int" (rounded zero, x = (q - z) * s), "float" (unrounded zero, x = (q - z) * s, as HQQ)
    # or "min" (a float offset, the group minimum: x = q * s + m, exactly as GGUF Q4_1 / Q5_1 compute it)
    zero_point: str = "int"
    scale_dtype: str = "float32"  # dtype scales (and float zeros) are stored in
    dynamic: bool = False  # activations only: qparams computed from each input at run time
    restricted_range: bool = False  # symmetric only: grid [-(2^(b-1)-1), 2^(b-1)-1], scale = max|x| / qmax (Q8_0)
    # dynamic activations only (LLM.int8()): input columns holding any |x| >= this stay in float
    outlier_threshold: float | None = None
    # dynamic activations only: the input is multiplied by a block-diagonal orthonormal Hadamard matrix
    # of this block size before quantization (the stored weights are rotated alike; QuaRot-style)
    rotation: int | None = None
    # symmetric only: the scale takes the sign of the group's largest-magnitude value x_e, s = x_e / qmin, so
    # x_e lands exactly on qmin = -2^(b-1) and the full grid is used on that side (llama.cpp Q4_0 / Q5_0:
    # d = x_e / -8); scales may then be negative
    signed_scale: bool = False
    # two-level scales (llama.cpp k-quants, see :mod:`llmquant.schemes.kquant`): every ``super_group`` values
    # share an fp16 super-scale ``d`` (and ``dmin`` for float minima), and each group's scale (and minimum) is
    # ``d`` times an integer of ``sub_scale_bits`` bits (signed for symmetric schemes, unsigned for minima)
    super_group: int | None = None
    sub_scale_bits: int | None = None
    version: int = SCHEME_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise SchemeError(f"bits must be an integer from 2 to 8, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise SchemeError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group":
            gs = self.group_size
            if gs is None or not isinstance(gs, int) or isinstance(gs, bool) or not 1 <= gs <= MAX_GROUP_SIZE:
                raise SchemeError(f"group size must be an integer from 1 to {MAX_GROUP_SIZE}, got {gs!r} (for one "
                                  "scale per output row use per-channel: granularity channel)")
        elif self.group_size is not None:
            object.__setattr__(self, "group_size", None)
        if self.zero_point not in ZERO_POINT_KINDS:
            raise SchemeError(f"zero_point must be one of {ZERO_POINT_KINDS}, got {self.zero_point!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SchemeError(f"scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if self.restricted_range and not self.symmetric:
            raise SchemeError("restricted_range applies to symmetric schemes only")
        if self.outlier_threshold is not None:
            if not self.dynamic:
                raise SchemeError("outlier_threshold applies to dynamic activation schemes only")
            t = self.outlier_threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
                raise SchemeError(f"outlier_threshold must be a positive number, got {self.outlier_threshold!r}")
            object.__setattr__(self, "outlier_threshold", float(self.outlier_threshold))
        if self.rotation is not None:
            r = self.rotation
            if not self.dynamic:
                raise SchemeError("rotation applies to dynamic activation schemes only")
            if isinstance(r, bool) or not isinstance(r, int) or r < 2 or r & (r - 1):
                raise SchemeError(f"rotation must be a power of two >= 2 (a Hadamard block size), got {r!r}")
        if self.signed_scale and (not self.symmetric or self.restricted_range):
            raise SchemeError("signed_scale applies to symmetric schemes on the full grid (not restricted_range)")
        if (self.super_group is None) != (self.sub_scale_bits is None):
            raise SchemeError("super_group and sub_scale_bits go together (two-level scales need both)")
        if self.super_group is not None:
            sg, sb = self.super_group, self.sub_scale_bits
            if self.granularity != "group" or self.dynamic:
                raise SchemeError("two-level scales (super_group) apply to grouped weight schemes only")
            if isinstance(sg, bool) or not isinstance(sg, int) or sg < 1 or sg % self.group_size:
                raise SchemeError(f"super_group must be a positive multiple of the group size "
                                  f"{self.group_size}, got {sg!r}")
            if isinstance(sb, bool) or not isinstance(sb, int) or not 2 <= sb <= 8:
                raise SchemeError(f"sub_scale_bits must be an integer from 2 to 8, got {sb!r}")
            if not self.symmetric and self.zero_point != "min":
                raise SchemeError("asymmetric two-level scales keep a float minimum: use zero_point 'min'")
            if self.scale_dtype != "float32":
                raise SchemeError("two-level scales are stored as float32 products d * sc: use scale_dtype float32")
            if self.restricted_range:
                raise SchemeError("two-level scales use the full grid (not restricted_range)")
        if self.version != SCHEME_VERSION:
            raise SchemeError(f"scheme version {self.version} is not supported (this llmquant reads {SCHEME_VERSION})")

    # ---- integer grid -------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1) - 1) if self.restricted_range else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def name(self) -> str:
        """Short readable name such as ``int4-g128-asym``."""
        g = {"tensor": "-tensor", "channel": "-ch", "token": "-tok"}.get(self.granularity, f"-g{self.group_size}")
        if self.symmetric:
            s = "-r" if self.restricted_range else ("-sgn" if self.signed_scale else "")
        else:
            s = {"int": "-asym", "float": "-asymf", "min": "-asymm"}[self.zero_point]
        k = "" if self.super_group is None else f"-s{self.super_group}x{self.sub_scale_bits}"
        return f"int{self.bits}{g}{s}{k}"

    def num_groups(self, in_features: int) -> int:
        if self.granularity == "group":
            return -(-in_features // self.group_size)
        return 1

    # ---- serialization ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantScheme":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SchemeError(f"unknown scheme fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "QuantScheme":
        return cls.from_dict(json.loads(s))


def _w(bits: int, gs: int | None = None, sym: bool = True, **kw: Any) -> QuantScheme:
    gran = "group" if gs else "channel"
    return QuantScheme(bits=bits, symmetric=sym, granularity=gran, group_size=gs, **kw)


#: Named weight schemes. ``W8`` is int8 per output channel; ``W4G64`` int4 in groups of 64, and so on.
PRESETS: dict[str, QuantScheme] = {
    "W8": _w(8),
    "W8G128": _w(8, 128),
    "W4": _w(4),
    "W4G32": _w(4, 32),
    "W4G64": _w(4, 64),
    "W4G128": _w(4, 128),
    "W4G32A": _w(4, 32, sym=False),
    "W4G64A": _w(4, 64, sym=False),
    "W4G128A": _w(4, 128, sym=False),
    "W3G32": _w(3, 32),
    "W3G64": _w(3, 64),
    "W3G128": _w(3, 128),
    "W2G32": _w(2, 32, sym=False),
    "W2G64": _w(2, 64, sym=False),
    # llama.cpp block grids (blocks of 32 along the input dim, fp16 scales), reproduced exactly: a model
    # quantized with one of these exports to that GGUF block type without any change of value.
    # Q8_0: int8 sym, d = max|x| / 127; Q4_0 / Q5_0: d = x_e / -8 (/ -16), x_e the signed extreme;
    # Q4_1 / Q5_1: x = q * d + m, m the block minimum in fp16.
    "gguf:Q8_0": _w(8, 32, scale_dtype="float16", restricted_range=True),
    "gguf:Q4_0": _w(4, 32, scale_dtype="float16", signed_scale=True),
    "gguf:Q4_1": _w(4, 32, sym=False, zero_point="min", scale_dtype="float16"),
    "gguf:Q5_0": _w(5, 32, scale_dtype="float16", signed_scale=True),
    "gguf:Q5_1": _w(5, 32, sym=False, zero_point="min", scale_dtype="float16"),
    # llama.cpp k-quants (super-blocks of 256 values, ggml-common.h): group scales (and minima) are an fp16
    # super-scale d (dmin) times a small integer; Q4_K / Q5_K: groups of 32, x = (d sc) q - dmin m, sc and m
    # 6-bit; Q6_K: groups of 16, x = (d sc) c, c in [-32, 31], sc int8; Q3_K: groups of 16, c in [-4, 3],
    # sc in [-32, 31]; Q2_K: groups of 16, q in [0, 3], sc and m 4-bit.
    "gguf:Q2_K": _w(2, 16, sym=False, zero_point="min", super_group=256, sub_scale_bits=4),
    "gguf:Q3_K": _w(3, 16, signed_scale=True, super_group=256, sub_scale_bits=6),
    "gguf:Q4_K": _w(4, 32, sym=False, zero_point="min", super_group=256, sub_scale_bits=6),
    "gguf:Q5_K": _w(5, 32, sym=False, zero_point="min", super_group=256, sub_scale_bits=6),
    "gguf:Q6_K": _w(6, 16, signed_scale=True, super_group=256, sub_scale_bits=8),
    # activations as llama.cpp's CPU matmul rounds them for Q4_0/Q5_0/Q8_0 weights (vec_dot_type Q8_0): per
    # token, blocks of 32, d = max|x| / 127 in fp16. As QuantConfig(activation=...) it makes llmquant's own
    # evaluation compute what llama.cpp computes; GGUF export accepts it (llama.cpp applies it itself).
    "gguf:Q8_0-act": QuantScheme(bits=8, granularity="group", group_size=32, scale_dtype="float16",
                                 restricted_range=True, dynamic=True),
    # ... and for k-quant weights (vec_dot_type Q8_K): blocks of 256, d = max|x| / 127 in float32
    # (quantize_row_q8_K_ref: iscale = -127 / x_e)
    "gguf:Q8_K-act": QuantScheme(bits=8, granularity="group", group_size=256, restricted_range=True, dynamic=True),
}


def resolve_scheme(spec: "QuantScheme | str | Mapping[str, Any]") -> QuantScheme:
    """A scheme from a QuantScheme, a preset name (case-insensitive) or a dict."""
    if isinstance(spec, QuantScheme):
        return spec
    if isinstance(spec, Mapping):
        return QuantScheme.from_dict(spec)
    if isinstance(spec, str):
        for k, v in PRESETS.items():
            if k.lower() == spec.lower():
                return v
        raise SchemeError(f"unknown scheme preset {spec!r}; known presets: {', '.join(PRESETS)}")
    raise SchemeError(f"cannot make a scheme from {type(spec).__name__}")


CONFIG_VERSION = 1
DEFAULT_IGNORE = ("lm_head",)
DEFAULT_GROUP_SIZE = 128  # values per scale when bits < 8 and no group size is given


def scheme_for(bits: int | None = None, group_size: int | None = None, *, symmetric: bool = True,
               granularity: str | None = None) -> QuantScheme:
    """A weight scheme from the usual knobs, with one rule for what is left out (every CLI command and
    face uses it): 4 bits by default; 8 bits per output channel and fewer bits in groups of
    ``DEFAULT_GROUP_SIZE``, unless a group size or granularity is given."""
    bits = 4 if bits is None else bits
    if group_size is not None:
        if (granularity or "group") != "group":
            raise SchemeError(f"a group size goes with group granularity, not {granularity!r}")
        return QuantScheme(bits=bits, symmetric=symmetric, granularity="group", group_size=group_size)
    gran = granularity or ("channel" if bits == 8 else "group")
    return QuantScheme(bits=bits, symmetric=symmetric, granularity=gran,
                       group_size=DEFAULT_GROUP_SIZE if gran == "group" else None)


@dataclass(frozen=True)
class QuantConfig:
    """Which modules to quantize, how, and with which method: the one input of :func:`llmquant.quantize`.

    ``method`` names a registered method (``rtn``, ``gptq``, ``awq``, ``static``, ``smoothquant``,
    ``dynamic``, ``qat``, ``plan``, or one registered later) or a list of layer-by-layer methods that
    compose (``["awq", "gptq"]``: AWQ's scales folded in, then GPTQ); ``method_params`` holds its typed
    knobs (a tuple, one per method, for a list). ``targets`` and ``ignore`` hold exact module names or
    ``re:`` regexes (full match). An empty ``targets`` means every ``nn.Linear``. Embeddings are never
    touched by the method (they are not Linear), and ``lm_head`` is ignored by the method by default; remove
    it from ``ignore`` to quantize it with the method (a tied lm_head is then untied). ``head`` is the format
    of the input embedding and of an output head the method did not quantize, given after the method ran
    (round to nearest): ``"auto"`` (weight-only methods and plans that leave them out: int8 in blocks of 32,
    llama.cpp's Q8_0 grid, the pair kept tied; methods that quantize activations, or a config with explicit
    ``targets``: left as they are), ``"fp32"`` (left as they are),
    ``"bf16"`` / ``"fp16"``, or any weight scheme (``"W8"``, ``"W4G64"``, ``"gguf:Q6_K"`` ...). Fields left as None take
    the method's defaults (:data:`llmquant.schemes.methods.METHOD_DEFAULTS`), so a saved config is
    complete.
    """

    weight: QuantScheme | None = None  # None: the method's default (W4G128; W8 for static W8A8)
    activation: QuantScheme | None = None  # None: weight-only (static / dynamic methods: their default)
    method: Any = "rtn"  # a method name, or a list of names that compose layer by layer
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    # calibrated flows (prepare/convert): observers by registry name, "name" or "name:arg" ("percentile:99.9")
    observer: str | None = None  # activation observer (static activation scales); None: the method's default
    weight_observer: str = "minmax"  # weight observer (per-channel / group ranges)
    smooth_alpha: float | str | None = None  # SmoothQuant strength a in [0, 1], "search" (per layer), None: none
    version: int = CONFIG_VERSION
    # the method's knobs (GPTQParams / AWQParams / QATParams ...; defaults when None) and calibration data
    method_params: Any = None
    calibration: Any = None  # CalibSpec; None: the defaults (64 x 512 tokens from the end of the default text)
    head: Any = "auto"  # the embedding / output head's format (see above)

    def __post_init__(self) -> None:
        from .methods import DEFAULT_OBSERVER, DEFAULT_WEIGHT, method_chain, method_default, resolve_calib, resolve_method_params

        object.__setattr__(self, "method", method_chain(self.method))
        weight = self.weight if self.weight is not None else method_default(self.method, "weight", DEFAULT_WEIGHT)
        object.__setattr__(self, "weight", resolve_scheme(weight))
        act = self.activation if self.activation is not None else method_default(self.method, "activation")
        if act is not None:
            object.__setattr__(self, "activation", resolve_scheme(act))
        if self.observer is None:
            object.__setattr__(self, "observer", method_default(self.method, "observer", DEFAULT_OBSERVER))
        if self.smooth_alpha is None:
            object.__setattr__(self, "smooth_alpha", method_default(self.method, "smooth_alpha"))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "method_params", resolve_method_params(self.method, self.method_params))
        object.__setattr__(self, "calibration", resolve_calib(self.calibration))
        if self.head != "auto":
            from .formats import format_to_json, resolve_format

            object.__setattr__(self, "head", format_to_json(resolve_format(self.head)))
        for f in ("observer", "weight_observer"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                raise SchemeError(f"{f} must be an observer name such as 'minmax', got {getattr(self, f)!r}")
        a = self.smooth_alpha
        if a is not None and a != "search" and not (isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1):
            raise SchemeError(f"smooth_alpha must be in [0, 1], 'search' or None, got {a!r}")
        if self.version != CONFIG_VERSION:
            raise SchemeError(f"config version {self.version} is not supported (this llmquant reads {CONFIG_VERSION})")

    @property
    def methods(self) -> tuple[str, ...]:
        """The method as a tuple of names (one for a single method)."""
        return self.method if isinstance(self.method, tuple) else (self.method,)

    def with_(self, **kw: Any) -> "QuantConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": self.weight.to_dict(),
            "activation": None if self.activation is None else self.activation.to_dict(),
            "method": list(self.method) if isinstance(self.method, tuple) else self.method,
            "targets": list(self.targets),
            "ignore": list(self.ignore),
            "observer": self.observer,
            "weight_observer": self.weight_observer,
            "smooth_alpha": self.smooth_alpha,
            "version": self.version,
            "method_params": params_to_json(self.method_params),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "head": self.head,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        from .methods import migrate_config_dict

        d = migrate_config_dict(dict(d))
        if d.get("weight") is not None and not isinstance(d["weight"], str):
            d["weight"] = QuantScheme.from_dict(d["weight"])
        if d.get("activation") is not None and not isinstance(d["activation"], str):
            d["activation"] = QuantScheme.from_dict(d["activation"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "QuantConfig":
        return cls.from_dict(json.loads(s))


def resolve_config(spec: "QuantConfig | QuantScheme | str | Mapping[str, Any]") -> QuantConfig:
    """A QuantConfig from a config, a scheme, a preset name or a dict of either."""
    if isinstance(spec, QuantConfig):
        return spec
    if isinstance(spec, Mapping) and ("weight" in spec or "method" in spec):
        return QuantConfig.from_dict(spec)
    return QuantConfig(weight=resolve_scheme(spec))
