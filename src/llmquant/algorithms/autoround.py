"""AutoRound / SignRound (Cheng et al., "Optimize Weight Rounding via Signed Gradient Descent for the
Quantization of LLMs", 2023): learn how each weight rounds, and each group's range, from the block's output.

Each weight gets a rounding offset ``V`` in [-0.5, 0.5] and each (row, group) range two factors
``alpha, beta`` in [clip_min, 1] that shrink its max and min:

    s, z = qparams(beta * min W, alpha * max W)      q = clamp(round(W / s + V) + z, qmin, qmax)
    W_hat = (q - z) s

(for a float-minimum scheme ``q = round((W - m) / s + V) + qmin``). ``V``, ``alpha`` and ``beta`` are
trained by signed gradient descent, ``theta <- theta - lr_t sign(dL/dtheta)`` with ``lr_t`` decaying
linearly from ``lr`` (the paper: 1 / steps) to 0, on ``L = ||f(X; W_hat) - f(X; W)||^2`` for the block
``f`` (a decoder layer) and its calibration inputs ``X``; ``round`` passes gradients straight through.
The start (V = 0, alpha = beta = 1) is RTN exactly, and the iterate with the least loss is kept.

The qparams' forward values are :func:`llmquant.schemes.qparams_from_minmax`'s exactly (so the codes are
in RTN's format, the scheme's grid); only their gradient comes from the same formula written without
its rounding.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..schemes import QuantScheme, check_finite, expand_groups, minmax, qparams_from_minmax
from ..schemes.primitives import EPS, from_grid


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _surrogate(lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme):
    """qparams_from_minmax's formulas without their rounding and casts: gradients only."""
    span = scheme.qmax - scheme.qmin
    if scheme.symmetric:
        if scheme.signed_scale:
            return torch.where(lo.abs() >= hi.abs(), lo, hi) / scheme.qmin, None
        return torch.maximum(lo.abs(), hi.abs()) / (span / 2), None
    if scheme.zero_point == "min":
        return (hi - lo) / span, lo
    if scheme.zero_point == "int":
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    s = ((hi - lo) / span).clamp(min=EPS)
    return s, scheme.qmin - lo / s


class SignRoundWeight:
    """One linear's trainable rounding: ``V`` (rows, K) and range factors ``alpha``, ``beta`` (rows, groups)."""

    def __init__(self, weight: torch.Tensor, scheme: QuantScheme, minmax_tuning: bool = True,
                 clip_min: float = 0.5, name: str = "weight") -> None:
        self.w = weight.detach().float()
        check_finite(self.w, name)
        self.scheme, self.clip_min = scheme, clip_min
        self.rows2d = self.w.reshape(-1, self.w.shape[-1]) if scheme.granularity != "tensor" else self.w.reshape(1, -1)
        self.xmin, self.xmax = minmax(self.w, scheme)
        self.v = torch.zeros_like(self.rows2d, requires_grad=True)
        self.alpha = torch.ones_like(self.xmax, requires_grad=minmax_tuning)
        self.beta = torch.ones_like(self.xmin, requires_grad=minmax_tuning)

    def parameters(self) -> list[torch.Tensor]:
        return [t for t in (self.v, self.alpha, self.beta) if t.requires_grad]

    def qparams(self):
        """(scale, zero) with the forward values of qparams_from_minmax and gradients to alpha, beta."""
        lo, hi = self.xmin * self.beta, self.xmax * self.alpha
        with torch.no_grad():
            scale, zero = qparams_from_minmax(lo, hi, self.scheme)
        if not (self.alpha.requires_grad and torch.is_grad_enabled()):
            return scale, zero
        s_sur, z_sur = _surrogate(lo, hi, self.scheme)
        s = scale.float() + (s_sur - s_sur.detach())
        z = None if zero is None else zero.float() + (z_sur - z_sur.detach())
        return s, z

    def _codes(self, s: torch.Tensor, z: torch.Tensor | None, rnd) -> torch.Tensor:
        sch, k = self.scheme, self.rows2d.shape[-1]
        se = expand_groups(s.float(), k, sch)
        ze = None if z is None else expand_groups(z.float(), k, sch)
        if ze is not None and sch.zero_point == "min":
            v = (self.rows2d - ze) / se + self.v + sch.qmin
        else:
            v = self.rows2d / se + self.v
            if ze is not None:
                v = v + ze
        return torch.clamp(rnd(v), sch.qmin, sch.qmax), se, ze

    def weight(self) -> torch.Tensor:
        """The dequantized weight of the current iterate (differentiable), shaped like the weight."""
        s, z = self.qparams()
        q, se, ze = self._codes(s, z, _ste_round)
        return from_grid(q, se, ze, self.scheme).reshape(self.w.shape)

    @torch.no_grad()
    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Codes (int16, shaped like the weight), scale and zero as RTN gives them."""
        scale, zero = self.qparams()
        q, _, _ = self._codes(scale, zero, torch.round)
        return q.to(torch.int16).reshape(self.w.shape), scale, zero

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One signed-gradient step, then the offsets and factors back into their ranges."""
        for t in self.parameters():
            if t.grad is not None:
                t.sub_(lr * torch.sign(t.grad))
                t.grad = None
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(self.clip_min, 1.0)
        self.beta.clamp_(self.clip_min, 1.0)

    def state(self) -> tuple[torch.Tensor, ...]:
        return tuple(t.detach().clone() for t in (self.v, self.alpha, self.beta))

    @torch.no_grad()
    def load(self, state) -> None:
        for t, v in zip((self.v, self.alpha, self.beta), state):
            t.copy_(v)


def signround(weights: list[SignRoundWeight], loss: Callable[[int], torch.Tensor], steps: int,
              lr: float | None = None, history: list | None = None) -> tuple[float, float]:
    """Train ``weights`` for ``steps`` signed-gradient steps; ``loss(step)`` returns the (scalar) loss of the
    current iterate on that step's batch. Keeps the iterate of least loss; returns (first loss, best loss).
    ``history``: if given, the best loss so far is appended at each step."""
    lr = 1.0 / max(steps, 1) if lr is None else lr
    best, first, kept = math.inf, math.nan, None
    with torch.enable_grad():
        for step in range(steps):
            value = loss(step)
            v = float(value.detach())
            if step == 0:
                first = v
            if v < best:  # the loss belongs to the iterate before this step's update
                best, kept = v, [w.state() for w in weights]
            if history is not None:
                history.append(best)
            value.backward()
            for w in weights:
                w.step(lr * (1 - step / steps))
    if kept is not None:
        for w, st in zip(weights, kept):
            w.load(st)
    return first, best


__all__ = ["SignRoundWeight", "signround"]
