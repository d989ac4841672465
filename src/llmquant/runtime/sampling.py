"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from ..errors import GenerationError


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False  # False: greedy (argmax)
    temperature: float = 1.0  # logits are divided by this before top-k/top-p
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set whose probability reaches p (1.0: all)

    def __post_init__(self) -> None:
        for k in ("temperature", "top_p"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise GenerationError(f"{k} must be a finite number, got {v!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise GenerationError(f"top_k must be an integer, got {self.top_k!r}")
        if self.temperature <= 0:
            raise GenerationError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= cfg.top_p  # the mass before this token already reaches p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
