"""Each method's knobs and the calibration data, as frozen dataclasses, and each method's defaults.

They round-trip through JSON (``to_dict`` / ``from_dict``) and travel inside :class:`QuantConfig`, so a
saved folder's manifest records exactly how it was made. :data:`METHOD_PARAMS` maps a method name to the
type of its knobs (``None``: it has none); :data:`METHOD_DEFAULTS` holds what a config leaves unsaid for
that method (weight scheme, activation scheme, observer), measured where noted. The handlers that run
the methods register in :mod:`llmquant.flows.registry`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import SchemeError

if TYPE_CHECKING:  # pragma: no cover
    from .scheme import QuantScheme

PARAMS_VERSION = 1


def _number(owner: str, name: str, v, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False, none: bool = False) -> None:
    """Refuse ``v`` unless it is a finite real number in the range (or None when ``none``)."""
    if v is None and none:
        return
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}{')' if hi_open or hi is None else ']'}"
        raise SchemeError(f"{owner} {name} must be a finite number in {rng}{' or null' if none else ''}, got {v!r}")


def _integer(owner: str, name: str, v, lo: int, *, none: bool = False) -> None:
    if v is None and none:
        return
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
        raise SchemeError(f"{owner} {name} must be an integer >= {lo}{' or null' if none else ''}, got {v!r}")


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
        v = getattr(type(self), "VERSION", PARAMS_VERSION)
        if self.version != v:
            raise SchemeError(f"{type(self).__name__} version {self.version} is not supported (reads {v})")


#: weight range searches (:func:`llmquant.schemes.primitives.range_qparams`): "minmax" (RTN's full range),
#: "mse" (least squared round-trip error), "imse" (the same weighted per input column by diag(X^T X))
RANGE_SEARCHES = ("minmax", "mse", "imse")
#: GPTQ column orders: "off" (as stored), "full" (by decreasing diag H), "group" (whole groups by decreasing
#: summed diag H, the columns inside each by decreasing diag H)
ACT_ORDERS = ("off", "full", "group")
#: HQQ's guard against its own qparams (:class:`HQQParams`): "off", "mse" (squared weight error), "imse"
#: (the same weighted per input column by diag(X^T X) / n, from calibration data)
HQQ_GUARDS = ("off", "mse", "imse")


def act_order_name(act_order) -> str:
    """``act_order`` as one of :data:`ACT_ORDERS` (True / False, as older configs say: "full" / "off")."""
    if isinstance(act_order, bool):
        return "full" if act_order else "off"
    if act_order not in ACT_ORDERS:
        raise SchemeError(f"GPTQ act_order must be one of {', '.join(ACT_ORDERS)} (or true / false), got {act_order!r}")
    return act_order


def _search(owner: str, v) -> None:
    if v not in RANGE_SEARCHES:
        raise SchemeError(f"{owner} observer must be one of {', '.join(RANGE_SEARCHES)}, got {v!r}")


@dataclass(frozen=True)
class GPTQParams(_Params):
    """GPTQ's knobs. Defaults measured on the default model at W4G64 (BENCHMARKS.md, "PTQ frontier: GPTQ
    options and importance-weighted RTN"; 16 x 512 calibration tokens, KL on 8 windows): the paper's form
    (columns in order, min-max groups in the sweep) KL 0.260; act_order "full" 0.153 ("group" order with
    "imse": 0.104); plus the importance-weighted range search ("imse") 0.101; plus static groups 0.097
    (static groups with min-max ranges: 0.196, worse than without). Version 1 dicts (written before these
    options) load as the paper's form they meant."""

    VERSION = 2  # 2: act_order became a name, static_groups and observer were added
    damp: float = 0.01  # dampening added to H's diagonal, as a fraction of its mean diagonal
    block_size: int = 128  # columns per lazy batch update
    act_order: str = "full"  # column order, one of ACT_ORDERS (true / false: "full" / "off"); output format unchanged
    static_groups: bool = True  # every group's qparams from the original weights before the sweep
    observer: str = "imse"  # the groups' range search, one of RANGE_SEARCHES ("imse": weighted by diag H)
    version: int = 2

    def __post_init__(self) -> None:
        _number("GPTQ", "damp", self.damp, 0, 1, hi_open=True)
        _integer("GPTQ", "block_size", self.block_size, 1)
        object.__setattr__(self, "act_order", act_order_name(self.act_order))
        if not isinstance(self.static_groups, bool):
            raise SchemeError(f"GPTQ static_groups must be true or false, got {self.static_groups!r}")
        _search("GPTQ", self.observer)
        self._check_version()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Version 1 (before the options) meant the paper's algorithm: min-max groups computed in the sweep."""
        if d.get("version") == 1:
            d = {"static_groups": False, "observer": "minmax", **d, "version": cls.VERSION}
        return super().from_dict(d)


