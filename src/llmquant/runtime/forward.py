"""The model's own forward as a step function for :func:`~llmquant.runtime.generate`: what generation runs
on when the lean runtime does not know the model's family (or a setting of it, such as an attention window
shorter than the sequence). Quantized modules compute inside the model as they do in evaluation; the KV
cache is the model's own (``cache`` / ``past_key_values``), so each step runs the new tokens only."""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn


class ForwardCache:
    """The model's ``past_key_values`` and how many positions it holds."""

    def __init__(self, max_len: int) -> None:
        self.max_len, self.length, self.past = max_len, 0, None


class ModelForward:
    """Callable as ``step(ids, cache, key_mask=None, positions=None) -> logits`` like
    :class:`~llmquant.runtime.LeanModel`, through ``model(ids, past_key_values=..., use_cache=True)``."""

    def __init__(self, model: nn.Module, reason: str = "") -> None:
        self.model, self.reason = model, reason
        self.device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
        # transformers 5 names the cache argument and output ``cache``; earlier versions ``past_key_values``
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def new_cache(self, batch: int, max_len: int) -> ForwardCache:
        return ForwardCache(max_len)

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, cache: ForwardCache, key_mask: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, all_logits: bool = False) -> torch.Tensor:
        end = cache.length + ids.shape[1]
        kw = {"use_cache": True, self.cache_arg: cache.past}
        if key_mask is not None:
            kw["attention_mask"] = key_mask[:, :end].long()
        if positions is not None:
            kw["position_ids"] = positions
        out = self.model(ids, **kw)
        cache.past = out.get("cache", out.get("past_key_values")) if hasattr(out, "get") else out.past_key_values
        cache.length = end
        return out.logits if all_logits else out.logits[:, -1:]
