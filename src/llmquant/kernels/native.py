"""Build and load llmquant's compiled CPU kernels (``csrc/qgemm_avx2.cpp``, ``csrc/qgemm_q8act.cpp``), the
lean runtime's compiled decode step (``csrc/decode_step.cpp``) and GPTQ's column loop (``csrc/gptq_loop.cpp``)
on first use.

The extension (one module from the files in ``csrc``) is compiled from source with the system C++ compiler through
``torch.utils.cpp_extension.load`` (``-O3 -mavx2 -mfma``; the AVX512-VNNI functions of ``qgemm_q8act.cpp``
are compiled for that target alone and called only where the CPU has it) and cached under
``$LLMQUANT_CACHE/ext`` (default ``~/.cache/llmquant/ext``), keyed by the torch and Python versions and a hash
of the sources and of the torch installation, so a later process loads it in well under a second. The first
build takes about a minute and a half on 2 cores.

Nothing here is required: when the CPU lacks AVX2/FMA, no compiler (or ninja) is found, the build fails,
or ``LLMQUANT_NATIVE=0`` is set, :func:`load` returns None once (with a warning saying why) and the kernel
registry falls back to the pure-PyTorch kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

from ..resources import cache_dir

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
#: The compiled sources; the headers and ``.inc`` files they include are copied and hashed with them.
SOURCES = [CSRC / "qgemm_avx2.cpp", CSRC / "qgemm_q8act.cpp", CSRC / "decode_step.cpp", CSRC / "gptq_loop.cpp"]
_lock = threading.Lock()
_state: dict = {}


def cpu_has_avx2() -> bool:
    try:
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    except Exception:  # pragma: no cover
        return False


def build_dir() -> Path:
    base = cache_dir()
    # Keyed by the source and by the torch installation (its headers' path goes into the build file): two
    # checkouts or venvs sharing the cache would otherwise make torch's builder recompile on every switch.
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in _files()) + str(Path(torch.__file__).parent).encode()).hexdigest()[:12]
    tv = torch.__version__.replace("+", "_")
    return base / "ext" / f"qgemm-torch{tv}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"


def _files() -> list[Path]:
    """Every file of the extension: the sources and what they include."""
    return sorted(set(SOURCES) | set(CSRC.glob("*.h")) | set(CSRC.glob("*.inc")))


def _ninja_on_path() -> bool:
    """torch's extension builder runs ``ninja``; a venv's ninja (pip install ninja) is found even when the
    venv is not activated."""
    if shutil.which("ninja"):
        return True
    venv_bin = str(Path(sys.executable).parent)
    if (Path(venv_bin) / "ninja").exists():
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
        return True
    return False


def why_unavailable() -> str | None:
    """None when the extension can be used; otherwise the reason, in words."""
    load()
    return _state.get("reason")


def load():
    """The compiled module (functions ``qgemm``, ``dequant``, ``q8gemm``, ``q8_quantize``, ``q8_best_isa``,
    ``gptq_columns``, ``range_search``; classes ``LinearSpec`` and ``DecodeStep``), or None when it cannot be had."""
    if "module" in _state:
        return _state["module"]
    with _lock:
        if "module" in _state:
            return _state["module"]
        mod, reason = None, None
        if os.environ.get("LLMQUANT_NATIVE", "1") == "0":
            reason = "disabled by LLMQUANT_NATIVE=0"
        elif not cpu_has_avx2():
            reason = "this CPU has no AVX2/FMA"
        elif shutil.which(os.environ.get("CXX", "c++")) is None:
            reason = "no C++ compiler found (install g++)"
        elif not _ninja_on_path():
            reason = "ninja not found (pip install ninja)"
        else:
            try:
                from torch.utils import cpp_extension

                d = build_dir()
                d.mkdir(parents=True, exist_ok=True)
                if not (d / "qgemm_avx2.so").exists() and not list(d.glob("*.so")):
                    log.warning("building llmquant's AVX2 kernels (once, about a minute; cached in %s)", d)
                for f in _files():  # compiled from a copy in the cache: a path that does not move with the checkout
                    dst = d / f.name
                    if not dst.exists() or dst.read_bytes() != f.read_bytes():
                        shutil.copyfile(f, dst)
                mod = cpp_extension.load(
                    name="llmquant_qgemm_avx2",
                    sources=[str(d / f.name) for f in SOURCES],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    build_directory=str(d),
                    verbose=False,
                )
            except Exception as e:  # compiler errors, missing ninja, read-only cache...
                reason = f"building the AVX2 extension failed: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}"
        if reason:
            log.warning("native kernels unavailable (%s); using the PyTorch kernels", reason)
        _state["module"], _state["reason"] = mod, reason
        return mod


__all__ = ["build_dir", "cpu_has_avx2", "load", "why_unavailable"]
