"""Block-wise quantization-aware training on the layer-by-layer pipeline (the ``blockqat`` method).

EfficientQAT's Block-AP (Chen et al. 2024): for each decoder layer, its linears become fake-quantized
(:class:`~llmquant.modules.FakeQuantLinear`, qparams initialised by MSE clipping or min-max), and the float
master weights and the step sizes / zero points are trained with AdamW to make the layer reproduce the
float layer's outputs (MSE) on the calibration inputs (each step one calibration batch, in order). The
trained weights are then rounded with the trained qparams and packed, and the next layer is trained on
the quantized layer's outputs.

Why block-wise rather than adapters over frozen weights: training one layer needs only that layer (its
float weights, Adam moments for them and one batch of activations), so it runs on the pipeline and
streams a checkpoint larger than memory like every other layer-wise method; the end-to-end ``qat``
method (distillation of the whole model's next-token distributions) needs the whole model and does not.
Block-wise training optimises each layer's own output error, not the model's loss.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..modules import replace_module
from ..modules.fake_quant import FakeQuantLinear
from ..schemes import BlockQATParams
from .passes import _run
from .qat import fake_quant_codes
from .stages import LayerContext, Stage

log = logging.getLogger(__name__)


class BlockQATStage(Stage):
    needs_gram = False
    needs_targets = True  # the pipeline keeps every batch's float output (ctx.targets)

    @property
    def label(self) -> str:
        return f"{self.cfg.weight.name} block-QAT"

    def quantize(self, ctx: LayerContext):
        p = self.params or BlockQATParams()
        scheme = self.cfg.weight
        fqs = {}
        for n, lin in ctx.linears.items():
            fq = FakeQuantLinear.from_linear(lin, scheme, learn_scales=p.learn_scales, observer=p.init)
            if fq.bias is not None:
                fq.bias.requires_grad_(False)
            replace_module(ctx.block, ctx.rel(n), fq)
            fqs[n] = fq
        try:
            loss = _train(ctx, fqs, p) if p.steps and ctx.inputs else None
        finally:
            for n, lin in ctx.linears.items():  # the float linears go back; the pipeline swaps in packed ones
                replace_module(ctx.block, ctx.rel(n), lin)
        if loss is not None:
            log.info("%s: block QAT, output MSE %.3e -> %.3e over %d steps", ctx.prefix, loss[0], loss[1], p.steps)
        return {n: fake_quant_codes(fq) for n, fq in fqs.items()}


def _train(ctx: LayerContext, fqs: dict, p: BlockQATParams) -> tuple[float, float]:
    weights = [fq.weight for fq in fqs.values()]
    qparams = [t for fq in fqs.values() for t in fq.weight_quantizer.parameters() if t.requires_grad]
    trained = {id(t) for t in weights + qparams}
    frozen = [t for t in ctx.block.parameters() if id(t) not in trained and t.requires_grad]
    for t in frozen:
        t.requires_grad_(False)
    for t in weights:
        t.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": weights, "lr": p.lr, "weight_decay": 0.0},
                             {"params": qparams, "lr": p.lr_qparams, "weight_decay": 0.0}])
    first = last = float("nan")
    try:
        with torch.enable_grad():
            for step in range(p.steps):
                j = step % len(ctx.inputs)
                y = _run(ctx.block, ctx.inputs[j], ctx.kwargs[j])
                loss = F.mse_loss(y.float(), ctx.targets[j].float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if p.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(weights + qparams, p.max_grad_norm)
                opt.step()
                last = float(loss.detach())
                first = last if step == 0 else first
    finally:
        for t in frozen:
            t.requires_grad_(True)
        for t in weights:
            t.requires_grad_(False)
    return first, last
