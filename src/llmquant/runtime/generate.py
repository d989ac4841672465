"""``generate(model, prompt_or_ids, max_new_tokens=...)``: text generation through :class:`LeanModel`.

A string (or a list of strings, left-padded into a batch) is tokenized with ``model.llmquant_tokenizer``
(set by :func:`llmquant.load_model` / :func:`llmquant.load`) or the ``tokenizer`` argument; a tensor of
ids, (T,) or (B, T), is used as is. Generation stops per sequence at a stop token (the model's EOS tokens
plus ``stop_tokens``) and for the batch when every sequence stopped or after ``max_new_tokens``. The return
value is the generated ids only, (B, n) int64; positions after a sequence stopped hold ``pad_id``.
``callback(step, tokens)`` is called with each step's (B,) new tokens as they are produced (streaming).
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import GenerationError, UnsupportedModelError
from ..models import context_length
from ..modules import QuantLinear
from .forward import ModelForward
from .lean import LeanModel
from .sampling import SamplingConfig, next_tokens

log = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    """Timings of one :func:`generate` call (prefill: the prompt pass, which also yields the first token)."""

    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    build_s: float = 0.0
    threads: int = 0
    kernels: list[str] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first (each sequence's tokens counted)."""
        steps = self.new_tokens - 1
        return self.batch * steps / self.decode_s if self.decode_s and steps > 0 else 0.0


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        e = getattr(src, "eos_token_id", None)
        if e is None:
            continue
        ids.update([e] if isinstance(e, int) else list(e))
    return ids


def encode_prompt(prompt, tokenizer, device="cpu"):
    """(ids (B, T) int64, attention mask (B, T) bool or None) from text, texts, ids or a tensor."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt.long()
        return (ids.unsqueeze(0) if ids.dim() == 1 else ids).to(device), None
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
        return torch.tensor([list(prompt)], dtype=torch.long, device=device), None
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise GenerationError("prompt must be a string, a list of strings, a list of token ids or a tensor of ids")
    if tokenizer is None:
        raise GenerationError("a text prompt needs a tokenizer: load the model with llmquant.load_model/load, "
                              "or pass tokenizer=..., or pass token ids")
    if len(texts) == 1:
        ids = tokenizer(texts[0], return_tensors="pt")["input_ids"]
        return ids.to(device), None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    return enc["input_ids"].to(device), enc["attention_mask"].bool().to(device)


@torch.inference_mode()
def generate(
    model,
    prompt,
    max_new_tokens: int = 64,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_tokens: Sequence[int] | None = None,
    use_eos: bool = True,
    attention_mask: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    tokenizer=None,
    threads: int | None = None,
    pad_id: int | None = None,
    lean: LeanModel | None = None,
    stats: GenerationStats | None = None,
    prefill_bf16: bool = False,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``prompt``; returns the new ids (B, n).

    ``attention_mask`` (B, T) marks real tokens of a left-padded id batch. ``threads`` sets
    ``torch.set_num_threads`` (process-wide). ``lean`` reuses a built :class:`LeanModel`; a model the lean
runtime does not run generates through its own forward (:class:`~llmquant.runtime.forward.ModelForward`); ``stats``
    (a :class:`GenerationStats`) is filled with timings. ``prefill_bf16`` runs the prompt's forward under
    bf16 autocast (bf16 GEMMs, about 1.7x faster on an int8/int4 model here) and the token-by-token decode
    in fp32 as usual; it changes the prompt's numerics slightly (activations rounded to bf16).
    """
    if not isinstance(max_new_tokens, numbers.Integral) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    sampling = SamplingConfig(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    if threads is not None:
        if threads < 1:
            raise GenerationError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    tok = tokenizer if tokenizer is not None else getattr(model, "llmquant_tokenizer", None)
    t0 = time.perf_counter()
    if lean is None:
        try:
            lean = LeanModel(model)
        except UnsupportedModelError as e:  # a family (or setting) the lean runtime does not run
            log.info("generating with the model's own forward: %s", e)
            lean = ModelForward(model, str(e))
    build_s = time.perf_counter() - t0
    ids, mask = encode_prompt(prompt, tok, lean.device)
    if attention_mask is not None:
        mask = attention_mask.bool().to(lean.device)
    if mask is not None and bool(mask.all()):
        mask = None
    b, t = ids.shape
    if t == 0:
        raise GenerationError("the prompt is empty (it has no tokens); give some text or token ids to continue")
    ctx = context_length(model)
    if ctx is not None and t + max_new_tokens > ctx:
        raise GenerationError(f"the prompt ({t} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's "
                              f"context of {ctx} tokens; shorten the prompt or lower max_new_tokens to at most {max(ctx - t, 0)}")
    stops = set(stop_tokens or ())
    if use_eos:
        stops |= _eos_ids(model, tok)
    if pad_id is None:
        pad_id = min(stops) if stops else 0
    stop_t = torch.tensor(sorted(stops), dtype=torch.long, device=lean.device)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=lean.device).manual_seed(seed)

    try:
        cache = lean.new_cache(b, t + max_new_tokens)
    except UnsupportedModelError as e:  # e.g. a sequence longer than the attention window the lean runtime lacks
        log.info("generating with the model's own forward: %s", e)
        lean = ModelForward(model, str(e))
        cache = lean.new_cache(b, t + max_new_tokens)
    key_mask = positions = None
    if mask is not None:
        key_mask = torch.ones(b, cache.max_len, dtype=torch.bool, device=lean.device)
        key_mask[:, :t] = mask
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=lean.device)
    done = torch.zeros(b, dtype=torch.bool, device=lean.device)
    t1 = time.perf_counter()
    with torch.autocast(torch.device(lean.device).type, dtype=torch.bfloat16) if prefill_bf16 else contextlib.nullcontext():
        logits = lean(ids, cache, key_mask, positions)
    step_pos = None if positions is None else positions[:, -1:]
    n = 0
    t_first = None
    while True:
        nxt = next_tokens(logits[:, -1].float(), sampling, gen)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, n] = nxt
        n += 1
        if callback is not None:
            callback(n - 1, nxt)
        if t_first is None:
            t_first = time.perf_counter()
        if stop_t.numel():
            done |= torch.isin(nxt, stop_t)
        if n >= max_new_tokens or bool(done.all()):
            break
        if step_pos is not None:
            step_pos = step_pos + 1
        logits = lean(nxt.unsqueeze(1), cache, key_mask, step_pos)
    t2 = time.perf_counter()
    if stats is not None:
        stats.batch, stats.prompt_tokens, stats.new_tokens = b, t, n
        stats.prefill_s, stats.decode_s, stats.build_s = t_first - t1, t2 - t_first, build_s
        stats.threads = torch.get_num_threads()
        stats.kernels = sorted({m.prepared_kernel.name for m in model.modules()
                                if isinstance(m, QuantLinear) and m.prepared_kernel is not None})
    return out[:, :n]


def chat_prompt(tokenizer, messages: list[dict]) -> torch.Tensor:
    """Token ids (1, T) of ``messages`` ({"role", "content"}) through the tokenizer's chat template,
    ending with the assistant's turn."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise GenerationError("this model's tokenizer has no chat template; use generate with a plain prompt")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return ids if ids.dim() == 2 else ids.unsqueeze(0)
