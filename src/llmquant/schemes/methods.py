"""Knobs of the calibrated methods (GPTQ, AWQ) and of the calibration data, as frozen dataclasses.

They round-trip through JSON (``to_dict`` / ``from_dict``) and travel inside :class:`QuantConfig`, so a
saved folder's manifest records exactly how it was made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ..errors import SchemeError

PARAMS_VERSION = 1


class _Params:
    """JSON round trip shared by the parameter dataclasses below."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SchemeError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def _check_version(self) -> None:
        if self.version != PARAMS_VERSION:
            raise SchemeError(f"{type(self).__name__} version {self.version} is not supported (reads {PARAMS_VERSION})")


@dataclass(frozen=True)
class GPTQParams(_Params):
    damp: float = 0.01  # dampening added to H's diagonal, as a fraction of its mean diagonal
    block_size: int = 128  # columns per lazy batch update
    act_order: bool = False  # quantize columns by decreasing H diagonal (output format unchanged)
    awq_scales: bool = False  # fold AWQ's activation-aware scales in first, then run GPTQ on the scaled weights
    awq_grid: int = 20  # alpha values tried for those scales
    version: int = PARAMS_VERSION

    def __post_init__(self) -> None:
        if not 0 <= self.damp < 1:
            raise SchemeError(f"GPTQ damp must be in [0, 1), got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise SchemeError(f"GPTQ block_size must be an integer >= 1, got {self.block_size!r}")
        self._check_version()


def _pairs(v) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
    if v is None:
        return None
    try:
        return tuple((str(src), tuple(str(d) for d in dst)) for src, dst in v)
    except (TypeError, ValueError):
        raise SchemeError("AWQ mappings are pairs (source, [linear, ...]) of paths inside one decoder layer") from None


@dataclass(frozen=True)
class AWQParams(_Params):
    grid: int = 20  # alpha values tried in [0, 1) for s = mean|x|^alpha
    clip: bool = True  # also search a per-(row, group) clipping ratio of the weight range
    clip_grid: int = 20  # clipping ratios tried between 1 and 1 - max_shrink
    max_shrink: float = 0.5
    # override the per-architecture (models/arch.py) source -> linears pairs, paths relative to a decoder
    # layer: norm_to_linears [["input_layernorm", ["self_attn.q_proj", ...]], ...]
    norm_to_linears: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    linear_to_linears: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    version: int = PARAMS_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.grid, int) or self.grid < 1:
            raise SchemeError(f"AWQ grid must be an integer >= 1, got {self.grid!r}")
        if not isinstance(self.clip_grid, int) or self.clip_grid < 1:
            raise SchemeError(f"AWQ clip_grid must be an integer >= 1, got {self.clip_grid!r}")
        if not 0 <= self.max_shrink < 1:
            raise SchemeError(f"AWQ max_shrink must be in [0, 1), got {self.max_shrink!r}")
        object.__setattr__(self, "norm_to_linears", _pairs(self.norm_to_linears))
        object.__setattr__(self, "linear_to_linears", _pairs(self.linear_to_linears))
        self._check_version()


@dataclass(frozen=True)
class CalibSpec(_Params):
    source: str | None = None  # None: the default text (windows from its end); or a .txt / .jsonl path
    samples: int = 64  # calibration windows
    seq_len: int = 512  # tokens per window
    batch_size: int = 4  # windows per forward pass (memory: activations of one batch inside a layer)
    sequential: bool = True  # layer by layer, feeding quantized outputs on; False: one float pass for all
    version: int = PARAMS_VERSION

    def __post_init__(self) -> None:
        for k in ("samples", "seq_len", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SchemeError(f"calibration {k} must be an integer >= 1, got {v!r}")
        self._check_version()


#: Calibrated methods and the type of their knobs.
METHOD_PARAMS: dict[str, type] = {"gptq": GPTQParams, "awq": AWQParams}


def resolve_method_params(method: str, params) -> Any:
    """The knobs for ``method``: defaults when None, from a dict, or checked against the method."""
    cls = METHOD_PARAMS.get(method)
    if cls is None:
        if params is not None:
            raise SchemeError(f"method {method!r} takes no method_params")
        return None
    if params is None:
        return cls()
    if isinstance(params, Mapping):
        return cls.from_dict(params)
    if not isinstance(params, cls):
        raise SchemeError(f"method {method!r} takes {cls.__name__}, got {type(params).__name__}")
    return params


def resolve_calib(spec) -> CalibSpec | None:
    if spec is None or isinstance(spec, CalibSpec):
        return spec
    if isinstance(spec, Mapping):
        return CalibSpec.from_dict(spec)
    raise SchemeError(f"calibration must be a CalibSpec or a dict, got {type(spec).__name__}")
