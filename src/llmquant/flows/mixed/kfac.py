"""The ``"kfac"`` sensitivity measure and GPTQ- / AWQ-made candidates (see :mod:`.sensitivity` for the
measures).

Kronecker-factored Fisher (Martens & Grosse 2015): for a linear layer F ~ A (x) H, A the second moment of the
sampled log-likelihood's gradients at its outputs, H = sum_t x_t x_t^T of its calibration inputs; a weight
change dW costs 1/2 sum_o A_o (dW H dW^T)_oo / T. GPTQ candidates are solved against H, AWQ candidates search
their scales and clipping on H and the inputs' mean magnitudes; both are cross-fitted over two folds of the
windows (made on one, measured on the other), since a solution measured on its own calibration tokens fits
them rather than the text.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...errors import SchemeError
from ...schemes.formats import fake_weight
from .sensitivity import _fits, _logits, _weight


def gram(x: torch.Tensor) -> torch.Tensor:
    """``sum_t x_t x_t^T`` (float64) of inputs ``x`` (..., in_features)."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    return x.T @ x


def absum(x: torch.Tensor) -> torch.Tensor:
    """``sum_t |x_t|`` (float64, per input feature) of inputs ``x`` (..., in_features)."""
    return x.detach().reshape(-1, x.shape[-1]).abs().sum(0, dtype=torch.float64)


class Inputs(NamedTuple):
    """What a candidate is made from: a linear's calibration inputs' ``H = sum x x^T``, ``sum |x|`` and count."""

    H: torch.Tensor
    absum: torch.Tensor
    n: int


def _folds(ids) -> list[list[int]]:
    """The two cross-fitting folds of the calibration windows (even and odd positions)."""
    if ids.shape[0] < 2:
        raise SchemeError("GPTQ / AWQ candidates are made on half the calibration windows and measured on the "
                          "other half: give at least 2 windows")
    return [list(range(0, ids.shape[0], 2)), list(range(1, ids.shape[0], 2))]


