"""The text protocol: the default text, users' text files, and the token windows made from them.

Default text: CPython's ``pydoc_data.topics``, joined as ``"\\n\\n".join(topics[k] for k in sorted(topics))``.
:func:`windows` is the one place token windows are cut: evaluation windows are the first ``n``
non-overlapping windows from the start; calibration / training windows are taken from the end of the text
backwards and never overlap the first ``EVAL_RESERVED_WINDOWS`` evaluation windows (the "full" protocol),
so calibration never sees evaluation text.
User text: ``.txt`` files, or ``.jsonl`` files with a ``text`` field per line.
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import CalibrationError, TextError

EVAL_RESERVED_WINDOWS = 40  # the "full" evaluation protocol: 40 x 512 tokens from the start
DEFAULT_SEQ_LEN = 512
SPLITS = ("eval", "calib")
# what a text is for -> (the verb in "a tokenizer is needed to ... on text", the noun in "the ... text is empty")
_PURPOSES = {"eval": ("evaluate", "evaluation"), "calib": ("calibrate", "calibration"), "train": ("train", "training")}


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(path: str | Path | None) -> str:
    """The default text (None) or a user's .txt / .jsonl file."""
    if path is None:
        return default_text()
    p = Path(path).expanduser()
    if not p.is_file():
        raise TextError(f"text file {str(p)!r} does not exist")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TextError(f"text file {str(p)!r} is not UTF-8 text") from None
    if p.suffix == ".jsonl":
        parts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TextError(f"{p.name} line {i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise TextError(f'{p.name} line {i}: expected an object with a string "text" field')
            parts.append(obj["text"])
        raw = "\n\n".join(parts)
    if not raw.strip():
        raise TextError(f"text file {str(p)!r} is empty; give a file with text to evaluate or calibrate on")
    return raw


def resolve_text(text: "str | Path | None") -> str:
    """None: the default text; a ``Path``: a .txt/.jsonl file; a ``str``: the text itself."""
    return read_text(text) if (text is None or isinstance(text, Path)) else text


@lru_cache(maxsize=8)
def _tokenize_cached(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids of ``text`` (cached per tokenizer and text)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sequence length is longer than the model maximum": we window it
        return _tokenize_cached(tokenizer, text)


def text_ids(tokenizer, text: "str | Path | None", purpose: str = "eval") -> torch.Tensor:
    """1-D token ids of ``text`` (see :func:`resolve_text`); ``purpose`` (eval, calib, train) words the errors."""
    verb, noun = _PURPOSES[purpose]
    if tokenizer is None:
        raise TextError(f"a tokenizer is needed to {verb} on text: pass tokenizer=, or load the model with llmquant")
    raw = resolve_text(text)
    if not raw.strip():
        raise TextError(f"the {noun} text is empty; give text representative of the model's use")
    return tokenize(tokenizer, raw)


def windows(ids: torch.Tensor, n: int, seq_len: int = DEFAULT_SEQ_LEN, *, split: str = "eval",
            at_most: bool = False) -> torch.Tensor:
    """``n`` non-overlapping windows (n, seq_len) of the 1-D token ids ``ids``.

    ``split="eval"``: the first ``n`` windows from the start (fewer if the text is short, at least one).
    ``split="calib"``: ``n`` windows from the end backwards (the last window first), never overlapping the
    reserved evaluation range (the first ``EVAL_RESERVED_WINDOWS`` windows, or half the text when it is
    short); fewer than ``n`` is an error, unless ``at_most`` (then as many as there is room for).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    total = ids.numel()
    if total < seq_len:
        raise TextError(f"the text has {total} tokens, fewer than one window of {seq_len}; give more text"
                        + ("" if split == "eval" else " or a smaller seq_len"))
    if split == "eval":
        n = min(n, total // seq_len)
        return ids[: n * seq_len].reshape(n, seq_len)
    reserved = min(EVAL_RESERVED_WINDOWS, total // seq_len // 2) * seq_len
    avail = (total - reserved) // seq_len
    if at_most:
        n = min(n, avail)
    if avail < n:
        raise TextError(
            f"the text holds room for {avail} calibration windows of {seq_len} tokens after the evaluation "
            f"range, {n} asked; give more text or fewer/shorter windows"
        )
    return torch.stack([ids[total - (i + 1) * seq_len : total - i * seq_len] for i in range(n)])


def token_windows(tokenizer, text: "str | Path | None", n: int, seq_len: int = DEFAULT_SEQ_LEN, *,
                  split: str = "eval", purpose: str | None = None, at_most: bool = False) -> torch.Tensor:
    """:func:`windows` of ``text`` (None: the default text; a Path: a .txt/.jsonl file; a str: the text)."""
    return windows(text_ids(tokenizer, text, purpose or split), n, seq_len, split=split, at_most=at_most)


def calibration_windows(tokenizer, text: "str | Path | None" = None, samples: int = 64, seq_len: int = DEFAULT_SEQ_LEN,
                        context: int | None = None) -> torch.Tensor:
    """(samples, seq_len) token ids from the end of ``text``, the arguments checked against the model's
    ``context`` and the text's length."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise CalibrationError(f"the number of calibration samples must be a positive integer, got {samples!r}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise CalibrationError(f"the calibration sequence length must be an integer >= 2, got {seq_len!r}")
    if context is not None and seq_len > context:
        raise CalibrationError(f"seq_len {seq_len} is longer than the model's context ({context} tokens); use at most {context}")
    return token_windows(tokenizer, text, samples, seq_len, split="calib")
