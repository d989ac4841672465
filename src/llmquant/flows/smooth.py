"""SmoothQuant over a model: find the source -> linears pairs from architecture data, gather the per-channel
input extremes on calibration text, fold the factors in (math in :mod:`llmquant.algorithms.smoothquant`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..algorithms.fold import fold_scale_modules
from ..algorithms.smoothquant import smoothing_factors, weight_absmax
from ..errors import MappingError
from ..models import ArchSpec, arch_for
from ..observers import MinMaxObserver
from ..schemes import QuantScheme
from ..schemes.primitives import from_grid, round_to_grid
from ..models.trace import decoder_layers
from .folds import fold_plan, layer_pairs

log = logging.getLogger(__name__)

_STATS_SCHEME = QuantScheme(bits=8, granularity="tensor")  # only used for layout; ch_axis=-1 keeps channels


@dataclass(frozen=True)
class SmoothPair:
    source: str  # a norm or a linear whose output feeds `targets`
    targets: tuple[str, ...]
    offset: float = 0.0  # the source norm's weight offset (see fold_scale)


def smoothing_pairs(model: nn.Module, arch: ArchSpec | None = None, *, linear_pairs: bool = True) -> list[SmoothPair]:
    """Every (source, consuming linears) pair of ``model``, from ``arch`` or the known architectures, checked
    against (or, when none are declared, found by) a trace of its first decoder layer."""
    plan = fold_plan(
        model, arch, what="SmoothQuant", linear_pairs=linear_pairs,
        hint="pass arch=llmquant.models.ArchSpec(model_types=(...), layers='model.layers', embed=..., final_norm=..., "
             "norm_to_linears=(('input_layernorm', ('self_attn.q_proj', ...)), ...)), or add an entry to "
             "llmquant.models.arch.ARCHS")
    found = decoder_layers(model, arch or arch_for(model))
    if found is None:
        raise MappingError(f"{type(model).__name__} has no list of decoder layers to fold scales in")
    path, layers = found
    pairs = []
    for i in range(len(layers)):
        for src, targets in layer_pairs(layers[i], plan.pairs_of(i), f"the mapping for {type(model).__name__}"):
            pairs.append(SmoothPair(f"{path}.{i}.{src}", tuple(f"{path}.{i}.{t}" for t in targets), plan.offset(src)))
    return pairs


class SmoothingStats:
    """Per-input-channel extremes of each pair's input, observed on its first consuming linear; with
    ``keep_samples`` the first that many calls' inputs are kept too (for the per-layer alpha search)."""

    def __init__(self, model: nn.Module, pairs: list[SmoothPair], keep_samples: int = 0) -> None:
        self.pairs = pairs
        self.observers: dict[str, MinMaxObserver] = {}
        self.samples: dict[str, list[torch.Tensor]] = {p.source: [] for p in pairs}
        self._handles = []
        for p in pairs:
            obs = MinMaxObserver(_STATS_SCHEME, ch_axis=-1, label=p.targets[0])
            self.observers[p.source] = obs
            self._handles.append(model.get_submodule(p.targets[0]).register_forward_pre_hook(obs.hook))
            if keep_samples:
                keep = self.samples[p.source]

                def hook(mod, args, keep=keep):
                    if len(keep) < keep_samples:
                        keep.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())

                self._handles.append(model.get_submodule(p.targets[0]).register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def absmax(self, source: str) -> torch.Tensor:
        lo, hi = self.observers[source].range()
        return torch.maximum(lo.abs(), hi.abs()).reshape(-1)


ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@torch.no_grad()
def smooth(model: nn.Module, stats: SmoothingStats, alpha: float | str = 0.5, *, observer: str = "mse",
           grid=ALPHA_GRID) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant factors for every pair of ``stats`` into ``model`` in place; returns them by source.

    ``alpha="search"`` picks, per pair, the alpha of ``grid`` with the smallest int8 output error of the
    consuming linears on the kept samples (``SmoothingStats(keep_samples=...)``), activations quantized per
    tensor with ``observer``'s rule; the choices are in ``stats.chosen_alphas`` afterwards.
    """
    from ..algorithms.smoothquant import search_alpha
    from ..observers import make_observer

    stats.remove()
    factors = {}
    stats.chosen_alphas = {}
    for p in stats.pairs:
        targets = [model.get_submodule(t) for t in p.targets]
        a = alpha
        if alpha == "search":
            sample = stats.samples.get(p.source)
            if not sample:
                raise MappingError("alpha='search' needs samples: gather stats with SmoothingStats(..., keep_samples=1)")
            x = torch.cat(sample)

            def fq(v):
                o = make_observer(observer, _STATS_SCHEME)
                o(v)
                sc, z = o.calculate_qparams()
                return from_grid(round_to_grid(v, sc, z, _STATS_SCHEME), sc, z, _STATS_SCHEME)

            a, _ = search_alpha(x, stats.absmax(p.source), targets, grid, fq)
            stats.chosen_alphas[p.source] = a
        s = smoothing_factors(stats.absmax(p.source).to(targets[0].weight.device), weight_absmax(targets), a)
        fold_scale_modules(model.get_submodule(p.source), targets, s, p.offset)
        factors[p.source] = s
    log.info("SmoothQuant (alpha %s) folded into %d sources", alpha, len(factors))
    return factors
