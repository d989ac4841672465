"""Checks on where llmquant is asked to write, made before any work: a quantization that runs for an hour and
then cannot save is the failure this module exists to prevent.

``check_output_location(path, overwrite, kind=...)`` refuses, with a message saying what to do:
an existing non-empty folder (or file) without ``overwrite``; a regular file where a folder is to be
written, or a folder where a file is to be written (``overwrite`` never turns one into the other);
a path below an existing file; and a location that cannot be written (permissions, a read-only file
system), found by creating and removing a probe directory where the output's first missing part would go.
Nothing is left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import OutputExistsError, OutputLocationError

KINDS = ("folder", "file")


def _nearest_existing(p: Path) -> Path:
    """``p`` itself or its closest ancestor that exists (the root always does)."""
    while not os.path.lexists(p):
        parent = p.parent
        if parent == p:
            break
        p = parent
    return p


def check_output_location(path: str | os.PathLike, overwrite: bool = False, *, kind: str = "folder") -> Path:
    """Refuse an output ``path`` that the writers (:func:`llmquant.save`, the exporters, plan files) would
    fail on, before any work is done; returns the path (``~`` expanded). ``kind`` is what will be written
    there: ``"folder"`` (a saved model, a compressed-tensors export, a report) or ``"file"`` (a GGUF file,
    a plan or JSON file). Writers replace their output atomically, so the probe is made in the folder that
    will hold the output."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if path is None or not str(path).strip():
        raise OutputLocationError("the output path is empty; give a path to write to with -o")
    p = Path(path).expanduser()
    what = "folder" if kind == "folder" else "file"
    if os.path.lexists(p):
        if kind == "folder" and not p.is_dir():
            raise OutputLocationError(
                f"{str(path)!r} is an existing file, and llmquant writes a folder there; choose another -o "
                "(--overwrite replaces a folder, never a file)")
        if kind == "file" and p.is_dir():
            raise OutputLocationError(
                f"{str(path)!r} is an existing folder, and llmquant writes a file there; give a file path with -o "
                "(--overwrite replaces a file, never a folder)")
        if not overwrite and (kind == "file" or any(p.iterdir())):
            raise OutputExistsError(f"{str(path)!r} exists{' and is not empty' if kind == 'folder' else ''}; "
                                    "choose another -o or pass --overwrite")
    parent = p.parent
    base = _nearest_existing(parent)
    if not base.is_dir():
        raise OutputLocationError(
            f"cannot write the output {what} {str(path)!r}: {str(base)!r} is a file, so nothing can be created "
            "below it; choose another -o")
    try:
        probe = tempfile.mkdtemp(prefix=".llmquant-probe-", dir=base)
    except OSError as e:
        raise OutputLocationError(
            f"cannot write the output {what} {str(path)!r}: {str(base)!r} is not writable ({e.strerror or e}); "
            "choose an -o on a writable location") from None
    shutil.rmtree(probe, ignore_errors=True)
    return p
