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

import json
import logging
from dataclasses import dataclass
from pathlib import Path
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


METHODS: dict[str, Method] = {}


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
    return any(get_method(m).calibrated for m in cfg.methods)


def resolve(config) -> QuantConfig:
    """A QuantConfig from anything ``quantize`` takes: a config, scheme, preset name or dict, a
    mixed-precision Plan (or its dict or .json file), or an llmquant folder (its manifest's recipe)."""
    if isinstance(config, Path) or (isinstance(config, str) and ("/" in config or config.endswith(".json"))):
        p = Path(config).expanduser()
        if not p.exists():
            raise SchemeError(f"{str(config)!r} is neither a preset nor an existing folder or JSON file; give a "
                              "folder written by llmquant, a QuantConfig or plan .json file, or a preset such as W4G64")
        if p.is_dir() and not (p / "llmquant.json").is_file():
            raise SchemeError(f"{str(config)!r} holds no llmquant.json: it is not a folder written by llmquant")
    if isinstance(config, (str, Path)) and str(config).endswith(".json") and Path(config).expanduser().is_file():
        try:
            config = json.loads(Path(config).expanduser().read_text())  # a plan or a QuantConfig, as JSON
        except json.JSONDecodeError as e:
            raise SchemeError(f"{config} is not valid JSON: {e}") from None
    if isinstance(config, (str, Path)) and (Path(config).expanduser() / "llmquant.json").is_file():
        manifest = json.loads((Path(config).expanduser() / "llmquant.json").read_text())
        if manifest.get("plan"):
            config = manifest["plan"]
        elif manifest.get("config"):
            config = manifest["config"]
        else:
            raise SchemeError(f"{config} records no quantization config to reproduce")
    if is_plan_like(config):
        from ..schemes import resolve_plan

        return QuantConfig(method="plan", method_params=resolve_plan(config))
    return resolve_config(config)


def quantize(model: nn.Module, config="W4G128", *, calib=None, progress: bool = True):
    """Quantize ``model`` in place with ``config`` and return a :class:`~llmquant.flows.QuantSummary`.

    ``config``: a :class:`QuantConfig` (its ``method`` picks the registered handler), a scheme or preset
    name (RTN), a dict, a mixed-precision Plan, or a folder written by ``llmquant.save`` (its recipe).
    Calibrated methods take ``calib``: token ids (windows, seq_len) or float inputs (n, ...);
    :func:`llmquant.quantize` makes them from text.
    """
    cfg = resolve(config)
    if len(cfg.methods) > 1:
        from .pipeline import run_stages

        if needs_calibration(cfg) and calib is None:
            raise SchemeError(f"methods {list(cfg.methods)} need calibration data: pass calib= (token ids or inputs)")
        return run_stages(model, cfg, calib, progress=progress)
    method = get_method(cfg.method)
    if getattr(model, "llmquant_layer_source", None) is not None and not method.streams:
        raise SchemeError(f"method {cfg.method!r} needs the whole model in memory; load it without stream=True "
                          "(methods that stream: " + ", ".join(m for m, v in METHODS.items() if v.streams) + ")")
    if method.calibrated and calib is None:
        raise SchemeError(f"method {cfg.method!r} needs calibration data: pass calib= (token ids or inputs)")
    return method.run(model, cfg, calib, progress)
