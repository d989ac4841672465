"""Argument types that refuse out-of-range values when the command line is parsed (before any model is
loaded), and a parser whose errors are one line (:class:`UsageError`, printed by ``main``)."""

from __future__ import annotations

import argparse
import math

from ..errors import UsageError

MAX_THREADS = 1024
MAX_SEED = 2**63 - 1


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises :class:`UsageError` (one line, exit 2 from ``main``) instead of
    printing the usage block and exiting."""

    def error(self, message: str):  # noqa: D401  (argparse's hook)
        cmd = self.prog.split(" ", 1)[1] if " " in self.prog else self.prog
        raise UsageError(f"{cmd}: {message} (see {self.prog} --help)")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def int_range(lo: int, hi: int | None = None, what: str = "an integer"):
    """An argparse type: an integer in [lo, hi] (no upper bound when hi is None)."""
    def parse(text: str) -> int:
        v = _int(text)
        if v < lo or (hi is not None and v > hi):
            bound = f">= {lo}" if hi is None else f"from {lo} to {hi}"
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {v}")
        return v
    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


def float_range(lo: float, hi: float | None = None, *, lo_open: bool = False, what: str = "a number"):
    """An argparse type: a finite number >= lo (> lo with ``lo_open``) and <= hi."""
    def parse(text: str) -> float:
        v = _float(text)
        if v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            left = ">" if lo_open else ">="
            bound = f"{left} {lo:g}" if hi is None else f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise argparse.ArgumentTypeError(f"must be {what} {bound}, got {text}")
        return v
    parse.__name__ = "number"
    return parse


def nonempty(what: str):
    """An argparse type: a string that is not empty (or only spaces)."""
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{what} is empty; give some text")
        return text
    parse.__name__ = "text"
    return parse


positive_int = int_range(1)
count = int_range(0)
seq_len = int_range(2, what="a token count")
threads = int_range(1, MAX_THREADS, what="a thread count")
seed = int_range(0, MAX_SEED, what="a seed")
positive_float = float_range(0.0, lo_open=True)
