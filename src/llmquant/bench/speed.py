"""Prefill and decode throughput of a causal LM, the way users run it (``model(...)`` and ``generate``).

Prefill: one forward over a ``prefill_len``-token prompt, best of ``repeats``. Decode: greedy ``generate``
with a KV cache, batch 1, exactly ``new_tokens`` new tokens after a ``prompt_len``-token prompt; the decode
rate excludes the prompt's forward (timed separately). Threads: ``torch.get_num_threads()`` at call time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class SpeedResult:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_len: int
    prompt_len: int
    new_tokens: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, min(vocab, 30000), (1, n), generator=g)


@torch.inference_mode()
def measure_speed(
    model, *, prefill_len: int = 512, prompt_len: int = 32, new_tokens: int = 128, repeats: int = 3
) -> SpeedResult:
    vocab = model.config.vocab_size
    x = _ids(prefill_len, vocab)
    # Warm-up at the full length: kernel preparation, and the allocator's first touch of the large
    # activation buffers, which otherwise lands in the first timed pass (with repeats=1, the only one).
    model(x, use_cache=False)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        model(x, use_cache=False)
        best = min(best, time.perf_counter() - t)
    prompt = _ids(prompt_len, vocab, seed=1)
    kw = dict(do_sample=False, num_beams=1, pad_token_id=0)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    total = time.perf_counter() - t
    produced = out.shape[1] - prompt_len
    return SpeedResult(
        prefill_tokens_per_s=prefill_len / best,
        decode_tokens_per_s=(produced - 1) / max(total - t_first, 1e-9),
        prefill_len=prefill_len,
        prompt_len=prompt_len,
        new_tokens=produced,
        threads=torch.get_num_threads(),
    )