@dataclass(frozen=True)
class RTNParams(_Params):
    """Round to nearest: the weight range search. "imse" weights each input column's rounding error by
    its calibration statistic ``diag(X^T X) / n`` (llama.cpp's importance matrix idea), so it needs
    calibration data; "minmax" and "mse" need none. Measured on the default model at W4G64 (16 x 512
    calibration tokens, KL on 8 windows): min-max KL 0.437, "imse" 0.242 (as good as the paper's GPTQ,
    0.260). The default stays min-max: RTN is the data-free baseline."""

    observer: str = "minmax"  # one of RANGE_SEARCHES
    version: int = PARAMS_VERSION
    # "imse"'s importance from llama.cpp's importance matrix file (GGUF, ``llmquant imatrix`` or
    # ``llama-imatrix``) instead of calibration data: RTN as ``llama-quantize --imatrix`` runs it
    imatrix: str | None = None

    def __post_init__(self) -> None:
        _search("RTN", self.observer)
        if self.imatrix is not None:
            if not isinstance(self.imatrix, str) or not self.imatrix:
                raise SchemeError(f"RTN imatrix is the path of an importance matrix file, got {self.imatrix!r}")
            if self.observer != "imse":
                raise SchemeError(f"an importance matrix weights the 'imse' range search; RTN observer is "
                                  f"{self.observer!r}: use observer='imse' with imatrix=")
        self._check_version()

    @property
    def calibrated(self) -> bool:
        return self.observer == "imse" and self.imatrix is None

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if d["imatrix"] is None:  # recipes without one read as they did before the field
            del d["imatrix"]
        return d


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
        _integer("AWQ", "grid", self.grid, 1)
        _integer("AWQ", "clip_grid", self.clip_grid, 1)
        _number("AWQ", "max_shrink", self.max_shrink, 0, 1, hi_open=True)
        if not isinstance(self.clip, bool):
            raise SchemeError(f"AWQ clip must be true or false, got {self.clip!r}")
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
    # layer by layer, methods that quantize each linear on its own statistics (GPTQ, imse RTN / HQQ): one pass
    # per layer in which each linear is calibrated after the ones before it are quantized (the GPTQ paper's
    # "true sequential"); False: a float pass for the statistics, then a quantized pass for the outputs
    true_sequential: bool = True
    # the layer passes' arithmetic: "float32", or "bfloat16" (autocast: matrix products in bfloat16, the
    # statistics still accumulated in float32); the quantizers always work on the float32 weights
    compute: str = "float32"
    VERSION = 2  # 2: true_sequential was added (version 1 dicts load with it off, as they ran)
    version: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.true_sequential, bool) or not isinstance(self.sequential, bool):
            raise SchemeError("calibration sequential / true_sequential must be true or false")
        for k in ("samples", "seq_len", "batch_size"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SchemeError(f"calibration {k} must be an integer >= 1, got {v!r}")
        if self.compute not in ("float32", "bfloat16"):
            raise SchemeError(f"calibration compute must be 'float32' or 'bfloat16', got {self.compute!r}")
        self._check_version()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Version 1 (before true_sequential) calibrated every layer in two passes."""
        if d.get("version") == 1:
            d = {"true_sequential": False, **d, "version": cls.VERSION}
        return super().from_dict(d)


@dataclass(frozen=True)
class QATParams(_Params):
    """Quantization-aware training (see :func:`llmquant.train_qat`, whose keywords these are)."""

    steps: int = 100  # optimizer steps
    lr: float = 5e-5
    lr_qparams: float | None = None  # learning rate of the step sizes / zero points (None: lr)
    seq_len: int = 256  # tokens per training window
    batch: int = 4  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per step
    loss: str = "kl"  # "kl": distil the float model's next-token distributions; "ce": next-token loss
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup: int | None = None  # warm-up steps (None: a tenth of the steps)
    learn_scales: bool = True  # LSQ-learned step sizes, or frozen at their initial values
    lora_rank: int = 0  # > 0: frozen base weights + low-rank adapters, merged at convert
    lora_alpha: float | None = None
    init: str = "mse"  # "mse" (least-squares clipping per group) or "rtn" (min-max)
    gradient_checkpointing: bool = False
    max_seconds: float | None = None  # a time budget; training stops early when it is spent
    seed: int = 0
    text: str | None = None  # training text: None for the default text, or a .txt / .jsonl path
    version: int = PARAMS_VERSION

    def __post_init__(self) -> None:
        for k in ("steps", "seq_len", "batch", "grad_accum"):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SchemeError(f"QAT {k} must be an integer >= 1, got {v!r}")
        if self.loss not in ("kl", "ce"):
            raise SchemeError(f"QAT loss must be 'kl' or 'ce', got {self.loss!r}")
        if self.init not in ("mse", "rtn"):
            raise SchemeError(f"QAT init must be 'mse' or 'rtn', got {self.init!r}")
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool) or self.lora_rank < 0:
            raise SchemeError(f"lora_rank must be an integer >= 0, got {self.lora_rank!r}")
        _number("QAT", "lr", self.lr, 0, lo_open=True)
        _number("QAT", "lr_qparams", self.lr_qparams, 0, lo_open=True, none=True)
        _number("QAT", "weight_decay", self.weight_decay, 0)
        _number("QAT", "max_grad_norm", self.max_grad_norm, 0)  # 0: no clipping
        _number("QAT", "lora_alpha", self.lora_alpha, 0, lo_open=True, none=True)
        _number("QAT", "max_seconds", self.max_seconds, 0, none=True)
        _integer("QAT", "warmup", self.warmup, 0, none=True)
        _integer("QAT", "seed", self.seed, -(2**63))
        for k in ("learn_scales", "gradient_checkpointing"):
            if not isinstance(getattr(self, k), bool):
                raise SchemeError(f"QAT {k} must be true or false, got {getattr(self, k)!r}")
        if self.text is not None and not isinstance(self.text, str):
            raise SchemeError(f"QAT text must be a file path or null, got {self.text!r}")
        self._check_version()


#: Every method's knobs (None: the method has none). Handlers register in llmquant.flows.registry, which
#: adds any new method's params type here.
@dataclass(frozen=True)
class BlockQATParams(_Params):
    """Block-wise quantization-aware training, one decoder layer at a time (EfficientQAT's Block-AP, Chen et
    al. 2024): the layer's fake-quantized weights and step sizes are trained to reproduce the float layer's
    outputs (MSE) on the calibration inputs, then packed. Needs one layer in memory, so it streams."""

    steps: int = 40  # optimizer steps per layer, one calibration batch each (cycling)
    lr: float = 1e-5  # weights
    lr_qparams: float = 1e-4  # step sizes / zero points
    init: str = "mse"  # initial qparams: "mse" (least-squares clipping) or "rtn" (min-max)
    learn_scales: bool = True
    max_grad_norm: float = 1.0
    version: int = PARAMS_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise SchemeError(f"block QAT steps must be an integer >= 0, got {self.steps!r}")
        for k in ("lr", "lr_qparams", "max_grad_norm"):
            v = getattr(self, k)
            if not isinstance(v, (int, float)) or not v == v or v < 0 or v == float("inf"):
                raise SchemeError(f"block QAT {k} must be a finite number >= 0, got {v!r}")
        if self.init not in ("mse", "rtn"):
            raise SchemeError(f"block QAT init must be 'mse' or 'rtn', got {self.init!r}")
        self._check_version()


@dataclass(frozen=True)
class HQQParams(_Params):
    """Half-quadratic quantization (Badri & Shaji 2023, :mod:`llmquant.algorithms.hqq`): calibration-free,
    each group's zero point (and scale) optimized for an lp-norm (p < 1) of the weight error."""

    iterations: int = 20  # alternations of the shrinkage and the closed-form qparam update (HQQ's default)
    p: float = 0.7  # the lp-norm of the weight error (p < 1: sparse outliers are cheap); HQQ's default
    beta: float = 10.0  # initial half-quadratic penalty (shrinkage threshold |e|^(p-1) / beta, weight units)
    kappa: float = 1.01  # beta grows by this factor each iteration
    # also update the scale in closed form (the zero point alone is the paper's; symmetric schemes always
    # update the scale, having no zero point). Measured on heavy-tailed weights: 5-13% lower output error
    # with integer or float zero points (zero alone gains nothing once an integer zero is rounded)
    optimize_scale: bool = True
    # keep RTN's qparams in each (row, group) where HQQ's raise the squared weight error: "mse" (unweighted,
    # data-free), "imse" (weighted per input column by the calibration inputs' diag(X^T X) / n: the output
    # error; needs calibration data), "off". HQQ alone (lp objective) at W4G128 symmetric: KL 0.81 vs RTN's 0.52
    guard: str = "mse"
    VERSION = 2  # 2: the guard was added (version 1 dicts load with guard "off", as they ran)
    version: int = 2

    def __post_init__(self) -> None:
        _integer("HQQ", "iterations", self.iterations, 0)
        if self.guard not in HQQ_GUARDS:
            raise SchemeError(f"HQQ guard must be one of {', '.join(HQQ_GUARDS)}, got {self.guard!r}")
        _number("HQQ", "p", self.p, 0, 1, lo_open=True)
        _number("HQQ", "beta", self.beta, 0, lo_open=True)
        _number("HQQ", "kappa", self.kappa, 1)
        if not isinstance(self.optimize_scale, bool):
            raise SchemeError(f"HQQ optimize_scale must be true or false, got {self.optimize_scale!r}")
        self._check_version()

    @property
    def calibrated(self) -> bool:
        return self.guard == "imse"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Version 1 (before the guard) ran HQQ's result unguarded."""
        if d.get("version") == 1:
            d = {"guard": "off", **d, "version": cls.VERSION}
        return super().from_dict(d)


@dataclass(frozen=True)
class AutoRoundParams(_Params):
    """AutoRound / SignRound (Cheng et al. 2023, :mod:`llmquant.algorithms.autoround`): per decoder layer,
    rounding offsets V in [-0.5, 0.5] and per-group range factors trained by signed gradient descent to make
    the quantized layer reproduce the float layer's outputs on the calibration inputs."""

    steps: int = 200  # signed-gradient steps per decoder layer (the paper's default), one batch each, cycling
    lr: float | None = None  # step size of V and of the range factors (None: 1 / steps, the paper's), decayed linearly to 0
    minmax: bool = True  # also train the range factors (alpha, beta) of each group's max and min
    clip_min: float = 0.5  # the range factors stay in [clip_min, 1]
    batch: int | None = None  # calibration windows per step (None: the CalibSpec's batch_size)
    version: int = PARAMS_VERSION

    def __post_init__(self) -> None:
        _integer("AutoRound", "steps", self.steps, 0)
        _number("AutoRound", "lr", self.lr, 0, lo_open=True, none=True)
        _number("AutoRound", "clip_min", self.clip_min, 0, 1, lo_open=True)
        _integer("AutoRound", "batch", self.batch, 1, none=True)
        if not isinstance(self.minmax, bool):
            raise SchemeError(f"AutoRound minmax must be true or false, got {self.minmax!r}")
        self._check_version()


METHOD_PARAMS: dict[str, type | None] = {
    "rtn": RTNParams, "gptq": GPTQParams, "awq": AWQParams, "static": None, "smoothquant": None, "dynamic": None,
    "qat": QATParams, "plan": None, "blockqat": BlockQATParams,
}

#: Methods that run layer by layer and compose as a list: every one but the last contributes its transform
#: (AWQ: scales folded into the weights), the last one quantizes (["awq", "gptq"]: AWQ scales, then GPTQ).
COMPOSABLE = ["rtn", "gptq", "awq", "blockqat"]


def _static_act():
    from .scheme import QuantScheme

    return QuantScheme(bits=8, granularity="tensor")


def dynamic_schemes(
    weight_bits: int = 8,
    act_granularity: str = "token",
    symmetric: bool = True,
    group_size: int = 128,
    outlier_threshold: float | None = None,
    weight_symmetric: bool = False,
    rotation: int | None = None,
) -> tuple[QuantScheme, QuantScheme]:
    """``(weight_scheme, activation_scheme)`` for dynamic W8A8 / W4A8 (the defaults: the dynamic method's)."""
    from .scheme import QuantScheme

    if weight_bits == 8:
        w = QuantScheme(bits=8, granularity="channel", symmetric=weight_symmetric)
    elif weight_bits == 4:
        w = QuantScheme(bits=4, granularity="group", group_size=group_size, symmetric=weight_symmetric)
    else:
        raise SchemeError(f"weight_bits must be 8 or 4 for dynamic quantization, got {weight_bits!r}")
    if act_granularity not in ("token", "tensor"):
        raise SchemeError(f"act_granularity must be 'token' or 'tensor', got {act_granularity!r}")
    a = QuantScheme(
        bits=8, symmetric=symmetric, granularity=act_granularity, dynamic=True, outlier_threshold=outlier_threshold,
        rotation=rotation,
    )
    return w, a


#: What a config leaves unsaid, per method: the weight scheme (a preset name or a callable giving the
#: scheme), the activation scheme, and the activation observer. Measured defaults (BENCHMARKS.md): static
#: W8A8 clips activations by MSE without smoothing and uses min-max after SmoothQuant (alpha 0.8); dynamic
#: gives each int8 weight row a zero point (W8 weight-only KL 0.0022 against 0.0029 symmetric).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "static": {"weight": "W8", "activation": _static_act, "observer": "mse", "head": "fp32"},
    "smoothquant": {"weight": "W8", "activation": _static_act, "observer": "minmax", "smooth_alpha": 0.8,
                    "head": "fp32"},
    "dynamic": {"weight": lambda: dynamic_schemes()[0], "activation": lambda: dynamic_schemes()[1], "head": "fp32"},
}
# "head": "auto" for every other method means int8 (flows.heads: Q8_0 blocks, or per row for odd widths); a
# plan that gives the embedding and head formats itself has quantized them already, and they are left alone
DEFAULT_WEIGHT = "W4G128"  # every other method
DEFAULT_OBSERVER = "minmax"


