"""Perplexity, KL divergence from the unquantized model, and top-1 agreement, on fixed token windows.

KL is the mean over predicted positions of KL(p_ref || p_model) of the next-token distributions; top-1
agreement the share of positions where both models' most likely next token is the same.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import DEFAULT_SEQ_LEN, token_windows
from ..errors import LLMQuantError
from ..flows import distributed
from ..flows.passes import model_device
from .size import model_size


@dataclass
class EvalResult:
    perplexity: float
    kl: float | None  # None without a reference model
    top1: float | None
    tokens: int  # predicted positions
    windows: int
    seq_len: int
    seconds: float
    size: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float()



class ReferenceLogits:
    """The reference model's next-token log-probabilities on fixed windows, computed once and reused.

    Comparing many models against one reference (``llmquant compare``) otherwise runs the reference
    forward again for every model. The log-probabilities (windows x (seq_len - 1) x vocab, fp32) live in
    a memory-mapped temporary file, so a large vocabulary does not have to fit in RAM; it is removed when
    this object is garbage-collected or :meth:`close` d. Pass it as ``evaluate(model, reference=...)``.
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, *, directory: str | None = None,
                 progress: bool = False) -> None:
        self.ids = ids.clone()
        self._fd, self.path = tempfile.mkstemp(prefix="llmquant-ref-", suffix=".f32", dir=directory)
        self._logp: torch.Tensor | None = None
        def keep(i: int, logits: torch.Tensor) -> None:
            lp = F.log_softmax(logits[0, :-1], dim=-1).cpu()
            if self._logp is None:
                n = self.ids.shape[0] * lp.numel()
                os.ftruncate(self._fd, n * 4)
                self._logp = torch.from_file(self.path, shared=True, size=n, dtype=torch.float32).view(
                    self.ids.shape[0], *lp.shape)
            self._logp[i] = lp

        try:
            with torch.inference_mode():
                if getattr(model, "llmquant_layer_source", None) is not None:  # larger than memory: layer by layer
                    from ..flows.passes import streamed_logits

                    streamed_logits(model, self.ids, keep)
                else:  # a distributed run: the windows this rank evaluates
                    for i in tqdm(distributed.split(self.ids)[0], desc="reference", disable=not progress, leave=False):
                        keep(i, _logits(model, self.ids[i].unsqueeze(0).to(model_device(model))))
        except BaseException:
            self.close()
            raise

    def log_probs(self, i: int, window: torch.Tensor) -> torch.Tensor:
        if i >= self.ids.shape[0] or not torch.equal(self.ids[i], window.cpu()):
            raise LLMQuantError("these reference log-probabilities were computed on other windows "
                                "(text, windows and seq_len must match)")
        assert self._logp is not None
        return self._logp[i]

    def close(self) -> None:
        self._logp = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()


def check_windows(windows, seq_len, *models) -> None:
    """Refuse evaluation settings that cannot give a result: fewer than one window, windows shorter than two
    tokens (nothing to predict), or longer than a model's context (``max_position_embeddings``)."""
    from ..errors import EvaluationError
    from ..models import context_length

    if not isinstance(windows, numbers.Integral) or isinstance(windows, bool) or windows < 1:
        raise EvaluationError(f"the number of evaluation windows must be an integer >= 1, got {windows!r}")
    if not isinstance(seq_len, numbers.Integral) or isinstance(seq_len, bool) or seq_len < 2:
        raise EvaluationError(f"the evaluation window length (seq_len) must be an integer >= 2, got {seq_len!r}")
    for m in models:
        ctx = context_length(m) if isinstance(m, nn.Module) else None
        if ctx is not None and seq_len > ctx:
            raise EvaluationError(f"seq_len {seq_len} is longer than the model's context ({ctx} tokens, "
                                  f"max_position_embeddings); use --seq-len {ctx} or less")


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    reference: "nn.Module | ReferenceLogits | None" = None,
    text: str | Path | None = None,
    *,
    tokenizer=None,
    windows: int = 8,
    seq_len: int = DEFAULT_SEQ_LEN,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` (and compare with ``reference``, the unquantized model, when given).

    ``text``: None for the default text, a ``Path`` to a .txt/.jsonl file, or a string of text.
    ``reference`` may be a :class:`ReferenceLogits` computed once on the same windows. Started as one of
    several processes (torchrun, ``--workers``), each evaluates its share of the windows and every process
    gets the sums over all of them, added in window order (the one-process result).
    """
    if getattr(model, "llmquant_layer_source", None) is not None:
        from ..errors import UnsupportedError

        raise UnsupportedError("a streamed model (load_model(..., stream=True)) holds its layers only once quantize "
                               "has read them: quantize it first, or pass it as the reference (it is then run "
                               "layer by layer), or load it whole")
    check_windows(windows, seq_len, model, reference)
    tokenizer = tokenizer or getattr(model, "llmquant_tokenizer", None)
    ids = token_windows(tokenizer, text, windows, seq_len)
    if getattr(reference, "llmquant_layer_source", None) is not None:  # a float reference larger than memory
        reference = ReferenceLogits(reference, ids, progress=progress)
    dev = model_device(model)
    t0 = time.perf_counter()
    mine, _ = distributed.split(ids)  # a distributed run: this rank's windows; the sums are gathered below
    parts = []
    for i in tqdm(mine, desc="evaluate", disable=not (progress and distributed.is_writer()), leave=False):
        w = ids[i]
        x = w.unsqueeze(0).to(dev)
        logits = _logits(model, x)[0, :-1]
        target = x[0, 1:]
        logp = F.log_softmax(logits, dim=-1)
        row = [float(F.nll_loss(logp, target, reduction="sum")), 0.0, 0.0, target.numel()]
        if isinstance(reference, ReferenceLogits):
            ref_logp = reference.log_probs(i, w).to(logp.device)
        elif reference is not None:
            ref_logp = F.log_softmax(_logits(reference, x.to(model_device(reference)))[0, :-1].to(logp.device), dim=-1)
        if reference is not None:
            row[1] = float(F.kl_div(logp, ref_logp, log_target=True, reduction="sum"))
            row[2] = float((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        parts.append((i, row))
    nll = kl = agree = 0.0
    n = 0
    for a, b, c, d in distributed.sum_in_order(parts, "the evaluation sums"):  # window order, as one process
        nll, kl, agree, n = nll + a, kl + b, agree + c, n + d
    return EvalResult(
        perplexity=math.exp(nll / n),
        kl=kl / n if reference is not None else None,
        top1=agree / n if reference is not None else None,
        tokens=n,
        windows=ids.shape[0],
        seq_len=seq_len,
        seconds=time.perf_counter() - t0,
        size=model_size(model).to_dict(),
    )
