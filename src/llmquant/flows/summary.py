"""What a quantization did, one row per module: :class:`LayerSummary` rows inside a :class:`QuantSummary`.

Every method builds its rows with :func:`layer_row`, so sizes, bits per weight and SQNR mean the same
thing whichever method made a model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..models import tied_lm_head
from ..modules.storage import tensor_bytes
from ..schemes import sqnr_db

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
    """What ``quantize`` did: per-layer scheme, size and weight SQNR, and the kernel each layer runs;
    for calibrated layer-by-layer methods also the calibration used and each decoder layer's output error
    (relative MSE against the float layer on the same inputs)."""

    method: str
    config: dict
    layers: list[LayerSummary] = field(default_factory=list)
    seconds: float = 0.0
    untied_lm_head: bool = False
    calibration: dict = field(default_factory=dict)
    layer_errors: list[float] = field(default_factory=list)
    peak_memory_mb: float = 0.0  # the process's peak resident memory while quantizing (MB, 1e6 bytes)
    memory_budget: dict = field(default_factory=dict)  # max_memory=: the budget, the estimate, whether it spilled
    resumed_after: int = 0  # decoder layers taken from an interrupted run's checkpoint (resume)
    true_sequential: bool = False  # layers calibrated in one pass, each linear after the ones before it (staged)
    # a layer-by-layer calibrated run: seconds spent in each phase, summed over the layers ("float pass"
    # with the statistics hooks, "reduce" across ranks, "quantize" (the stages), "quantized pass", "write")
    phase_seconds: dict = field(default_factory=dict)
    # linears a calibrated method quantized with RTN: they saw no (or too few) calibration tokens, e.g.
    # mixture-of-experts experts the router seldom chose on the calibration text
    rtn_fallback: list = field(default_factory=list)
    # the embedding / output head stored in a format of their own (QuantConfig.head): format, modules, tied
    head: dict = field(default_factory=dict)

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
        """The mean over the rows whose weights changed; rows stored exactly (infinite SQNR, e.g. an embedding
        already on its int8 grid) are left out, so that one of them does not make the mean infinite."""
        finite = [l.sqnr_db for l in self.layers if math.isfinite(l.sqnr_db)]
        if not finite:
            return float("inf") if self.layers else 0.0
        return sum(finite) / len(finite)

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
            "calibration": self.calibration,
            "layer_errors": self.layer_errors,
            "peak_memory_mb": self.peak_memory_mb,
            "memory_budget": self.memory_budget,
            "resumed_after": self.resumed_after,
            "true_sequential": self.true_sequential,
            "phase_seconds": self.phase_seconds,
            "rtn_fallback": self.rtn_fallback,
            "head": self.head,
        }

    def __str__(self) -> str:
        return (
            f"{self.method}: {len(self.layers)} layers, {self.bits_per_weight:.2f} bits/weight, "
            f"{self.float_bytes / 1e6:.1f} MB -> {self.packed_bytes / 1e6:.1f} MB, mean weight SQNR "
            f"{self.mean_sqnr_db:.1f} dB, kernel(s) {', '.join(self.kernels)}, {self.seconds:.1f}s"
            + (f", peak memory {self.peak_memory_mb:.0f} MB" if self.peak_memory_mb else "")
            + (f", {len(self.rtn_fallback)} linears with too few calibration tokens quantized with RTN"
               if self.rtn_fallback else "")
            + (f", embedding/head {self.head['format']}{' (tied)' if self.head.get('tied') else ''}" if self.head else "")
        )


def _param_bytes(mod: nn.Module) -> int:
    """Bytes of a module's own weight and bias as they were before quantization."""
    return tensor_bytes(p for p in (getattr(mod, "weight", None), getattr(mod, "bias", None)) if isinstance(p, torch.Tensor))


def layer_row(name: str, ref: torch.Tensor, approx: torch.Tensor | None, new: nn.Module, *, orig: nn.Module,
              scheme: str, kernel: str | None = None, packed_bytes: int | None = None,
              bits_per_weight: float | None = None, codes: torch.Tensor | None = None) -> LayerSummary:
    """The summary row of module ``name``: ``ref`` is the float weight the new module approximates (its
    SQNR is taken against ``approx``, the new module's weight as it computes it; None: a QuantLinear's own,
    dequantized a block of rows at a time), ``orig`` the module it replaces (for the float bytes). Sizes
    default to the new module's own count (``packed_bytes()``). ``codes``: the QuantLinear's codes, when at hand
    (its SQNR then needs no unpacking)."""
    nbytes = new.packed_bytes() if packed_bytes is None else packed_bytes
    bits = getattr(new, "weight_bits", None) if bits_per_weight is None else bits_per_weight
    if bits is None:
        bits = 8 * nbytes / max(ref.numel(), 1)
    return LayerSummary(
        name=name, shape=tuple(ref.shape), scheme=scheme, bits_per_weight=bits, packed_bytes=int(nbytes),
        float_bytes=_param_bytes(orig),
        sqnr_db=new.weight_sqnr_db(ref, codes=codes) if approx is None else sqnr_db(ref.float(), approx),
        kernel=kernel if kernel is not None else new.kernel.name,
    )


def untie_if_needed(model: nn.Module, names) -> bool:
    """Quantizing a tied lm_head unties it: the embedding keeps its float weight."""
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if out is None or not tied_lm_head(model):
        return False
    out_name = next((n for n, m in model.named_modules() if m is out), None)
    if out_name not in set(names):
        return False
    out.weight = nn.Parameter(out.weight.detach().clone(), requires_grad=False)
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
    log.info("lm_head was tied to the embedding; it is untied so that the embedding stays in float")
    return True