def method_default(method: str | tuple[str, ...], key: str, fallback: Any = None) -> Any:
    """The default of ``key`` ("weight", "activation", "observer", "smooth_alpha", "head") for ``method``."""
    last = method[-1] if isinstance(method, tuple) else method
    v = METHOD_DEFAULTS.get(last, {}).get(key, fallback)
    return v() if callable(v) else v


def method_chain(method) -> str | tuple[str, ...]:
    """``method`` as a name, or a tuple of names for a composition (a list of one collapses to the name)."""
    if isinstance(method, str):
        names: tuple[str, ...] = (method,)
    elif isinstance(method, (list, tuple)) and method and all(isinstance(m, str) for m in method):
        names = tuple(method)
    else:
        raise SchemeError(f"method must be a name or a list of names such as ['awq', 'gptq'], got {method!r}")
    for m in names:
        if m not in METHOD_PARAMS:
            raise SchemeError(f"unknown method {m!r}; known: {', '.join(METHOD_PARAMS)}")
    if len(names) == 1:
        return names[0]
    bad = [m for m in names if m not in COMPOSABLE]
    if bad:
        raise SchemeError(f"methods {bad} cannot be composed in a list; composable (layer by layer): "
                          f"{', '.join(COMPOSABLE)}")
    if len(set(names)) != len(names):
        raise SchemeError(f"method list {list(names)} names a method twice")
    return names


