"""Calibrated post-training quantization, PyTorch style: ``prepare`` -> run data -> ``convert``.

    cfg = QuantConfig(weight="W8", activation=QuantScheme(bits=8, granularity="tensor"), observer="mse")
    prepare(model, cfg)                 # observers on the selected linears' inputs (and weights)
    for x in data: model(x)             # or: calibrate(model, tokenizer, text, samples=64, seq_len=512)
    convert(model)                      # QuantLinear with int8 weights and a calibrated input scale

Works on any module holding ``nn.Linear`` layers (a plain MLP as in PyTorch's eager-mode example, or a
Hugging Face causal LM). ``quantize_static`` does the whole job on text, with SmoothQuant first when the
config asks for it. Calibration text comes from the end of the text (:func:`llmquant.io.calib_windows`),
disjoint from the evaluation windows.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import CalibrationError, SchemeError
from ..modules import QuantLinear, replace_module, select_linears
from ..observers import HistogramObserver, Observer, make_observer, parse_spec
from ..schemes import QuantConfig, check_finite, quantize_to_int, resolve_config
from .summary import QuantSummary, layer_row, untie_if_needed

log = logging.getLogger(__name__)

INPUT_OBSERVER = "llmquant_input_observer"
WEIGHT_OBSERVER = "llmquant_weight_observer"


def _check_config(cfg: QuantConfig) -> None:
    parse_spec(cfg.observer), parse_spec(cfg.weight_observer)  # unknown names raise SchemeError
    a = cfg.activation
    if a is not None and not a.dynamic and a.granularity != "tensor":
        raise SchemeError("static (calibrated) activation scales are per tensor: use granularity 'tensor', "
                          "or dynamic=True for per-token scales")


def prepare(model: nn.Module, config) -> nn.Module:
    """Attach observers to the selected linears of ``model`` (in place; returns it).

    Each selected ``nn.Linear`` gets a weight observer and, for a static activation scheme, an input
    observer run as a forward pre-hook. Observers hold no state-dict entries and do not change outputs.
    """
    cfg = resolve_config(config)
    _check_config(cfg)
    if getattr(model, "llmquant_prepared", None) is not None:
        raise CalibrationError("the model is already prepared; convert it (or prepare a fresh copy)")
    chosen = select_linears(model, cfg.targets, cfg.ignore)
    static = cfg.activation is not None and not cfg.activation.dynamic
    for name, lin in chosen:
        setattr(lin, WEIGHT_OBSERVER, make_observer(cfg.weight_observer, cfg.weight, label=name))
        if static:
            obs = make_observer(cfg.observer, cfg.activation, label=name)
            setattr(lin, INPUT_OBSERVER, obs)
            lin.register_forward_pre_hook(obs.hook)  # a bound method: deepcopy rebinds it to the copy
    model.llmquant_prepared = cfg
    log.info("prepared %d linears (%s observer%s)", len(chosen), cfg.observer if static else "no input",
             f", weights {cfg.weight_observer}")
    return model


def _remove_observer_hooks(lin: nn.Module) -> None:
    for k, h in list(lin._forward_pre_hooks.items()):
        if isinstance(getattr(h, "__self__", None), Observer):
            del lin._forward_pre_hooks[k]


def unprepare(model: nn.Module, targets: tuple[str, ...] = ()) -> nn.Module:
    """Remove the observers ``prepare`` attached (from the modules ``targets`` selects, names or ``re:``, or
    from all), leaving those float modules as they were."""
    from ..modules import matches

    for name, m in model.named_modules():
        if hasattr(m, WEIGHT_OBSERVER) and (not targets or matches(name, targets)):
            _remove_observer_hooks(m)
            for k in (WEIGHT_OBSERVER, INPUT_OBSERVER):
                if hasattr(m, k):
                    delattr(m, k)
    if not targets and hasattr(model, "llmquant_prepared"):
        del model.llmquant_prepared
    return model


@torch.no_grad()
def convert(model: nn.Module, *, observer: str | None = None, progress: bool = True) -> QuantSummary:
    """Replace each prepared linear by a :class:`QuantLinear` (in place) and return a summary.

    ``observer`` turns the collected statistics into ranges with another rule than the prepared one: a
    histogram-family observer (percentile, mse, histogram) can be read as any of them, or as min-max, so
    one calibration pass serves several choices.
    """
    cfg: QuantConfig | None = getattr(model, "llmquant_prepared", None)
    if cfg is None:
        raise CalibrationError("the model is not prepared: call llmquant.prepare(model, config) and run calibration data first")
    rederive = observer is not None and observer != cfg.observer
    if rederive:
        parse_spec(observer)
        cfg = cfg.with_(observer=observer)
    chosen = [(n, m) for n, m in model.named_modules() if hasattr(m, WEIGHT_OBSERVER)]
    static = cfg.activation is not None and not cfg.activation.dynamic
    # check every input observer first, so a missing calibration fails before anything is replaced
    in_obs = {}
    for name, lin in chosen:
        if static:
            obs = getattr(lin, INPUT_OBSERVER)
            if rederive:
                if not isinstance(obs, HistogramObserver):
                    raise CalibrationError(f"statistics of a {obs.name} observer cannot be read as {observer!r}; "
                                           "prepare with a histogram-family observer (percentile, mse, histogram)")
                obs = obs.derive(observer)
            in_obs[name] = obs.calculate_qparams()
    t0 = time.perf_counter()
    summary = QuantSummary(method=cfg.method, config=cfg.to_dict())
    summary.untied_lm_head = untie_if_needed(model, [n for n, _ in chosen])
    for name, lin in tqdm(chosen, desc=f"convert ({cfg.observer})", disable=not progress, leave=False):
        w = lin.weight.detach()
        check_finite(w, name)
        wobs = getattr(lin, WEIGHT_OBSERVER)
        wobs.observe(w)
        scale, zero = wobs.calculate_qparams()
        q = quantize_to_int(w, scale, zero, cfg.weight)
        in_scale, in_zero = in_obs.get(name, (None, None))
        qlin = QuantLinear.from_quantized(q, scale, zero, cfg.weight, bias=lin.bias, activation_scheme=cfg.activation,
                                          input_scale=in_scale, input_zero=in_zero).to(w.device)
        _remove_observer_hooks(lin)
        summary.layers.append(layer_row(name, w, qlin.dequantize_weight(dtype=torch.float32, device=w.device), qlin,
                                        orig=lin, scheme=cfg.weight.name))
        replace_module(model, name, qlin)
    summary.seconds = time.perf_counter() - t0
    del model.llmquant_prepared
    model.llmquant_config = cfg
    log.info("%s", summary)
    return summary


# ---- calibration data ------------------------------------------------------------------------------------
def _runner(model: nn.Module) -> nn.Module:
    """The base model (no LM head: a fifth of the work on small models) when every hooked module is in it."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        return model
    inside = {id(m) for m in base.modules()}
    hooked = [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]
    return base if all(id(m) in inside for m in hooked) else model


