"""Quantization schemes (what to quantize and how) and the math primitives on tensors."""

from .scheme import PRESETS, QuantConfig, QuantScheme, resolve_config, resolve_scheme, scheme_for
from .methods import COMPOSABLE, AWQParams, BlockQATParams, CalibSpec, GPTQParams, METHOD_PARAMS, QATParams, RTNParams
from .methods import AutoRoundParams, HQQParams
from .primitives import (
    dequantize,
    fake_quantize,
    compute_qparams,
    quantize_to_int,
    expand_groups,
    sqnr_db,
    check_finite,
    minmax,
    qparams_from_minmax,
)

__all__ = [
    "AWQParams",
    "COMPOSABLE",
    "QATParams",
    "BlockQATParams",
    "AutoRoundParams",
    "HQQParams",
    "scheme_for",
    "CalibSpec",
    "GPTQParams",
    "RTNParams",
    "METHOD_PARAMS",
    "PRESETS",
    "QuantConfig",
    "QuantScheme",
    "resolve_config",
    "resolve_scheme",
    "compute_qparams",
    "quantize_to_int",
    "dequantize",
    "fake_quantize",
    "expand_groups",
    "sqnr_db",
    "check_finite",
    "minmax",
    "qparams_from_minmax",
]

from .formats import (DEFAULT_CANDIDATES, GGUF_CANDIDATES, FloatFormat, format_bytes, format_name, gguf_bytes,  # noqa: E402
                      gguf_type, resolve_format)
from .plan import Plan, is_plan_like, resolve_plan  # noqa: E402

METHOD_PARAMS["plan"] = Plan  # a mixed-precision plan is the "plan" method's knobs

__all__ += ["DEFAULT_CANDIDATES", "GGUF_CANDIDATES", "FloatFormat", "gguf_bytes", "gguf_type", "Plan", "format_bytes", "format_name", "is_plan_like",
            "resolve_format", "resolve_plan"]
