"""Calibrated post-training quantization, PyTorch style: ``prepare`` -> run data -> ``convert``.

    cfg = QuantConfig(weight="W8", activation=QuantScheme(bits=8, granularity="tensor"), observer="mse")
    prepare(model, cfg)                 # observers on the selected linears' inputs (and weights)
    for x in data: model(x)             # or: calibrate(model, tokenizer, text, samples=64, seq_len=512)
    convert(model)                      # QuantLinear with int8 weights and a calibrated input scale

Works on any module holding ``nn.Linear`` layers (a plain MLP as in PyTorch's eager-mode example, or a
Hugging Face causal LM). ``quantize_static`` does the whole job on text, with SmoothQuant first when the
config asks for it. Calibration text comes from the end of the text (:func:`llmquant.data.calibration_windows`),
disjoint from the evaluation windows.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import CalibrationError, SchemeError
from ..modules import QuantLinear, replace_module, select_linears
from ..observers import HistogramObserver, Observer, make_observer, parse_spec
from ..schemes import QuantConfig, check_finite, quantize_to_int, resolve_config
from ..models import arch_for
from .stages import Stage
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
    static = _static(cfg)
    for name, lin in chosen:
        attach_observers(name, lin, cfg)
    model.llmquant_prepared = cfg
    log.info("prepared %d linears (%s observer%s)", len(chosen), cfg.observer if static else "no input",
             f", weights {cfg.weight_observer}")
    return model


def _static(cfg: QuantConfig) -> bool:
    return cfg.activation is not None and not cfg.activation.dynamic


def attach_observers(name: str, lin: nn.Module, cfg: QuantConfig) -> None:
    """A weight observer on ``lin`` and, for a static activation scheme, an input observer run as a forward
    pre-hook (observers hold no state-dict entries and do not change outputs)."""
    setattr(lin, WEIGHT_OBSERVER, make_observer(cfg.weight_observer, cfg.weight, label=name))
    if _static(cfg):
        obs = make_observer(cfg.observer, cfg.activation, label=name)
        setattr(lin, INPUT_OBSERVER, obs)
        lin.register_forward_pre_hook(obs.hook)  # a bound method: deepcopy rebinds it to the copy


def _remove_observer_hooks(lin: nn.Module) -> None:
    for k, h in list(lin._forward_pre_hooks.items()):
        if isinstance(getattr(h, "__self__", None), Observer):
            del lin._forward_pre_hooks[k]


def _detach(linears: dict) -> None:
    for m in linears.values():
        _remove_observer_hooks(m)
        for k in (WEIGHT_OBSERVER, INPUT_OBSERVER):
            if hasattr(m, k):
                delattr(m, k)


def unprepare(model: nn.Module, targets: tuple[str, ...] = ()) -> nn.Module:
    """Remove the observers ``prepare`` attached (from the modules ``targets`` selects, names or ``re:``, or
    from all), leaving those float modules as they were."""
    from ..modules import matches

    _detach({n: m for n, m in model.named_modules()
             if hasattr(m, WEIGHT_OBSERVER) and (not targets or matches(name=n, patterns=targets))})
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
    in_obs = input_qparams(chosen, cfg, observer if rederive else None)
    t0 = time.perf_counter()
    summary = QuantSummary(method=cfg.method, config=cfg.to_dict())
    summary.untied_lm_head = untie_if_needed(model, [n for n, _ in chosen])
    for name, lin in tqdm(chosen, desc=f"convert ({cfg.observer})", disable=not progress, leave=False):
        qlin, row = convert_linear(name, lin, cfg, in_obs.get(name, (None, None)))
        summary.layers.append(row)
        replace_module(model, name, qlin)
    summary.seconds = time.perf_counter() - t0
    del model.llmquant_prepared
    model.llmquant_config = cfg
    log.info("%s", summary)
    return summary


def input_qparams(chosen, cfg: QuantConfig, observer: str | None = None) -> dict:
    """Each prepared linear's input (scale, zero) from its observer (read with the ``observer`` rule when
    given); every observer is checked first, so a missing calibration fails before anything is replaced."""
    in_obs = {}
    if not _static(cfg):
        return in_obs
    for name, lin in chosen:
        obs = getattr(lin, INPUT_OBSERVER)
        if observer is not None:
            if not isinstance(obs, HistogramObserver):
                raise CalibrationError(f"statistics of a {obs.name} observer cannot be read as {observer!r}; "
                                       "prepare with a histogram-family observer (percentile, mse, histogram)")
            obs = obs.derive(observer)
        in_obs[name] = obs.calculate_qparams()
    return in_obs


def convert_linear(name: str, lin: nn.Module, cfg: QuantConfig, in_qparams) -> tuple[QuantLinear, object]:
    """The QuantLinear of a prepared linear (weight qparams from its weight observer, the given input
    qparams) and its summary row; the observers' hooks are removed from ``lin``."""
    w = lin.weight.detach()
    check_finite(w, name)
    wobs = getattr(lin, WEIGHT_OBSERVER)
    wobs.observe(w)
    scale, zero = wobs.calculate_qparams()
    q = quantize_to_int(w, scale, zero, cfg.weight)
    in_scale, in_zero = in_qparams
    qlin = QuantLinear.from_quantized(q, scale, zero, cfg.weight, bias=lin.bias, activation_scheme=cfg.activation,
                                      input_scale=in_scale, input_zero=in_zero).to(w.device)
    _remove_observer_hooks(lin)
    row = layer_row(name, w, None, qlin, orig=lin,
                    scheme=cfg.weight.name)
    return qlin, row


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