def _one_params(method: str, params) -> Any:
    cls = METHOD_PARAMS.get(method)
    if cls is None:
        if params is not None:
            raise SchemeError(f"method {method!r} takes no method_params")
        return None
    if params is None:
        try:
            return cls()
        except TypeError:
            raise SchemeError(f"method {method!r} needs method_params (a {cls.__name__})") from None
    if isinstance(params, Mapping):
        return cls.from_dict(params)
    if not isinstance(params, cls):
        raise SchemeError(f"method {method!r} takes {cls.__name__}, got {type(params).__name__}")
    return params


def resolve_method_params(method, params) -> Any:
    """The knobs for ``method``: defaults when None, from a dict, or checked against the method. For a list
    of methods, a tuple with one entry per method (given as a list/tuple in the same order, or None)."""
    if isinstance(method, str):
        return _one_params(method, params)
    if params is None:
        params = [None] * len(method)
    if not isinstance(params, (list, tuple)) or len(params) != len(method):
        raise SchemeError(f"method_params for {list(method)} is a list with one entry (or null) per method")
    return tuple(_one_params(m, p) for m, p in zip(method, params))


def params_to_json(params) -> Any:
    if params is None:
        return None
    if isinstance(params, tuple):
        return [None if p is None else p.to_dict() for p in params]
    return params.to_dict()


def migrate_config_dict(d: dict) -> dict:
    """Read configs written by earlier llmquant versions: ``GPTQParams(awq_scales=True, awq_grid=g)`` (the
    flag that chained AWQ's scales before GPTQ) becomes the method list ``["awq", "gptq"]``; a saved config
    without ``head`` (written before the embedding and head had a format of their own) kept them in float."""
    if "version" in d and "weight" in d and "head" not in d:
        d = {**d, "head": "fp32"}
    p = d.get("method_params")
    if d.get("method") == "gptq" and isinstance(p, Mapping) and ("awq_scales" in p or "awq_grid" in p):
        p = dict(p)
        chained, grid = p.pop("awq_scales", False), p.pop("awq_grid", 20)
        if chained:
            d = {**d, "method": ["awq", "gptq"], "method_params": [{"grid": grid}, p]}
        else:
            d = {**d, "method_params": p}
    return d


def resolve_calib(spec) -> CalibSpec | None:
    if spec is None or isinstance(spec, CalibSpec):
        return spec
    if isinstance(spec, Mapping):
        return CalibSpec.from_dict(spec)
    raise SchemeError(f"calibration must be a CalibSpec or a dict, got {type(spec).__name__}")
