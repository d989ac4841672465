"""AutoRound (SignRound, :mod:`llmquant.algorithms.autoround`) on the layer-by-layer pipeline.

For each decoder layer the pipeline keeps the float layer's outputs on every calibration batch
(``needs_targets``, as for ``blockqat``); each linear of the layer computes with its trainable rounded
weight, and the rounding offsets and range factors are trained by signed gradient descent so that the
layer reproduces its float outputs (one calibration batch per step, in order, cycling). The kept-best
iterate's codes are packed, and the next layer is calibrated on the quantized layer's outputs. One layer
in memory at a time, so it streams. After AWQ (``method=["awq", "autoround"]``) it starts from the scaled
weights (AWQ's scales are folded into the norms, so the float outputs are the same).

The best iterate is chosen by the step's loss relative to its batch's float output energy (batches differ;
the paper keeps the best step loss).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..algorithms.autoround import SignRoundWeight, signround
from ..modules import replace_module
from ..schemes import AutoRoundParams
from .passes import _run
from .stages import LayerContext, Result, Stage

log = logging.getLogger(__name__)


class _RoundedLinear(nn.Module):
    """A linear computing with a SignRoundWeight's current dequantized weight (in training only)."""

    def __init__(self, lin: nn.Module, sr: SignRoundWeight) -> None:
        super().__init__()
        self.sr, self.bias = sr, lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sr.weight().to(x.dtype), None if self.bias is None else self.bias.detach())


class AutoRoundStage(Stage):
    needs_gram = False
    needs_targets = True  # the pipeline keeps every batch's float output (ctx.targets)

    @property
    def calib_batch(self) -> int | None:
        return (self.params or AutoRoundParams()).batch

    @property
    def label(self) -> str:
        return f"{self.cfg.weight.name} AutoRound"

    def quantize(self, ctx: LayerContext) -> Result:
        p = self.params or AutoRoundParams()
        srs = {n: SignRoundWeight(lin.weight, self.cfg.weight, p.minmax, p.clip_min, name=n)
               for n, lin in ctx.linears.items()}
        if p.steps and ctx.inputs and srs:
            frozen = [t for t in ctx.block.parameters() if t.requires_grad]
            for t in frozen:
                t.requires_grad_(False)
            for n, lin in ctx.linears.items():
                replace_module(ctx.block, ctx.rel(n), _RoundedLinear(lin, srs[n]))
            try:
                energy = [float(y.float().pow(2).mean()) or 1.0 for y in ctx.targets]

                def loss(step: int) -> torch.Tensor:
                    j = step % len(ctx.inputs)
                    y = _run(ctx.block, ctx.inputs[j], ctx.kwargs[j])
                    return F.mse_loss(y.float(), ctx.targets[j].float()) / energy[j]

                first, best = signround(list(srs.values()), loss, p.steps, p.lr)
            finally:
                for n, lin in ctx.linears.items():  # the float linears go back; the pipeline swaps in packed ones
                    replace_module(ctx.block, ctx.rel(n), lin)
                for t in frozen:
                    t.requires_grad_(True)
            log.info("%s: AutoRound, output rel. MSE %.3e (RTN) -> %.3e (best of %d steps)", ctx.prefix, first,
                     best, p.steps)
        return {n: (*sr.quantized(), sr.w) for n, sr in srs.items()}
