"""Min-max observers: the running extremes, or their exponential moving average over batches.

Min-max is what PyTorch's ``MinMaxObserver`` and llm-compressor's default static observer do; the moving
average (PyTorch's ``MovingAverageMinMaxObserver``, ``r <- r + c (batch - r)``, c = 0.01) damps the
influence of a single extreme batch.
"""

from __future__ import annotations

import torch

from .base import Observer, register_observer


@register_observer("minmax", "min_max")
class MinMaxObserver(Observer):
    def __init__(self, scheme, ch_axis=None, label=""):
        super().__init__(scheme, ch_axis, label)
        self.min_val: torch.Tensor | None = None
        self.max_val: torch.Tensor | None = None

    def _update(self, xc: torch.Tensor) -> None:
        lo, hi = xc.amin(dim=1), xc.amax(dim=1)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)

    def _range(self):
        return self.min_val, self.max_val


@register_observer("moving_average", "moving_average_minmax", "ema")
class MovingAverageMinMaxObserver(MinMaxObserver):
    arg_name = "averaging_constant"

    def __init__(self, scheme, ch_axis=None, label="", averaging_constant: float = 0.01):
        super().__init__(scheme, ch_axis, label)
        if not 0 < averaging_constant <= 1:
            from ..errors import SchemeError

            raise SchemeError(f"averaging constant must be in (0, 1], got {averaging_constant}")
        self.c = float(averaging_constant)

    def _update(self, xc: torch.Tensor) -> None:
        lo, hi = xc.amin(dim=1), xc.amax(dim=1)
        if self.min_val is None:
            self.min_val, self.max_val = lo, hi
        else:
            self.min_val = self.min_val + self.c * (lo - self.min_val)
            self.max_val = self.max_val + self.c * (hi - self.max_val)
