"""Run a calibrated algorithm (GPTQ, AWQ) on the linears of one block, given their input statistics.

A block is a decoder layer (sequential flow) or the whole model. Returns integer codes and qparams per
linear (RTN's format) and the float weight they approximate (AWQ scales it), for the summary.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..algorithms import rtn_quantize
from ..algorithms.awq import awq_clip_quantize, awq_search_scale, fold_scale
from ..algorithms.gptq import gptq_quantize
from ..schemes import QuantConfig
from .stats import StatsCollector

log = logging.getLogger(__name__)

Result = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]


def quantize_block(
    block: nn.Module, prefix: str, linears: dict[str, nn.Module], col: StatsCollector, cfg: QuantConfig,
    pairs: tuple = (),
) -> Result:
    """``linears``: full name -> module; ``prefix``: the block's name ("" for the whole model) so that
    ``pairs`` (source, (linear, ...)) paths are relative to the block."""
    out: Result = {}
    unseen = [n for n in linears if n not in col.owner]
    for n in unseen:
        log.warning("%s saw no calibration input; quantized with RTN", n)
        w = linears[n].weight.detach().float()
        out[n] = (*rtn_quantize(w, cfg.weight, name=n), w)
    if cfg.method == "gptq":
        scales = _awq_fold(block, prefix, linears, col, cfg, pairs, cfg.method_params.awq_grid) if cfg.method_params.awq_scales else {}
        out.update(_gptq(linears, col, cfg, scales))
    elif cfg.method == "awq":
        out.update(_awq(block, prefix, linears, col, cfg, pairs))
    else:
        for n, m in linears.items():
            if n not in out:
                w = m.weight.detach().float()
                out[n] = (*rtn_quantize(w, cfg.weight, name=n), w)
    return out


def _gptq(linears, col: StatsCollector, cfg: QuantConfig, scales: dict) -> Result:
    p = cfg.method_params
    out: Result = {}
    for owner, names in col.groups().items():
        names = [n for n in names if n in linears]
        if not names:
            continue
        # linears sharing an input share H: their rows are independent problems, solved in one call
        ws = [linears[n].weight.detach().float() for n in names]
        h = col.stats[owner].hessian
        if names[0] in scales:  # AWQ scales folded first: the inputs are X / s
            sc = scales[names[0]].to(h.device)
            h = h / sc.unsqueeze(0) / sc.unsqueeze(1)
        q, scale, zero = gptq_quantize(
            torch.cat(ws, 0), h, cfg.weight,
            damp=p.damp, block_size=p.block_size, act_order=p.act_order, name="+".join(names),
        )
        r = 0
        for n, w in zip(names, ws):
            k = w.shape[0]
            out[n] = (q[r : r + k], scale[r : r + k], None if zero is None else zero[r : r + k], w)
            r += k
    return out


def _rel(prefix: str, name: str) -> str:
    return name[len(prefix) + 1 :] if prefix else name


def _awq(block, prefix, linears, col: StatsCollector, cfg: QuantConfig, pairs) -> Result:
    p = cfg.method_params
    scales = _awq_fold(block, prefix, linears, col, cfg, pairs, p.grid)
    out: Result = {}
    for n, m in linears.items():
        if n not in col.owner:
            continue
        g = col.of(n).gram
        if n in scales:
            s = scales[n].to(g.device)
            g = g / s.unsqueeze(0) / s.unsqueeze(1)  # inputs are X / s after folding
        w = m.weight.detach().float()
        out[n] = (*awq_clip_quantize(w, g, cfg.weight, grid=p.clip_grid, max_shrink=p.max_shrink, clip=p.clip), w)
    return out


def _awq_fold(block, prefix, linears, col: StatsCollector, cfg: QuantConfig, pairs, grid: int) -> dict[str, torch.Tensor]:
    """AWQ's scale search for each (source, linears) pair, folded in place; full linear name -> its scale."""
    rel = {_rel(prefix, n): n for n in linears}
    scales: dict[str, torch.Tensor] = {}  # full linear name -> the input scale folded into it
    for src, dsts in pairs:
        names = [rel[d] for d in dsts if d in rel]
        if not names or any(n not in col.owner for n in names):
            continue
        if len(names) != len(dsts):
            log.warning("AWQ pair %s -> %s: only %s are quantized; pair skipped", src, dsts, names)
            continue
        st = col.of(names[0])
        s, alpha, losses = awq_search_scale([linears[n].weight for n in names], st.gram, st.absmean,
                                            cfg.weight, grid=grid)
        log.debug("AWQ %s%s -> %s: alpha %.2f, loss %.4g (RTN %.4g)", prefix and prefix + ".", src, dsts, alpha,
                  losses[alpha], losses[0.0])
        source = block.get_submodule(src)
        bias = getattr(source, "bias", None)
        with torch.no_grad():
            fold_scale(source.weight.data, None if bias is None else bias.data, [linears[n].weight.data for n in names], s)
        for n in names:
            scales[n] = s
    return scales