def run_static(model: nn.Module, config, windows: torch.Tensor, progress: bool = True, *, arch=None) -> QuantSummary:
    """The ``static`` / ``smoothquant`` methods' handler: SmoothQuant (when ``config.smooth_alpha`` is set),
    observers, convert, layer by layer on the pipeline (:class:`StaticStage`); in place. The next layer is
    calibrated on the float layer's outputs, which gives the statistics one float pass over the model
    gives. Linears outside the decoder layers (an output head that is not ignored) need that whole pass:
    the model is then calibrated as one block."""
    from .passes import decoder_layers
    from .pipeline import run_stages

    cfg = resolve_config(config)
    _check_config(cfg)
    found = decoder_layers(model, arch_for(model))
    chosen = select_linears(model, cfg.targets, cfg.ignore)
    outside = found is None or any(not n.startswith(found[0] + ".") for n, _ in chosen)
    return run_stages(model, cfg, windows, progress=progress, stages=[StaticStage(cfg, arch=arch)],
                      names=[n for n, _ in chosen], whole_model=outside)


def quantize_static(model: nn.Module, config, windows: torch.Tensor, *, arch=None, progress: bool = True) -> QuantSummary:
    """SmoothQuant (when ``config.smooth_alpha`` is set), observers, calibration on ``windows`` and convert,
    in place: the ``static`` method (``smoothquant`` with a smoothing strength). ``arch``: an
    :class:`~llmquant.models.ArchSpec` giving the norm -> linears pairs of a family llmquant has no record
    of. ``llmquant.quantize_static`` makes the windows from text."""
    cfg = resolve_config(config)
    if cfg.method not in ("static", "smoothquant"):
        cfg = cfg.with_(method="smoothquant" if cfg.smooth_alpha is not None else "static")
    return run_static(model, cfg, windows, progress=progress, arch=arch)


