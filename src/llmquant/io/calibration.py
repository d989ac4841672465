"""Calibration token windows: from the end of the default text, or from a user's .txt / .jsonl file."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CalibrationError, TextError
from .text import calib_windows, read_text, tokenize


def calibration_windows(
    tokenizer, source: str | Path | None = None, samples: int = 64, seq_len: int = 512, max_len: int | None = None
) -> torch.Tensor:
    """``(samples, seq_len)`` token ids for calibration.

    ``source`` None (or ``"default"``): the default text, windows from its end backwards, disjoint from the
    evaluation windows at its start. A path: that .txt / .jsonl file, windows from its end backwards.
    ``max_len``: the model's context; longer windows are refused.
    """
    if max_len is not None and seq_len > max_len:
        raise CalibrationError(f"calibration windows of {seq_len} tokens are longer than the model's context "
                               f"({max_len}); pass a smaller --seq-len")
    if tokenizer is None:
        raise CalibrationError("a tokenizer is needed to calibrate on text: pass tokenizer=, or token ids as calib=")
    default = source is None or str(source) == "default"
    raw = read_text(None if default else Path(source))
    ids = tokenize(tokenizer, raw)
    if ids.numel() < seq_len:
        raise TextError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
                        "give more text or a smaller --seq-len")
    if default:
        return calib_windows(ids, samples, seq_len)
    avail = ids.numel() // seq_len
    if samples > avail:
        raise TextError(f"the calibration text holds {avail} windows of {seq_len} tokens, {samples} asked; "
                        "give more text or pass fewer --calib-samples / a smaller --seq-len")
    end = ids.numel()
    return torch.stack([ids[end - (i + 1) * seq_len : end - i * seq_len] for i in range(samples)])