@torch.no_grad()
def _grams(model, units, ids) -> dict[str, Inputs]:
    """The :class:`Inputs` of each unit's (first, linear) module over ``ids``."""
    got: dict[str, list] = {}
    hooks = []
    for u in units:
        m = model.get_submodule(u.modules[0])
        if isinstance(m, nn.Linear):
            def hook(mod, args, out, n=u.modules[0]):
                x = args[0]
                part = [gram(x), absum(x), x.numel() // x.shape[-1]]
                got[n] = [a + b for a, b in zip(got[n], part)] if n in got else part
            hooks.append(m.register_forward_hook(hook))
    try:
        for w in ids:
            _logits(model, w[None])
    finally:
        for h in hooks:
            h.remove()
    return {n: Inputs(*v) for n, v in got.items()}


class _Curvature:
    """Second moments gathered from the calibration windows for the ``"kfac"`` measure: per linear part of a
    unit, ``H = sum_t x_t x_t^T`` of its inputs and ``A_o = sum_t g_to^2`` of the gradients of the sampled
    log-likelihood at its outputs; per embedding part, ``E2[v, j] = sum_{t: id_t = v} g_tj^2`` of the
    gradients at its output rows; per linear part also ``X1 = sum_t |x_t|`` (AWQ's statistic). Float64 sums;
    the sums themselves are a plain dict (``moments``), so a distributed run can send them."""

    def __init__(self, model, units) -> None:
        self.lin: dict[str, nn.Linear] = {}
        self.emb: dict[str, nn.Embedding] = {}
        for u in units:
            for n in u.modules:
                m = model.get_submodule(n)
                if isinstance(m, nn.Linear):
                    self.lin[n] = m
                elif isinstance(m, nn.Embedding):
                    self.emb[n] = m
                else:
                    raise SchemeError(f"the 'kfac' sensitivity measures nn.Linear and nn.Embedding layers; {n} is a "
                                      f"{type(m).__name__}: use method='fisher'")
        self.folds = [self.zeros(), self.zeros()]  # sums of the even and of the odd windows

    def zeros(self) -> dict:
        return {"H": {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in self.lin.items()},
                "A": {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in self.lin.items()},
                "X1": {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in self.lin.items()},
                "E2": {n: torch.zeros(m.weight.shape, dtype=torch.float64) for n, m in self.emb.items()},
                "tokens": 0, "predicted": 0}  # positions through the linears; positions whose next token counts

    @staticmethod
    def add(into: dict, other: dict) -> dict:
        for k in ("H", "A", "E2", "X1"):
            for n in into[k]:
                into[k][n] += other[k][n]
        into["tokens"] += other["tokens"]
        into["predicted"] += other["predicted"]
        return into

    def window(self, model, ids, samples: int, gen) -> dict:
        """This window's sums (one forward, ``samples`` backwards to the layers' outputs)."""
        part = self.zeros()
        outs: dict[str, torch.Tensor] = {}
        hooks = []
        for n, m in self.lin.items():
            def hook(mod, args, out, n=n):
                part["H"][n] += gram(args[0])
                part["X1"][n] += absum(args[0])
                outs[n] = out
            hooks.append(m.register_forward_hook(hook))
        for n, m in self.emb.items():
            hooks.append(m.register_forward_hook(lambda mod, args, out, n=n: outs.__setitem__(n, out)))
        try:
            with torch.enable_grad():
                logp = F.log_softmax(_logits(model, ids[None])[0], -1)
        finally:
            for h in hooks:
                h.remove()
        part["tokens"], part["predicted"] = int(ids.numel()), logp.shape[0]
        probs = logp.detach().exp()
        names = [n for n in outs if outs[n].requires_grad]
        for s in range(samples):
            y = torch.multinomial(probs, 1, generator=gen)
            grads = torch.autograd.grad(logp.gather(1, y).sum(), [outs[n] for n in names], retain_graph=s < samples - 1,
                                        allow_unused=True)
            for n, g in zip(names, grads):
                if g is None:
                    continue
                g = g.detach().reshape(-1, g.shape[-1]).double()
                if n in part["A"]:
                    part["A"][n] += g.pow(2).sum(0)
                else:
                    part["E2"][n].index_add_(0, ids.reshape(-1), g.pow(2))
        return part

    def inputs(self, unit, mo: dict) -> Inputs | None:
        """The :class:`Inputs` of the unit's (first) linear part in the moments ``mo``: what GPTQ solves
        against and AWQ searches on."""
        return next((Inputs(mo["H"][m], mo["X1"][m], mo["tokens"]) for m in unit.modules if m in self.lin), None)

    @staticmethod
    def damage(unit, dw: torch.Tensor, mo: dict, samples: int) -> float:
        """Mean KL per predicted position by the moments ``mo``: 1/2 E_y[sum_o A_o (dW H dW^T)_oo] / T per
        linear part, plus the diagonal form for an embedding part."""
        d = dw.double()
        total = 0.0
        for n in unit.modules:
            if n in mo["H"]:
                total += float((mo["A"][n] * ((d @ mo["H"][n]) * d).sum(1)).sum()) / max(mo["tokens"], 1)
            elif n in mo["E2"]:
                total += float((mo["E2"][n] * d.pow(2)).sum())
        return 0.5 * total / (samples * max(mo["predicted"], 1))


def _quantizer(quantizer: str, params):
    """``(fmt, w0, inputs or None, unit=None) -> the weight stored in fmt``: RTN (the formats' own rounding),
    GPTQ with ``params`` (:class:`~llmquant.schemes.GPTQParams`) on the Hessian of the layer's calibration inputs
    (:class:`Inputs`), or AWQ with ``params`` (:class:`~llmquant.schemes.AWQParams`): the scale searched for
    this linear alone (in a model, the linears sharing an input share one), then its clipping search. Float
    formats, and embeddings (no inputs), are rounded as RTN does."""
    if quantizer == "rtn":
        return lambda f, w0, inp, unit=None: fake_weight(f, w0)
    from ...schemes import QuantScheme
    from ...schemes.primitives import dequantize

    if quantizer == "awq":
        from ...algorithms.awq import awq_clip_quantize, awq_search_scale

        def solve(f, w, inp):
            g = inp.H.float() / max(inp.n, 1)
            s = awq_search_scale([w], g, (inp.absum / max(inp.n, 1)).float(), f, grid=params.grid)[0]
            q, scale, zero = awq_clip_quantize(w * s, g / s[None, :] / s[:, None], f, grid=params.clip_grid,
                                               max_shrink=params.max_shrink, clip=params.clip)
            return dequantize(q, scale, zero, f) / s
    else:
        from ...algorithms.gptq import gptq_quantize

        def solve(f, w, inp):
            q, scale, zero = gptq_quantize(w, inp.H.float().clone(), f, damp=params.damp,
                                           block_size=params.block_size, act_order=params.act_order,
                                           static_groups=params.static_groups, observer=params.observer,
                                           consume_hessian=True)
            return dequantize(q, scale, zero, f)

    def make(f, w0, inp, unit=None):
        if not isinstance(f, QuantScheme) or inp is None:  # float formats are rounded; the embedding by RTN
            return fake_weight(f, w0)
        return solve(f, w0.detach().float(), inp).to(w0.dtype)

    return make


def _kfac_scan(model, units, fmts, ids, samples, progress, make, cross_fit=False, seed=0):
    """Damage = 1/2 E_y[sum_o A_o (dW H dW^T)_oo] / T per unit (Kronecker-factored Fisher: the outputs'
    gradient moments times the inputs' moments, diagonal over output channels; the embedding part as the
    diagonal Fisher of its rows), with dW made by ``make`` from the same H (so GPTQ's error, which is
    small in the directions the inputs take, is weighed as the model sees it). Windows are summed in order
    (a distributed run adds each rank's windows, then the ranks in order: float64 sums, equal to one
    process's up to their rounding)."""
    from .. import distributed

    weights = [_weight(model, u) for u in units]
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in {id(w): w for w in weights}.values():
        w.requires_grad_(True)  # the layers' outputs need a graph
    curv = _Curvature(model, units)
    mine, _ = distributed.split(ids)
    sums = [curv.zeros(), curv.zeros()]  # this process's windows, by fold
    try:
        for i in tqdm(mine, desc="sensitivity (kfac)", disable=not progress, leave=False):
            gen = torch.Generator().manual_seed(seed * 1000003 + i)
            curv.add(sums[i % 2], curv.window(model, ids[i], samples, gen))
    finally:
        for p, r in saved.items():
            p.requires_grad_(r)
    for part in distributed.sum_in_order([(mine[0] if mine else len(ids), sums)], "the K-FAC sums"):
        for f in (0, 1):
            curv.add(curv.folds[f], part[f])
    whole = curv.add(curv.add(curv.zeros(), curv.folds[0]), curv.folds[1])
    if cross_fit:
        _folds(ids)  # at least two windows
    damage = []
    for u, w in tqdm(list(zip(units, weights)), desc="sensitivity (kfac) candidates", disable=not progress, leave=False):
        w0 = w.detach().float()
        row = []
        for f in fmts:
            if not _fits(f, w0.shape[-1]):
                row.append(math.inf)
            elif cross_fit:  # made on one fold's inputs, weighed by the other fold's moments; both ways, averaged
                row.append(0.5 * sum(curv.damage(u, make(f, w0, curv.inputs(u, curv.folds[1 - b]), unit=u).float()
                                                 - w0, curv.folds[b], samples) for b in (0, 1)))
            else:
                row.append(curv.damage(u, make(f, w0, curv.inputs(u, whole), unit=u).float() - w0, whole, samples))
        damage.append(row)
    return damage
