"""What the process uses besides its tensors: peak resident memory (one meter for every figure llmquant
reports) and the cache folder. A bottom module: imports nothing from llmquant.

Peak memory on Linux is the kernel's own high-water mark of resident memory (``VmHWM``), reset on entry to
a :class:`PeakMemory` block (``/proc/self/clear_refs``) and read on exit: exact, with no sampling thread.
Blocks nest: before a block resets the mark, the peak so far is folded into every block already running
(and into the process's lifetime peak, :func:`peak_rss_mb`). Elsewhere the figure is the process's
lifetime peak (``getrusage``). MB are decimal (1e6 bytes), as llmquant quotes sizes.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from pathlib import Path

_ACTIVE: list["PeakMemory"] = []
_lifetime = 0  # bytes: the highest mark seen before any reset


def cache_dir() -> Path:
    """Where llmquant keeps converted models, compiled kernels and measurements: ``$LLMQUANT_CACHE`` or
    ``~/.cache/llmquant``."""
    return Path(os.environ.get("LLMQUANT_CACHE", Path.home() / ".cache" / "llmquant")).expanduser()


def rss_bytes() -> int:
    """This process's resident memory now (Linux), else 0."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def memory_limit_bytes() -> int:
    """The most memory this process may use: the machine's physical memory, or its memory cgroup's limit
    where that is lower (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``); 0 where unknown."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        total = 0
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = Path(f).read_text().strip()
        except OSError:
            continue
        if v.isdigit() and 0 < int(v) < (total or 1 << 62):
            total = int(v)
    return total


def _mark_bytes() -> int:
    """Peak resident memory since the last reset (Linux VmHWM), else the process's lifetime peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _fold() -> int:
    """Carry the current mark into the lifetime peak and every running meter; returns it."""
    global _lifetime
    mark = _mark_bytes()
    _lifetime = max(_lifetime, mark)
    for m in _ACTIVE:
        m.peak = max(m.peak, mark)
    return mark


def _reset_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    _fold()
    return _lifetime / 1e6


class PeakMemory:
    """``with PeakMemory() as mem: ...`` then ``mem.peak_mb`` (the peak resident memory while the block
    ran) and ``mem.delta_mb`` (that peak above the memory at entry)."""

    def __init__(self) -> None:
        self.start = self.peak = 0

    def __enter__(self) -> "PeakMemory":
        _fold()
        self.start = rss_bytes()
        self.exact = _reset_mark()  # False: the peak is the process's lifetime peak
        self.peak = self.start if self.exact else _mark_bytes()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _fold()
        _ACTIVE.remove(self)

    @property
    def peak_mb(self) -> float:
        return self.peak / 1e6

    @property
    def delta_mb(self) -> float:
        return max(self.peak - self.start, 0) / 1e6


def trim_memory() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``; nothing elsewhere). Layer after
    layer of freed float weights otherwise stays resident as free heap space in the allocator. Inside
    :func:`trims_deferred` it waits for the end of the block."""
    global _LIBC
    if _DEFER:
        _DEFER[-1] = True
        return
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None
_DEFER: list[bool] = []


@contextlib.contextmanager
def trims_deferred():
    """Calls of :func:`trim_memory` inside wait until the block ends, then one trim runs (if any was asked):
    for work whose allocations are made again at once (a one-pass layer's batches resume after each linear's
    quantizer; trimming between them costs about an eighth of the pass in page faults)."""
    _DEFER.append(False)
    try:
        yield
    finally:
        asked = _DEFER.pop()
        if asked:
            trim_memory()
