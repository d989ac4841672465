"""HQQ (:mod:`llmquant.algorithms.hqq`) as a pipeline stage: data-free, each linear on its own like RTN, so
it streams; after AWQ (``method=["awq", "hqq"]``) it quantizes the scaled weights."""

from __future__ import annotations

from ..algorithms.hqq import hqq_quantize
from ..schemes import HQQParams
from .stages import LayerContext, Result, Stage


class HQQStage(Stage):
    needs_data = needs_gram = False

    @property
    def label(self) -> str:
        return f"{self.cfg.weight.name} HQQ"

    def quantize(self, ctx: LayerContext) -> Result:
        p = self.params or HQQParams()
        out: Result = {}
        for n, m in ctx.linears.items():
            w = m.weight.detach().float()
            out[n] = (*hqq_quantize(w, self.cfg.weight, iterations=p.iterations, p=p.p, beta=p.beta,
                                    kappa=p.kappa, optimize_scale=p.optimize_scale, name=n), w)
        return out