@torch.inference_mode()
def calibrate(model: nn.Module, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = True) -> int:
    """Run token windows (samples, seq_len) through ``model`` (prepared, or carrying other statistics hooks);
    returns the number of tokens seen. ``llmquant.calibrate`` makes the windows from text."""
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    run = _runner(model)
    for i in tqdm(range(0, windows.shape[0], batch_size), desc="calibrate", disable=not progress, leave=False):
        run(windows[i : i + batch_size].to(dev))
    return windows.numel()


def run_static(model: nn.Module, config, windows: torch.Tensor, progress: bool = True) -> QuantSummary:
    """The ``static`` / ``smoothquant`` methods' handler (see :func:`quantize_static`)."""
    return quantize_static(model, config, windows, progress=progress)


def quantize_static(model: nn.Module, config, windows: torch.Tensor, *, arch=None, progress: bool = True) -> QuantSummary:
    """SmoothQuant (when ``config.smooth_alpha`` is set), prepare, calibrate on ``windows``, convert; in place.
    ``llmquant.quantize_static`` makes the windows from text (checked before the first pass)."""
    from .smooth import SmoothingStats, smooth, smoothing_pairs

    cfg = resolve_config(config)
    _check_config(cfg)
    t0 = time.perf_counter()
    wins = windows
    if cfg.smooth_alpha is None:
        prepare(model, cfg)
        try:
            calibrate(model, windows=wins, progress=progress)
        except BaseException:
            unprepare(model)
            raise
    else:
        # one pass serves both SmoothQuant and min-max scales: smoothing divides input channel j of the
        # consuming linears by s_j and leaves other inputs unchanged, so the smoothed per-tensor range is
        # (min_j lo_j / s_j, max_j hi_j / s_j); other observers need a second pass over the smoothed model
        exact_one_pass = parse_spec(cfg.observer)[0] in ("minmax", "min_max")
        stats = SmoothingStats(model, smoothing_pairs(model, arch), keep_samples=int(cfg.smooth_alpha == "search"))
        chan, handles = {}, []
        if exact_one_pass and cfg.activation is not None and not cfg.activation.dynamic:
            for name, lin in select_linears(model, cfg.targets, cfg.ignore):
                chan[name] = make_observer("minmax", cfg.activation, ch_axis=-1, label=name)
                handles.append(lin.register_forward_pre_hook(chan[name].hook))
        try:
            calibrate(model, windows=wins, progress=progress)
        finally:
            stats.remove()
            for h in handles:
                h.remove()
        factors = smooth(model, stats, cfg.smooth_alpha, observer=cfg.observer)
        prepare(model, cfg)
        if chan:
            s_of = {t: factors[p.source] for p in stats.pairs for t in p.targets}
            for name, lin in model.named_modules():
                obs = getattr(lin, INPUT_OBSERVER, None)
                if obs is not None:
                    lo, hi = chan[name].range()
                    s = s_of.get(name, torch.ones((), device=lo.device)).to(lo.device)
                    obs.min_val, obs.max_val = (lo / s).min().reshape(1), (hi / s).max().reshape(1)
                    obs.count, obs.out_shape = 1, (1, 1)
        else:
            try:
                calibrate(model, windows=wins, progress=progress)
            except BaseException:
                unprepare(model)
                raise
    summary = convert(model, progress=progress)
    summary.seconds = time.perf_counter() - t0
    return summary
