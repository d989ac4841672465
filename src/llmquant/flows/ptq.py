"""Weight-only post-training quantization: ``quantize(model, scheme_or_config)`` in place."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..algorithms import ALGORITHMS
from ..errors import SchemeError
from ..models import tied_lm_head
from ..modules import QuantLinear, replace_module, select_linears
from ..schemes import METHOD_PARAMS, QuantConfig, resolve_config, sqnr_db

log = logging.getLogger(__name__)


@dataclass
class LayerSummary:
    name: str
    shape: tuple[int, int]
    scheme: str
    bits_per_weight: float
    packed_bytes: int
    float_bytes: int
    sqnr_db: float
    kernel: str


@dataclass
class QuantSummary:
    """What ``quantize`` did: per-layer scheme, size and weight SQNR, and the kernel each layer runs."""

    method: str
    config: dict
    layers: list[LayerSummary] = field(default_factory=list)
    seconds: float = 0.0
    untied_lm_head: bool = False

    @property
    def packed_bytes(self) -> int:
        return sum(l.packed_bytes for l in self.layers)

    @property
    def float_bytes(self) -> int:
        return sum(l.float_bytes for l in self.layers)

    @property
    def bits_per_weight(self) -> float:
        n = sum(l.shape[0] * l.shape[1] for l in self.layers)
        return sum(l.bits_per_weight * l.shape[0] * l.shape[1] for l in self.layers) / max(n, 1)

    @property
    def mean_sqnr_db(self) -> float:
        return sum(l.sqnr_db for l in self.layers) / max(len(self.layers), 1)

    @property
    def kernels(self) -> list[str]:
        return sorted({l.kernel for l in self.layers})

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "config": self.config,
            "layers": [l.__dict__ for l in self.layers],
            "seconds": self.seconds,
            "packed_bytes": self.packed_bytes,
            "float_bytes": self.float_bytes,
            "bits_per_weight": self.bits_per_weight,
            "mean_sqnr_db": self.mean_sqnr_db,
            "kernels": self.kernels,
            "untied_lm_head": self.untied_lm_head,
        }

    def __str__(self) -> str:
        return (
            f"{self.method}: {len(self.layers)} layers, {self.bits_per_weight:.2f} bits/weight, "
            f"{self.float_bytes / 1e6:.1f} MB -> {self.packed_bytes / 1e6:.1f} MB, mean weight SQNR "
            f"{self.mean_sqnr_db:.1f} dB, kernel(s) {', '.join(self.kernels)}, {self.seconds:.1f}s"
        )


def _untie_if_needed(model: nn.Module, names: list[str]) -> bool:
    """Quantizing a tied lm_head unties it: the embedding keeps its float weight."""
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if out is None or not tied_lm_head(model):
        return False
    out_name = next((n for n, m in model.named_modules() if m is out), None)
    if out_name not in names:
        return False
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
    log.info("lm_head was tied to the embedding; it is untied so that the embedding stays in float")
    return True


def make_quant_linear(name, lin, q, scale, zero, cfg: QuantConfig, weight=None) -> tuple[QuantLinear, LayerSummary]:
    """The QuantLinear for codes/qparams of ``lin`` and its summary row; ``weight``: the float weight the
    codes approximate when it is not ``lin.weight`` (e.g. AWQ-scaled), for the SQNR."""
    w = lin.weight if weight is None else weight
    qlin = QuantLinear.from_quantized(q, scale, zero, cfg.weight, bias=lin.bias, activation_scheme=cfg.activation)
    qlin.to(lin.weight.device)
    deq = qlin.dequantize_weight(dtype=torch.float32, device=lin.weight.device)
    row = LayerSummary(
        name=name,
        shape=tuple(w.shape),
        scheme=cfg.weight.name,
        bits_per_weight=qlin.weight_bits,
        packed_bytes=qlin.packed_bytes(),
        float_bytes=w.numel() * lin.weight.element_size() + (0 if lin.bias is None else lin.bias.numel() * lin.bias.element_size()),
        sqnr_db=sqnr_db(w.float(), deq),
        kernel=qlin.kernel.name,
    )
    return qlin, row


@torch.no_grad()
def quantize(model: nn.Module, config="W4G128", *, calib: torch.Tensor | None = None, progress: bool = True) -> QuantSummary:
    """Quantize the weights of ``model``'s selected linears in place and return a summary.

    ``config`` is a :class:`QuantConfig`, a :class:`QuantScheme`, a preset name (``"W4G64"``) or a dict,
    or a mixed-precision :class:`~llmquant.schemes.Plan` (or its dict, or a ``.json`` plan file).
    Calibrated methods (``gptq``, ``awq``) need ``calib``: token ids (windows, seq_len) or float inputs
    (``llmquant.quantize`` makes them from text); see :mod:`llmquant.flows.sequential`.
    """
    from ..schemes import is_plan_like

    if is_plan_like(config):  # a mixed-precision plan: one format per layer (flows/mixed)
        from .mixed.apply import apply_plan

        return apply_plan(model, config, progress=progress)
    cfg: QuantConfig = resolve_config(config)
    if cfg.method in METHOD_PARAMS:
        from .sequential import quantize_calibrated

        if calib is None:
            raise SchemeError(f"method {cfg.method!r} needs calibration data: pass calib= (token ids or inputs)")
        return quantize_calibrated(model, cfg, calib, progress=progress)
    if cfg.method not in ALGORITHMS:
        raise SchemeError(f"method {cfg.method!r} is not a data-free method; known here: {', '.join(ALGORITHMS)}")
    algo = ALGORITHMS[cfg.method]
    chosen = select_linears(model, cfg.targets, cfg.ignore)
    t0 = time.perf_counter()
    summary = QuantSummary(method=cfg.method, config=cfg.to_dict())
    summary.untied_lm_head = _untie_if_needed(model, [n for n, _ in chosen])
    for name, lin in tqdm(chosen, desc=f"quantize ({cfg.method}, {cfg.weight.name})", disable=not progress, leave=False):
        q, scale, zero = algo(lin.weight, cfg.weight, name=name)
        qlin, row = make_quant_linear(name, lin, q, scale, zero, cfg)
        summary.layers.append(row)
        replace_module(model, name, qlin)
    summary.seconds = time.perf_counter() - t0
    log.info("%s", summary)
    model.llmquant_config = cfg
    return summary
