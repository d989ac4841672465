"""Per-linear input statistics gathered with forward pre-hooks: ``X^T X``, ``sum |X|`` and a token count.

Linears fed by the very same tensor (q/k/v after a norm, gate/up) share one accumulator, so each distinct
input's Gram matrix is computed once. NaN/Inf in an input raises :class:`CalibrationError`.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from ..errors import CalibrationError


#: from this many input features on, ``X^T X`` is accumulated as its upper block triangle (three products of
#: half the width instead of one full one: 20-35% less time at 576-1536 inputs) and mirrored once when read
SYMMETRIC_FROM = 512


class InputStats:
    def __init__(self, k: int, device) -> None:
        self._xtx = torch.zeros(k, k, dtype=torch.float32, device=device)
        self._half = k // 2 if k >= SYMMETRIC_FROM else 0
        self._mirrored = True
        self.abs_sum = torch.zeros(k, dtype=torch.float32, device=device)
        self.n = 0

    @property
    def xtx(self) -> torch.Tensor:
        """The accumulated ``X^T X`` (k, k)."""
        if not self._mirrored:
            h = self._half
            self._xtx[h:, :h] = self._xtx[:h, h:].T
            self._mirrored = True
        return self._xtx

    def add(self, x: torch.Tensor, name: str) -> None:
        with torch.autocast(x.device.type, enabled=False):  # float32 sums, also inside a bfloat16 pass
            self._add(x, name)

    def _add(self, x: torch.Tensor, name: str) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        a = x2.abs().sum(0)
        if not torch.isfinite(a).all():  # any NaN/Inf input makes its column's sum NaN/Inf
            raise CalibrationError(f"NaN/Inf in the calibration inputs of {name}: the model overflows on the "
                                   "calibration text (try float32, or other calibration text)")
        h = self._half
        if h:
            lo, hi = x2[:, :h], x2[:, h:]
            self._xtx[:h, :h].addmm_(lo.T, lo)
            self._xtx[:h, h:].addmm_(lo.T, hi)
            self._xtx[h:, h:].addmm_(hi.T, hi)
            self._mirrored = False
        else:
            self._xtx.addmm_(x2.T, x2)
        self.abs_sum += a
        self.n += x2.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ's ``H = 2 X X^T / n``."""
        return self.xtx * (2.0 / max(self.n, 1))

    @property
    def gram(self) -> torch.Tensor:
        """``X^T X / n``: the mean squared output error of a weight error D is ``sum((D G) * D)``."""
        return self.xtx / max(self.n, 1)

    @property
    def absmean(self) -> torch.Tensor:
        return self.abs_sum / max(self.n, 1)


class StatsCollector:
    """Context manager: hooks on ``linears`` (name -> module) accumulate their inputs' statistics.

    ``owner[name]`` is the linear whose accumulator ``name`` shares; ``stats[owner]`` holds it.
    """

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.linears = linears
        self.owner: dict[str, str] = {}
        self.stats: dict[str, InputStats] = {}
        self._recent: list[tuple[weakref.ref, str]] = []
        self._handles = []

    def _hook(self, name: str):
        def pre(mod, args):
            x = args[0]
            own = self.owner.get(name)
            if own is None:  # first call: is this the tensor another linear just saw?
                own = next((o for ref, o in self._recent if ref() is x), name)
                self.owner[name] = own
                if own == name:
                    self.stats[name] = InputStats(x.shape[-1], x.device)
                    self._recent = [(r, o) for r, o in self._recent if r() is not None][-8:]
                    self._recent.append((weakref.ref(x), name))
            if own == name:
                self.stats[name].add(x, name)

        return pre

    def of(self, name: str) -> InputStats:
        return self.stats[self.owner[name]]

    def __enter__(self) -> "StatsCollector":
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._recent = []

    def groups(self) -> dict[str, list[str]]:
        """owner -> the linears sharing its input, in the order of ``linears``."""
        out: dict[str, list[str]] = {}
        for n in self.linears:
            if n in self.owner:
                out.setdefault(self.owner[n], []).append(n)
        return out
