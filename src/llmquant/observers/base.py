"""The observer interface and its registry.

An observer watches tensors (a layer's inputs during calibration, or a weight once), keeps statistics,
and turns them into a range ``(lo, hi)`` and then ``(scale, zero)`` through the one set of grid
conventions in :func:`llmquant.schemes.qparams_from_minmax`. What differs between observers is only how
the range is chosen (min-max, moving average, percentile, minimum MSE, minimum KL).

Granularity follows the scheme: ``tensor`` gives one range; ``channel`` / ``group`` give one range per row
(per group) with the reduction over the last dimension, exactly as the primitives do for weights, so the
result has the primitives' ``(rows, groups)`` shape. ``ch_axis=-1`` instead keeps one range per feature
of the last dimension (an activation's input channels, as SmoothQuant needs); its shape is ``(1, K)``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ..errors import CalibrationError, SchemeError
from ..schemes import QuantScheme, qparams_from_minmax
from ..schemes.primitives import _grouped

OBSERVERS: dict[str, type["Observer"]] = {}


def register_observer(*names: str) -> Callable[[type["Observer"]], type["Observer"]]:
    def deco(cls):
        cls.name = names[0]
        for n in names:
            OBSERVERS[n] = cls
        return cls

    return deco


def parse_spec(spec: str) -> tuple[str, float | None]:
    """``"percentile:99.9"`` -> ("percentile", 99.9); ``"mse"`` -> ("mse", None)."""
    name, _, arg = spec.partition(":")
    name = name.strip().lower().replace("-", "_")
    if name not in OBSERVERS:
        raise SchemeError(f"unknown observer {spec!r}; known: {', '.join(sorted(set(OBSERVERS)))}")
    if not arg:
        return name, None
    try:
        return name, float(arg)
    except ValueError:
        raise SchemeError(f"observer argument in {spec!r} must be a number") from None


def make_observer(spec: "str | Observer", scheme: QuantScheme, *, ch_axis: int | None = None, label: str = "") -> "Observer":
    """An observer from a registry spec (``"minmax"``, ``"percentile:99.9"``, ``"mse"``, ``"histogram"``)."""
    if isinstance(spec, Observer):
        return spec
    name, arg = parse_spec(spec)
    cls = OBSERVERS[name]
    return cls(scheme, ch_axis=ch_axis, label=label, **({} if arg is None else {cls.arg_name: arg}))


class Observer(nn.Module):
    """Base class: ``observe(x)`` accumulates, ``range()`` -> (lo, hi), ``calculate_qparams()`` -> (scale, zero).

    Statistics are plain attributes (not buffers), so an observer never enters a state dict. Calling the
    module observes and returns its input unchanged; :meth:`hook` is a forward pre-hook that observes a
    layer's input.
    """

    name = "?"
    arg_name = "arg"

    def __init__(self, scheme: QuantScheme, ch_axis: int | None = None, label: str = "") -> None:
        super().__init__()
        if ch_axis not in (None, 0, -1):
            raise SchemeError(f"ch_axis must be None (from the scheme), 0 (rows) or -1 (last dim), got {ch_axis!r}")
        if ch_axis is None:
            if scheme.granularity == "token":
                raise SchemeError("per-token activation scales are dynamic (computed at run time); observers make "
                                  "static ones: use granularity 'tensor'")
            ch_axis = None if scheme.granularity == "tensor" else 0
        self.scheme = scheme
        self.ch_axis = ch_axis
        self.label = label  # the observed module's name, for error messages
        self.out_shape: tuple[int, ...] | None = None
        self.count = 0  # tensors observed

    # ---- layout -------------------------------------------------------------------------------
    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (C, N) float: one row of values per range to estimate."""
        x = x.detach().float()
        if self.ch_axis is None:
            shape, xc = (1, 1), x.reshape(1, -1)
        elif self.ch_axis == -1:
            xc = x.reshape(-1, x.shape[-1]).t()
            shape = (1, x.shape[-1])
        else:
            g = _grouped(x, self.scheme)  # (rows, groups, len)
            shape, xc = (g.shape[0], g.shape[1]), g.reshape(-1, g.shape[-1])
        if self.out_shape is not None and self.out_shape != shape:
            raise CalibrationError(f"observer{self._where()} saw shape {tuple(x.shape)}, inconsistent with earlier inputs")
        self.out_shape = shape
        return xc

    def _where(self) -> str:
        return f" of {self.label}" if self.label else ""

    # ---- interface ----------------------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise CalibrationError(
                f"{bad} NaN/Inf value(s) reached the observer{self._where()} during calibration; check the model "
                "and the calibration data (a float16 overflow?) before quantizing"
            )
        self._update(self._channels(x))
        self.count += 1

    def _update(self, xc: torch.Tensor) -> None:
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) shaped like the scales: (rows, groups), (1, 1) per tensor, (1, K) for ch_axis=-1."""
        if self.count == 0:
            raise CalibrationError(
                f"the observer{self._where()} saw no data: run calibration inputs through the prepared model "
                "before convert (or check that this module is reached)"
            )
        lo, hi = self._range()
        return lo.reshape(self.out_shape), hi.reshape(self.out_shape)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        lo, hi = self.range()
        return qparams_from_minmax(lo, hi, self.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.observe(x)
        return x

    def hook(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: observe the first positional input."""
        self.observe(args[0])

    def extra_repr(self) -> str:
        gran = "tensor" if self.ch_axis is None else ("rows" if self.ch_axis == 0 else "last-dim channels")
        return f"{self.scheme.name}, per {gran}, observed={self.count}"
