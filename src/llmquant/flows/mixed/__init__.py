"""Mixed precision: per-layer sensitivity, a budget solved into a per-layer plan, applying a plan, and
bf16/fp16 autocast / half-precision storage."""

from .apply import apply_plan, plan_targets
from .llama_presets import llama_cpp_bytes, llama_cpp_plan
from .autocast import autocast, fp16_autocast_supported, to_half
from .sensitivity import Sensitivity, sensitivity
from .solve import parse_size, plan_from_sensitivity, plan_mixed_precision, solve_knapsack

__all__ = [
    "Sensitivity",
    "apply_plan",
    "autocast",
    "fp16_autocast_supported",
    "llama_cpp_bytes",
    "llama_cpp_plan",
    "parse_size",
    "plan_from_sensitivity",
    "plan_mixed_precision",
    "plan_targets",
    "sensitivity",
    "solve_knapsack",
    "to_half",
]
