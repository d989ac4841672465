"""The memory budget of a layer-by-layer run (``max_memory``): what a run needs, estimated from the model's
shapes before any work; a refusal when even one layer does not fit; calibration activations kept in memory
when they fit and spilled to a file on disk when they do not.

The estimate (bytes):
    base         resident memory when the run starts (interpreter, libraries, embeddings, the rest)
    layer        the largest decoder layer in the compute dtype, plus its stored copy while it is read
    work         the quantizer's temporaries: 4 copies of the largest weight; for GPTQ/AWQ statistics
                 one in x in Gram matrix per distinct input and GPTQ's inverse
    activations  2 copies (inputs and outputs) of the calibration hidden states of one layer
    staged       a layer calibrated in one pass (true sequential) holds every batch's activations inside the
                 layer at once: two hidden states and the widest linear input per token
A spilled run keeps one batch of each in memory instead of all of them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import BudgetError
from ..resources import rss_bytes

log = logging.getLogger(__name__)


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.0f} MB"


@dataclass
class Estimate:
    base: int
    layer: int
    work: int
    activations: int  # all windows, both copies
    one_batch: int  # one batch, both copies
    staged: int = 0  # more, for a layer calibrated in one pass (every batch inside the layer at once)

    @property
    def in_memory(self) -> int:
        return self.base + self.layer + self.work + self.activations

    @property
    def minimum(self) -> int:
        return self.base + self.layer + self.work + self.one_batch


def estimate(layers, chosen: dict, stages, batches, hidden: int | None,
             dtype: torch.dtype = torch.float32) -> Estimate:
    size = torch.tensor([], dtype=dtype).element_size()
    layer = work = widest = 0
    for lay in layers or []:
        params = list(lay.parameters())
        numel = sum(p.numel() for p in params)
        read = numel * 2 if any(p.is_meta for p in params) else 0  # a streamed layer's stored (bf16) copy while read
        layer = max(layer, numel * size + read)
        lin = [m for m in lay.modules() if isinstance(m, nn.Linear)]
        if lin:
            widest = max(widest, *(m.in_features for m in lin))
            w = 4 * max(m.in_features * m.out_features for m in lin) * 4
            if any(s.needs_gram for s in stages):
                ins = {m.in_features for m in lin}
                w += sum(n * n * 4 for n in ins) + 2 * max(ins) ** 2 * 4
            work = max(work, w)
    if not layers:  # no decoder layers: the quantized linears one at a time
        work = max((4 * m.weight.numel() * 4 for m in chosen.values() if hasattr(m, "weight")), default=0)
    acts = one = staged = 0
    if batches and hidden:
        tokens = [b.numel() if not b.is_floating_point() else b.shape[0] for b in batches]
        acts = 2 * sum(tokens) * hidden * 4
        one = 3 * max(tokens) * hidden * 4
        staged = sum(tokens) * (2 * hidden + widest) * 4
    return Estimate(rss_bytes(), layer, work, acts, one, staged)


def check(est: Estimate, max_memory: int | None) -> bool:
    """Raise when even a spilled run does not fit ``max_memory``; True when the activations must spill."""
    if max_memory is None:
        return False
    if est.minimum > max_memory:
        raise BudgetError(
            f"a memory budget of {_gb(max_memory)} cannot hold one layer and its work: this run needs at least "
            f"{_gb(est.minimum)} (already in use {_gb(est.base)}, the largest layer {_gb(est.layer)}, the quantizer's "
            f"work {_gb(est.work)}, one batch of activations {_gb(est.one_batch)}); raise --max-memory, or "
            "use fewer calibration windows per batch")
    return est.in_memory > max_memory


class SpilledList:
    """A list of tensors kept in a file on disk (one slot per item, rewritten in place), read back on access:
    the pipeline's calibration activations when they do not fit the budget. ``None`` items stay in memory."""

    def __init__(self, n: int = 0, folder: str | None = None) -> None:
        self._f = tempfile.TemporaryFile(prefix="llmquant-activations-", dir=folder)
        self._slots: list = [None] * n  # (offset, nbytes, shape, dtype) or None
        self._end = 0

    def __len__(self) -> int:
        return len(self._slots)

    def append(self, t) -> None:
        self._slots.append(None)
        self[len(self._slots) - 1] = t

    def __setitem__(self, j: int, t) -> None:
        if t is None:
            self._slots[j] = None
            return
        if not isinstance(t, torch.Tensor):
            raise TypeError("only tensors can be spilled")
        t = t.detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        nbytes = t.numel() * t.element_size()
        old = self._slots[j]
        if old is not None and old[1] >= nbytes:
            offset = old[0]
        else:
            offset, self._end = self._end, self._end + nbytes
        os.pwrite(self._f.fileno(), memoryview(data), offset)
        self._slots[j] = (offset, nbytes, tuple(t.shape), t.dtype)

    def __getitem__(self, j: int):
        slot = self._slots[j]
        if slot is None:
            return None
        offset, nbytes, shape, dtype = slot
        buf = bytearray(nbytes)
        got = os.preadv(self._f.fileno(), [buf], offset)
        if got != nbytes:
            raise OSError(f"the activation spill file returned {got} of {nbytes} bytes")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)

    def __iter__(self):
        return (self[j] for j in range(len(self)))

    def close(self) -> None:
        self._f.close()


def decide(model, layers, chosen, stages, batches, summary, staged: bool = False) -> tuple[bool, bool]:
    """Check the run against the budget (``max_memory=``) before any work; returns (spill the activations,
    calibrate each layer in one pass): the one-pass layer (``staged``, asked) holds every batch's activations
    inside the layer at once, so it is kept only when that fits the budget too."""
    limit = getattr(model, "llmquant_max_memory", None)
    if limit is None:
        return False, staged
    cfg = getattr(model, "config", None)
    est = estimate(layers, chosen, stages, batches, getattr(cfg, "hidden_size", None))
    spill = check(est, limit)
    staged = staged and (est.minimum if spill else est.in_memory) + est.staged <= limit
    summary.memory_budget = {"max_memory_mb": limit / 1e6, "estimate_mb": est.in_memory / 1e6,
                             "minimum_mb": est.minimum / 1e6, "activations_spilled": spill,
                             "true_sequential": staged}
    if spill:
        log.info("activations (%.0f MB) do not fit the budget of %.0f MB: spilled to disk", est.activations / 1e6,
                 limit / 1e6)
    return spill, staged
