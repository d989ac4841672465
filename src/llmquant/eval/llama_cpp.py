"""llama.cpp in the loop: the logits llama.cpp itself computes from a GGUF file, through the prebuilt wheel
``cyllama`` (it bundles llama.cpp; ``pip install --no-deps cyllama``), and llama.cpp's activation rounding
as llmquant activation schemes, so llmquant's own evaluation of a model can compute what llama.cpp computes.

llama.cpp's CPU matmuls round each activation row to 8 bits in the block format its weight type pairs
with (``vec_dot_type`` in ggml-cpu): Q8_0 (blocks of 32, fp16 scale) for Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0
weights, Q8_K (blocks of 256, float32 scale max|x| / 127) for the k-quants. :func:`emulate_llama_cpp` gives
every packed linear the matching scheme (``gguf:Q8_0-act`` / ``gguf:Q8_K-act``).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch.nn as nn

from ..errors import UsageError


def _cyllama():
    try:
        import cyllama.llama.llama_cpp as cpp
    except ImportError:
        raise UsageError("running llama.cpp needs the prebuilt wheel cyllama: pip install --no-deps cyllama==0.2.18 "
                         "(Linux x86-64, Python 3.11)") from None
    return cpp


#: llama.cpp's file types (``llama_ftype``) its quantizer makes, by the names ``llama-quantize`` takes
FTYPES = {"F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
          "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}


class LlamaCpp:
    """A GGUF file loaded in llama.cpp (through cyllama): logits of token sequences, and its speed. One
    loaded model, a context per call; :meth:`close` (or ``with``) frees it."""

    def __init__(self, path: str | os.PathLike, *, threads: int = 1) -> None:
        cpp = self._cpp = _cyllama()
        cpp.disable_logging()

        class _Model(cpp.LlamaModel):  # cyllama 0.2.18's get_logits* read model.n_vocab, which it lacks
            @property
            def n_vocab(self):
                return self.get_vocab().n_vocab

        mp = cpp.LlamaModelParams()
        mp.use_mmap = False
        self.path, self.threads = str(path), threads
        self.model = _Model(self.path, mp)

    def _context(self, n_ctx: int, n_batch: int):
        cp = self._cpp.LlamaContextParams()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = max(n_ctx, 8), max(n_batch, 8), max(n_batch, 8)
        cp.n_threads = cp.n_threads_batch = self.threads
        return self._cpp.LlamaContext(self.model, cp)

    def _batch(self, ids, start: int, logits: bool):
        b = self._cpp.LlamaBatch(n_tokens=len(ids), embd=0, n_seq_max=1)
        for i, t in enumerate(ids):
            b.add(int(t), start + i, [0], logits or i == len(ids) - 1)
        return b

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token logits (len(ids), vocab) float32 for one sequence, decoded as one batch."""
        n = len(ids)
        ctx = self._context(n, n)
        try:
            ctx.decode(self._batch(ids, 0, True))
            return np.stack([np.asarray(ctx.get_logits_ith(i), dtype=np.float32) for i in range(n)])
        finally:
            ctx.close()

    def speed(self, *, prefill_len: int = 512, prompt_len: int = 32, new_tokens: int = 128, repeats: int = 3,
              vocab_seed: int = 0):
        """Prefill and greedy-decode tokens per second, measured as :func:`llmquant.bench.measure_speed`
        measures a torch model (best of ``repeats`` prefills; decode after a ``prompt_len`` prompt)."""
        import time

        from ..bench.speed import SpeedResult

        vocab = self.model.get_vocab().n_vocab
        g = np.random.default_rng(vocab_seed)
        x = g.integers(100, min(vocab, 30000), prefill_len).tolist()
        best = float("inf")
        for r in range(repeats + 1):  # the first is a warm-up
            ctx = self._context(prefill_len, prefill_len)
            t = time.perf_counter()
            ctx.decode(self._batch(x, 0, False))
            if r:
                best = min(best, time.perf_counter() - t)
            ctx.close()
        prompt = g.integers(100, min(vocab, 30000), prompt_len).tolist()
        ctx = self._context(prompt_len + new_tokens + 1, prompt_len)
        try:
            ctx.decode(self._batch(prompt, 0, False))
            tok = int(np.argmax(ctx.get_logits_ith(prompt_len - 1)))
            t = time.perf_counter()
            for i in range(new_tokens):
                ctx.decode(self._batch([tok], prompt_len + i, True))
                tok = int(np.argmax(ctx.get_logits_ith(0)))
            decode = new_tokens / max(time.perf_counter() - t, 1e-9)
        finally:
            ctx.close()
        return SpeedResult(prefill_tokens_per_s=prefill_len / best, decode_tokens_per_s=decode, prefill_len=prefill_len,
                           prompt_len=prompt_len, new_tokens=new_tokens, threads=self.threads)

    def batched_decode(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> tuple[list[list[int]], float]:
        """Greedy decode of several sequences at once, as a server batches its users: the prompts (of equal
        length) prefilled as one batch, then each step one batch of one token per sequence (its own sequence
        id in one KV cache). Returns the new tokens of each sequence (the first from the prefill) and the
        decode's tokens per second over all sequences (steps after the first token), as the lean runtime's
        :class:`~llmquant.runtime.GenerationStats` counts them."""
        import time

        n, t = len(prompts), len(prompts[0])
        if any(len(p) != t for p in prompts) or new_tokens < 2:
            raise ValueError("prompts of one length, and at least 2 new tokens")
        cp = self._cpp.LlamaContextParams()
        cp.n_ctx = n * (t + new_tokens + 1)
        cp.n_batch = cp.n_ubatch = max(n * t, 8)
        cp.n_seq_max, cp.kv_unified = n, True
        cp.n_threads = cp.n_threads_batch = self.threads
        ctx = self._cpp.LlamaContext(self.model, cp)
        try:
            b = self._cpp.LlamaBatch(n_tokens=n * t, embd=0, n_seq_max=n)
            for s, p in enumerate(prompts):
                for i, tok in enumerate(p):
                    b.add(int(tok), i, [s], i == t - 1)
            ctx.decode(b)
            toks = [int(np.argmax(ctx.get_logits_ith(s * t + t - 1))) for s in range(n)]
            out = [[x] for x in toks]
            start = time.perf_counter()
            for step in range(new_tokens - 1):
                b = self._cpp.LlamaBatch(n_tokens=n, embd=0, n_seq_max=n)
                for s, tok in enumerate(toks):
                    b.add(tok, t + step, [s], True)
                ctx.decode(b)
                toks = [int(np.argmax(ctx.get_logits_ith(s))) for s in range(n)]
                for s, x in enumerate(toks):
                    out[s].append(x)
            return out, n * (new_tokens - 1) / max(time.perf_counter() - start, 1e-9)
        finally:
            ctx.close()

    def close(self) -> None:
        if getattr(self, "model", None) is not None:
            self.model.close()
            self.model = None

    def __enter__(self) -> "LlamaCpp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def llama_cpp_logits(path: str | os.PathLike, ids: Sequence[int], *, threads: int = 1) -> np.ndarray:
    """Next-token logits (len(ids), vocab) float32 that llama.cpp computes for the token ids ``ids`` (one
    sequence, one batch) from the GGUF file ``path``."""
    with LlamaCpp(path, threads=threads) as m:
        return m.logits(ids)


def llama_cpp_quantize(src: str | os.PathLike, out: str | os.PathLike, file_type: str, *, threads: int = 1) -> None:
    """llama.cpp's own quantizer (``llama_model_quantize``, as ``llama-quantize`` runs it) from a float GGUF
    ``src`` to ``out`` in ``file_type`` (a name of :data:`FTYPES`, e.g. ``"Q4_K_M"``)."""
    from ..errors import ExportError

    cpp = _cyllama()
    cpp.disable_logging()
    if file_type.upper() not in FTYPES:
        raise ExportError(f"llama.cpp file type {file_type!r} unknown; choose one of {', '.join(FTYPES)}")
    p = cpp.LlamaModelQuantizeParams()
    p.ftype, p.nthread = FTYPES[file_type.upper()], threads
    try:
        ret = cpp.model_quantize(str(src), str(out), p)  # None (this wheel) or llama.cpp's status
    except Exception as e:  # noqa: BLE001
        ret = e
    if ret not in (None, 0) or not os.path.isfile(out):
        raise ExportError(f"llama.cpp could not quantize {str(src)!r} to {file_type}: {ret}")


def evaluate_llama_cpp(path: str | os.PathLike, ids, reference=None, *, threads: int = 1):
    """Perplexity, KL against ``reference`` (a :class:`~llmquant.eval.ReferenceLogits` of the same windows)
    and top-1 agreement of the GGUF file ``path`` as llama.cpp computes it, on token windows ``ids`` (n,
    seq_len): what :func:`llmquant.evaluate` reports for a torch model (a distributed run splits the
    windows, as there)."""
    import math
    import time

    import torch
    import torch.nn.functional as F

    from ..flows import distributed
    from .metrics import EvalResult

    t0 = time.perf_counter()
    mine, _ = distributed.split(ids)
    parts = []
    with LlamaCpp(path, threads=threads) as m:
        for i in mine:
            w = ids[i]
            logp = F.log_softmax(torch.from_numpy(m.logits(w.tolist()))[:-1].double(), -1)
            target = w[1:]
            row = [float(F.nll_loss(logp, target, reduction="sum")), 0.0, 0.0, target.numel()]
            if reference is not None:
                ref = reference.log_probs(i, w).double()
                row[1] = float(F.kl_div(logp, ref, log_target=True, reduction="sum"))
                row[2] = float((ref.argmax(-1) == logp.argmax(-1)).sum())
            parts.append((i, row))
    nll = kl = agree = 0.0
    n = 0
    for a, b, c, d in distributed.sum_in_order(parts, "the llama.cpp evaluation sums"):
        nll, kl, agree, n = nll + a, kl + b, agree + c, n + d
    size = os.path.getsize(path)
    return EvalResult(perplexity=math.exp(nll / n), kl=kl / n if reference is not None else None,
                      top1=agree / n if reference is not None else None, tokens=n, windows=len(ids),
                      seq_len=int(ids.shape[1]), seconds=time.perf_counter() - t0,
                      size={"total_bytes": size, "file": str(path)})


def emulate_llama_cpp(model: nn.Module) -> nn.Module:
    """Give each packed linear of ``model`` (weight-only, on a GGUF grid) the activation rounding llama.cpp's
    CPU matmul applies for its block type, in place; returns the model."""
    from ..io.ggml_blocks import exact_blocks
    from ..modules import QuantLinear
    from ..schemes import PRESETS

    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            found = exact_blocks(mod)
            if found is None:
                continue
            mod.activation_scheme = PRESETS["gguf:Q8_K-act" if found[0].kquant else "gguf:Q8_0-act"]
            mod.reset_kernel()
    return model
