"""HQQ (:mod:`llmquant.algorithms.hqq`) as a pipeline stage: data-free, each linear on its own like RTN, so
it streams; after AWQ (``method=["awq", "hqq"]``) it quantizes the scaled weights."""

from __future__ import annotations

from ..algorithms.hqq import hqq_quantize
from ..schemes import HQQParams
from .stages import LayerContext, Result, Stage


class HQQStage(Stage):
    """Data-free, unless its guard is importance-weighted (``HQQParams(guard="imse")``): then the guard weighs
    each input column by ``diag(X^T X) / n`` of the (scaled, after an earlier stage's fold) inputs."""

    per_linear = True

    def __init__(self, cfg, params=None) -> None:
        super().__init__(cfg, params)
        self.needs_data = self.needs_gram = (params or HQQParams()).calibrated

    @property
    def label(self) -> str:
        return f"{self.cfg.weight.name} HQQ"

    def quantize(self, ctx: LayerContext) -> Result:
        p = self.params or HQQParams()
        out: Result = {}
        for n, m in ctx.linears.items():
            w = m.weight.detach().float()
            imp = ctx.scaled(n, ctx.stats.of(n).gram).diagonal() if self.needs_gram else None
            out[n] = (*hqq_quantize(w, self.cfg.weight, iterations=p.iterations, p=p.p, beta=p.beta,
                                    kappa=p.kappa, optimize_scale=p.optimize_scale, guard=p.guard != "off",
                                    importance=imp, name=n), w)
        return out