class StaticStage(Stage):
    """Static activation scales (and SmoothQuant) for one block. Observers watch the block's float pass;
    with ``smooth_alpha``, SmoothQuant's per-channel extremes are gathered in the same pass, the factors
    folded in, and the input observers read either from that pass (min-max: smoothing divides input channel
    j of the consuming linears by s_j, so the smoothed range is (min_j lo_j / s_j, max_j hi_j / s_j),
    exactly) or from a second float pass over the smoothed block (other observers)."""

    needs_gram = False
    propagate_float = True
    calib_batch = 1  # one window per forward, as observers such as moving averages count calls
    split_blocks = False
    error_windows = 4  # the error pass runs the quantized layer a second time: keep it short

    @property
    def label(self) -> str:
        return f"{self.cfg.weight.name} static"

    def __init__(self, cfg: QuantConfig, params=None, *, arch=None) -> None:
        super().__init__(cfg, params)
        self.arch = arch  # an ArchSpec for a family llmquant has no record of (its norm -> linears pairs)

    def setup(self, model: nn.Module, arch) -> None:
        from .smooth import smoothing_pairs

        self.model = model
        self.pairs = smoothing_pairs(model, self.arch or arch) if self.cfg.smooth_alpha is not None else []
        self.one_pass = parse_spec(self.cfg.observer)[0] in ("minmax", "min_max") and _static(self.cfg)
        self._state: dict = {}

    @contextlib.contextmanager
    def observe(self, ctx):
        from .smooth import SmoothingStats

        if self.cfg.smooth_alpha is None:
            for name, lin in ctx.linears.items():
                attach_observers(name, lin, self.cfg)
            try:
                yield
            except BaseException:
                _detach(ctx.linears)
                raise
            return
        pairs = [p for p in self.pairs if not ctx.prefix or p.source.startswith(ctx.prefix + ".")]
        stats = SmoothingStats(self.model, pairs, keep_samples=int(self.cfg.smooth_alpha == "search"))
        chan, handles = {}, []
        if self.one_pass:
            for name, lin in ctx.linears.items():
                chan[name] = make_observer("minmax", self.cfg.activation, ch_axis=-1, label=name)
                handles.append(lin.register_forward_pre_hook(chan[name].hook))
        try:
            yield
        finally:
            stats.remove()
            for h in handles:
                h.remove()
        self._state[ctx.prefix] = (stats, chan)

    def reduce(self, ctx) -> None:
        """A distributed run: the observers' and SmoothQuant's statistics combined over the ranks."""
        from . import distributed

        group = distributed.active()
        if group is None:
            return
        if self.cfg.smooth_alpha is None:
            self._reduce_inputs(ctx)
            return
        stats, chan = self._state[ctx.prefix]
        for src, obs in stats.observers.items():
            distributed.reduce_observer(obs, f"SmoothQuant's statistics of {src}")
        for src in stats.samples:  # the alpha search's samples: the first batch's, which rank 0 holds
            stats.samples[src] = group.broadcast(stats.samples[src], 0, f"SmoothQuant's samples of {src}")
        for name, obs in chan.items():
            distributed.reduce_observer(obs, f"the input channels of {name}")

    def _reduce_inputs(self, ctx) -> None:
        from . import distributed

        if _static(self.cfg):
            for name, lin in ctx.linears.items():
                distributed.reduce_observer(getattr(lin, INPUT_OBSERVER), f"the input observer of {name}")

    def transform(self, ctx) -> None:
        from .smooth import smooth

        if self.cfg.smooth_alpha is None:
            return
        stats, chan = self._state.pop(ctx.prefix)
        factors = smooth(self.model, stats, self.cfg.smooth_alpha, observer=self.cfg.observer)
        for name, lin in ctx.linears.items():
            attach_observers(name, lin, self.cfg)
        if chan:
            s_of = {t: factors[p.source] for p in stats.pairs for t in p.targets}
            for name, lin in ctx.linears.items():
                obs = getattr(lin, INPUT_OBSERVER)
                lo, hi = chan[name].range()
                s = s_of.get(name, torch.ones((), device=lo.device)).to(lo.device)
                obs.min_val, obs.max_val = (lo / s).min().reshape(1), (hi / s).max().reshape(1)
                obs.count, obs.out_shape = 1, (1, 1)
        else:
            ctx.rerun()  # the observers see the smoothed block's inputs
            self._reduce_inputs(ctx)

    def quantize(self, ctx):
        chosen = list(ctx.linears.items())
        in_obs = input_qparams(chosen, self.cfg)
        return {name: convert_linear(name, lin, self.cfg, in_obs.get(name, (None, None))) for name, lin in chosen}

    def build(self, name, lin, result):
        return result
