"""Perplexity, KL divergence from the unquantized model, and top-1 agreement, on fixed token windows.

KL is the mean over predicted positions of KL(p_ref || p_model) of the next-token distributions; top-1
agreement the share of positions where both models' most likely next token is the same.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import TextError
from ..io.text import DEFAULT_SEQ_LEN, eval_windows, read_text, tokenize
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


def token_windows(tokenizer, text: str | Path | None, windows: int, seq_len: int) -> torch.Tensor:
    """The evaluation windows of the default text (None), a text file (Path) or a string of text."""
    if tokenizer is None:
        raise TextError("a tokenizer is needed to evaluate on text: pass tokenizer=, or load the model with llmquant")
    raw = read_text(text) if (text is None or isinstance(text, Path)) else text
    if not raw.strip():
        raise TextError("the evaluation text is empty")
    return eval_windows(tokenize(tokenizer, raw), windows, seq_len)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float()


def _device(model: nn.Module) -> torch.device:
    for p in list(model.parameters()) + list(model.buffers()):
        return p.device
    return torch.device("cpu")


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    reference: nn.Module | None = None,
    text: str | Path | None = None,
    *,
    tokenizer=None,
    windows: int = 8,
    seq_len: int = DEFAULT_SEQ_LEN,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` (and compare with ``reference``, the unquantized model, when given).

    ``text``: None for the default text, a ``Path`` to a .txt/.jsonl file, or a string of text.
    """
    tokenizer = tokenizer or getattr(model, "llmquant_tokenizer", None)
    ids = token_windows(tokenizer, text, windows, seq_len)
    dev = _device(model)
    nll = kl = agree = 0.0
    n = 0
    t0 = time.perf_counter()
    for w in tqdm(ids, desc="evaluate", disable=not progress, leave=False):
        x = w.unsqueeze(0).to(dev)
        logits = _logits(model, x)[0, :-1]
        target = x[0, 1:]
        logp = F.log_softmax(logits, dim=-1)
        nll += float(F.nll_loss(logp, target, reduction="sum"))
        if reference is not None:
            ref_logp = F.log_softmax(_logits(reference, x.to(_device(reference)))[0, :-1].to(logp.device), dim=-1)
            kl += float(F.kl_div(logp, ref_logp, log_target=True, reduction="sum"))
            agree += float((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        n += target.numel()
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
