"""The text protocol shared by evaluation, calibration, QAT and sensitivity: the default text, users' text
files, tokenization, and the one function that cuts token windows (:func:`windows`). Below ``flows`` in the
layering; imports nothing from llmquant but ``errors``."""

from .text import (DEFAULT_SEQ_LEN, EVAL_RESERVED_WINDOWS, calibration_windows, default_text, read_text, resolve_text,
                   text_ids, token_windows, tokenize, windows)

__all__ = [
    "DEFAULT_SEQ_LEN",
    "EVAL_RESERVED_WINDOWS",
    "calibration_windows",
    "default_text",
    "read_text",
    "resolve_text",
    "text_ids",
    "token_windows",
    "tokenize",
    "windows",
]
