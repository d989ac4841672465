"""The method registry and the one entry point, ``quantize(model, config)``.

A method is a :class:`Method`: a name, the type of its knobs (``QuantConfig.method_params``), whether it
needs calibration data, and a handler ``run(model, config, calib, progress) -> QuantSummary``. Methods that
work layer by layer also give a :class:`~llmquant.flows.pipeline.Stage` factory: the pipeline runs them,
and they compose as a list (``method=["awq", "gptq"]``). The PyTorch-style faces (``prepare``/``convert``,
``quantize_dynamic``, ``prepare_qat``/``convert_qat``, a mixed-precision plan) run on the same handlers.

Adding a method::

    register_method(Method("mymethod", run=my_run, params=MyParams, calibrated=True))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from ..errors import SchemeError
from ..schemes import QuantConfig, is_plan_like, resolve_config
from ..schemes.methods import COMPOSABLE, METHOD_PARAMS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[..., Any]  # (model, cfg, calib, progress) -> QuantSummary
    params: type | None = None  # the frozen dataclass of its knobs (None: it has none)
    calibrated: bool = False  # needs calibration windows (token ids) or inputs
    stage: Callable[..., Any] | None = None  # (cfg, params) -> pipeline Stage, for layer-by-layer composition
    doc: str = ""
    streams: bool = True  # runs on a streamed model (layers read from the checkpoint as the pipeline reaches them)

    def needs_data(self, params=None) -> bool:
        """Whether it needs calibration data with these knobs (a params type may ask for it itself through a
        ``calibrated`` property, e.g. RTN's importance-weighted range search)."""
        return self.calibrated or bool(getattr(params, "calibrated", False))


METHODS: dict[str, Method] = {}
#: llama.cpp file types that name a per-tensor mixture ("gguf:Q4_K_M"); "gguf:Q6_K" / "gguf:Q2_K" stay one
#: scheme for every Linear (the mixtures of those names: :func:`llmquant.flows.mixed.llama_cpp_plan`)
LLAMA_MIXTURES = ("Q3_K_M", "Q4_K_M", "Q5_K_M")


def register_method(method: Method) -> Method:
    """Make ``method`` available to :func:`quantize`, to configs (``QuantConfig(method=name)``) and to the CLI."""
    METHODS[method.name] = method
    METHOD_PARAMS[method.name] = method.params
    if method.stage is not None and method.name not in COMPOSABLE:
        COMPOSABLE.append(method.name)
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise SchemeError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def needs_calibration(cfg: QuantConfig) -> bool:
    params = cfg.method_params if isinstance(cfg.method, tuple) else (cfg.method_params,)
    return any(get_method(m).needs_data(p) for m, p in zip(cfg.methods, params))


def is_llama_mixture(config) -> bool:
    """True for the name of a llama.cpp per-tensor mixture (``"gguf:Q4_K_M"``, :data:`LLAMA_MIXTURES`)."""
    return isinstance(config, str) and config.lower().startswith("gguf:") and config[5:].upper() in LLAMA_MIXTURES


def resolve(config, model: nn.Module | None = None) -> QuantConfig:
    """A QuantConfig from anything ``quantize`` takes: a config, scheme, preset name or dict, or a
    mixed-precision Plan (or its dict or .json file), or, given the ``model``, a llama.cpp mixture name
    (``"gguf:Q4_K_M"``). A saved folder's recipe is read by :func:`llmquant.io.read_recipe`
    (``llmquant.quantize`` does it for a path)."""
    if is_llama_mixture(config):
        if model is None:
            raise SchemeError(f"{config} is llama.cpp's per-tensor mixture: it needs the model to choose each "
                              "tensor's type (quantize(model, ...) or llmquant.llama_cpp_plan(model, ...))")
        from .mixed.llama_presets import llama_cpp_plan

        config = llama_cpp_plan(model, config)
    if is_plan_like(config):
        from ..schemes import resolve_plan

        return QuantConfig(method="plan", method_params=resolve_plan(config))
    return resolve_config(config)


def quantize(model: nn.Module, config="W4G128", *, calib=None, progress: bool = True):
    """Quantize ``model`` in place with ``config`` and return a :class:`~llmquant.flows.QuantSummary`.

    ``config``: a :class:`QuantConfig` (its ``method`` picks the registered handler), a scheme or preset
    name (RTN), a dict, a mixed-precision Plan, or a llama.cpp mixture (``"gguf:Q4_K_M"``, ``"gguf:Q3_K_M"``,
    ... : llama.cpp's per-tensor k-quant types for this model, see :mod:`llmquant.flows.mixed.llama_presets`).
    Calibrated methods take ``calib``: token ids (windows, seq_len) or float inputs (n, ...);
    :func:`llmquant.quantize` makes them from text.
    """
    cfg = resolve(config, model)
    methods = [get_method(m) for m in cfg.methods]
    if getattr(model, "llmquant_layer_source", None) is not None and not all(m.streams for m in methods):
        raise SchemeError(f"method {cfg.method!r} needs the whole model in memory; load it without stream=True "
                          "(methods that stream: " + ", ".join(m for m, v in METHODS.items() if v.streams) + ")")
    if needs_calibration(cfg) and calib is None:
        raise SchemeError(f"method {cfg.method!r} needs calibration data: pass calib= (token ids or inputs)")
    if len(methods) > 1:  # a composition: the layer-wise stages of each, on the pipeline
        from .pipeline import run_stages

        summary = run_stages(model, cfg, calib, progress=progress)
    else:
        summary = methods[0].run(model, cfg, calib, progress)
    from .heads import quantize_heads

    quantize_heads(model, cfg, summary)  # the embedding and the output head (cfg.head)
    return summary
