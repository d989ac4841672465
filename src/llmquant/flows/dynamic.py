"""Dynamic quantization: weights quantized ahead of time, activation qparams computed from each input.

``quantize_dynamic(model, targets={nn.Linear}, dtype="int8")`` follows ``torch.ao.quantization.quantize_dynamic``:
``targets`` is a set of module types and/or names (exact, or ``re:`` full-match regexes); every selected
``nn.Linear`` becomes a :class:`~llmquant.modules.QuantLinear` with int8 per-output-channel weights
(asymmetric by default, symmetric as an option; grouped int4 with ``weight_bits=4``) and a dynamic int8 activation scheme, per token by default:
``s_m = max_k |x_mk| / 127.5`` for each row ``m`` of the input at each call (symmetric), or
``s_m = (max_k x_mk - min_k x_mk) / 255`` with an integer zero point (asymmetric), so
``y_m = s_m * s_w * (Q(x_m) . Q(w))`` with an int32 dot product. ``outlier_threshold`` adds LLM.int8()'s
decomposition (Dettmers et al. 2022): input columns holding any ``|x| >= t`` are multiplied in float.
``nn.LSTM``/``nn.GRU`` are delegated to PyTorch's dynamic RNN modules (``torch.ao.nn.quantized.dynamic``),
with int8 per-channel weights and fbgemm's per-tensor dynamic activations.

Numerics per path (see :mod:`llmquant.kernels`): W8A8 runs an int8 x int8 -> int32 GEMM (on CPU fbgemm fed
with llmquant's own activation codes; ``torch._int_mm`` elsewhere); W4A8 has no fast CPU kernel in PyTorch
(``aten._dyn_quant_matmul_4bit`` is a scalar reference loop off Arm, 40-80x slower than fp32 here: 4 ms
against 0.07 ms at one token, about 1 s against 13-33 ms at 512 tokens, 576 -> 1536, g64), so it runs the
reference path: the activation is fake-quantized per token and
multiplied with the int4 weight dequantized once to float, which is numerically the W4A8 product up to
float summation order, at float speed and float run-time memory.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import replace
from typing import Iterable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import SchemeError, SelectionError
from ..modules import replace_module, select_linears
from ..schemes import QuantConfig
from ..schemes.methods import dynamic_schemes
from ..schemes.primitives import rotate_blocks
from .pipeline import run_stages
from .stages import LayerContext, Result, Stage, make_quant_linear
from .summary import LayerSummary, QuantSummary

log = logging.getLogger(__name__)

SUPPORTED_TYPES: tuple[type, ...] = (nn.Linear, nn.LSTM, nn.GRU)
_DTYPES = ("int8",)


def _dtype_name(dtype) -> str:
    if dtype is torch.qint8 or dtype == "int8" or dtype is torch.int8:
        return "int8"
    raise SchemeError(
        f"dtype {dtype!r} is not supported by quantize_dynamic; use 'int8' (int8 activations; weights int8, "
        "or int4 with weight_bits=4)"
    )


def _check_types(targets) -> None:
    for t in targets:
        if isinstance(t, type) and not issubclass(t, SUPPORTED_TYPES):
            raise SelectionError(
                f"quantize_dynamic cannot quantize {t.__name__}; supported module types: "
                f"{', '.join(c.__name__ for c in SUPPORTED_TYPES)}"
            )


def _quantize_rnn(mod: nn.Module) -> nn.Module:
    from torch.ao.nn.quantized import dynamic as nnqd
    from torch.ao.quantization import per_channel_dynamic_qconfig

    mod.qconfig = per_channel_dynamic_qconfig
    cls = nnqd.LSTM if isinstance(mod, nn.LSTM) else nnqd.GRU
    try:
        with warnings.catch_warnings():  # torch.ao's quantized tensors are deprecated as a user API
            warnings.simplefilter("ignore")
            return cls.from_float(mod)
    finally:
        del mod.qconfig


def _rnn_summary(name: str, mod: nn.Module, qmod: nn.Module) -> LayerSummary:
    weights = qmod._weight_bias()["weight"]
    n = deq_sq = err = 0.0
    packed = 0
    for k, qw in weights.items():
        w = getattr(mod, k).detach().float()
        d = qw.dequantize().float()
        n += w.numel()
        deq_sq += w.pow(2).sum().item()
        err += (w - d).pow(2).sum().item()
        packed += w.numel() + 4 * (qw.q_per_channel_scales().numel() if qw.qscheme() != torch.per_tensor_affine else 1)
    float_bytes = sum(p.numel() * p.element_size() for p in mod.parameters())
    return LayerSummary(
        name=name,
        shape=(mod.hidden_size * (4 if isinstance(mod, nn.LSTM) else 3), mod.input_size + mod.hidden_size),
        scheme=f"int8-ch {type(mod).__name__} (torch.ao dynamic)",
        bits_per_weight=8 * packed / max(n, 1),
        packed_bytes=int(packed),
        float_bytes=float_bytes,
        sqnr_db=float("inf") if err == 0 else 10 * torch.log10(torch.tensor(deq_sq / err)).item(),
        kernel="torch.ao.nn.quantized.dynamic",
    )


@torch.no_grad()
def quantize_dynamic(
    model: nn.Module,
    targets: Iterable | None = None,
    dtype="int8",
    *,
    act_granularity: str = "token",
    symmetric: bool = True,
    weight_bits: int = 8,
    weight_symmetric: bool = False,
    group_size: int = 128,
    outlier_threshold: float | None = None,
    rotation: int | None = None,
    ignore: Iterable[str] = ("lm_head",),
    progress: bool = True,
) -> QuantSummary:
    """Dynamically quantize ``model`` in place and return a summary.

    ``targets``: module types (``nn.Linear``, ``nn.LSTM``, ``nn.GRU``) and/or module names / ``re:`` patterns
    (default ``{nn.Linear}``); ``ignore``: names or patterns left in float (``lm_head`` by default).
    ``act_granularity``: ``"token"`` (a scale per row, default) or ``"tensor"``; ``symmetric``: symmetric
    (default) or asymmetric int8 activations; ``weight_bits``: 8 (int8 per output channel) or 4 (int4 in
    groups of ``group_size``); ``weight_symmetric``: False (default) gives each output channel an integer
    zero point, which on the default model lowers the W8 weight-only KL by about a quarter (0.0022 against
    0.0029 on 2 windows) for one extra code sum per token; ``outlier_threshold``: LLM.int8()'s float path for input columns holding a
    ``|x| >= t`` (6.0 in the paper), None for none; ``rotation``: a Hadamard block size (e.g. 64) to
    rotate each Linear's input and weight rows by, ``y = Q(x R) Q(W R)^T`` with ``R = diag(H_b, ...)``
    orthonormal (QuaRot, Ashkboos et al. 2024, applied per Linear and online): exact in float, it spreads
    an outlier channel over its block, at the cost of one small batched matmul per Linear (layers whose
    width is not a multiple of the block are left unrotated).
    """
    _dtype_name(dtype)
    wscheme, ascheme = dynamic_schemes(
        weight_bits, act_granularity, symmetric, group_size, outlier_threshold, weight_symmetric, rotation
    )
    if targets is None:
        targets = (nn.Linear,)
    elif isinstance(targets, (str, type)):
        targets = [targets]
    targets = tuple(targets)
    _check_types(targets)
    types = tuple(t for t in targets if isinstance(t, type))
    names = tuple(t for t in targets if not isinstance(t, type))
    cfg = QuantConfig(weight=wscheme, activation=ascheme, method="dynamic", targets=names, ignore=tuple(ignore))
    return run_dynamic(model, cfg, None, progress, types=types)


@torch.no_grad()
def run_dynamic(model: nn.Module, cfg: QuantConfig, calib=None, progress: bool = True, *,
                types: tuple[type, ...] = ()) -> QuantSummary:
    """The ``dynamic`` method's handler: ``cfg.weight`` made by RTN ahead of time, ``cfg.activation`` (a
    dynamic scheme) computed per input at run time. ``types``: module types selected besides ``cfg.targets``
    (``quantize_dynamic``'s ``{nn.Linear, nn.LSTM}``); none given and no targets: every ``nn.Linear``."""
    wscheme, ascheme = cfg.weight, cfg.activation
    if ascheme is None or not ascheme.dynamic:
        raise SchemeError("the dynamic method needs a dynamic activation scheme (QuantScheme(..., dynamic=True)); "
                          "leave activation unset for int8 per-token")
    if not types and not cfg.targets:
        types = (nn.Linear,)
    chosen = select_linears(model, types + cfg.targets, cfg.ignore, types=SUPPORTED_TYPES)
    rnns = [n for n, m in chosen if isinstance(m, (nn.LSTM, nn.GRU))]
    if rnns and wscheme.bits != 8:
        raise SchemeError(
            f"LSTM/GRU weights are int8 only (PyTorch's dynamic RNN kernels), but weight_bits={wscheme.bits}: "
            f"pass weight_bits=8 or leave {rnns} out with ignore"
        )
    projected = [n for n, m in chosen if getattr(m, "proj_size", 0)]
    if projected:
        raise SchemeError(f"PyTorch's dynamic LSTM does not support proj_size: leave {projected} out with ignore")
    t0 = time.perf_counter()
    rows = []
    for name, mod in tqdm([(n, m) for n, m in chosen if isinstance(m, (nn.LSTM, nn.GRU))], desc="quantize_dynamic (RNN)",
                          disable=not progress, leave=False):
        qmod = _quantize_rnn(mod)
        rows.append(_rnn_summary(name, mod, qmod))
        replace_module(model, name, qmod)
    linears = [n for n, m in chosen if isinstance(m, nn.Linear)]
    if linears:
        summary = run_stages(model, cfg, progress=progress, stages=[DynamicStage(cfg)], names=linears)
    else:
        summary = QuantSummary(method="dynamic", config=cfg.to_dict())
    if rows:
        order = {n: k for k, (n, _) in enumerate(chosen)}
        summary.layers = sorted(summary.layers + rows, key=lambda r: order[r.name])
    summary.seconds = time.perf_counter() - t0
    model.llmquant_config = cfg
    return summary


class DynamicStage(Stage):
    """Weights by RTN ahead of time (rotated first when the activation scheme rotates); each linear keeps
    the dynamic activation scheme, unrotated where its width is not a multiple of the rotation block."""

    needs_data = needs_gram = False

    def quantize(self, ctx: LayerContext) -> Result:
        from ..algorithms import rtn_quantize

        wscheme, ascheme = self.cfg.weight, self.cfg.activation
        out = {}
        for name, mod in ctx.linears.items():
            w, a = mod.weight, ascheme
            if ascheme.rotation is not None:
                if mod.in_features % ascheme.rotation:
                    a = replace(ascheme, rotation=None)
                    log.info("%s: width %d is not a multiple of %d, left unrotated", name, mod.in_features,
                             ascheme.rotation)
                else:
                    w = rotate_blocks(w.detach().float(), ascheme.rotation).to(w.dtype)
            out[name] = (*rtn_quantize(w, wscheme, name=name), w, a)
        return out

    def build(self, name, lin, result):
        q, scale, zero, w, a = result
        label = f"{self.cfg.weight.name} x {a.name}-dyn" + (f"-rot{a.rotation}" if a.rotation else "")
        qlin, row = make_quant_linear(name, lin, q, scale, zero, self.cfg, weight=w, activation=a, label=label)
        return qlin, row
