"""llmquant: make LLMs smaller and faster by lowering the precision of their weights and activations.

    import llmquant
    model, tok = llmquant.load_model()                 # SmolLM2-135M-Instruct, no network
    ref, _ = llmquant.load_model()
    summary = llmquant.quantize(model, "W4G64")         # RTN, int4 in groups of 64, packed
    print(llmquant.evaluate(model, reference=ref))      # perplexity, KL, top-1, size
    llmquant.save(model, tok, "out/w4g64")
    model, tok = llmquant.load("out/w4g64")
"""

from __future__ import annotations

__version__ = "0.1.0"

import logging as _logging

from .errors import LLMQuantError
from .schemes import PRESETS, QuantConfig, QuantScheme
from .modules import QuantLinear
from .flows import QuantSummary, quantize
from .flows import convert, prepare
from . import flows as _flows
from .flows.calibrate import _check_config as _check_calibration_config
from .eval import EvalResult, evaluate, model_size
from . import io as _io

_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def load_model(path=None, *, dtype=None):
    """``(model, tokenizer)``: the default SmolLM2 model when ``path`` is None, a local Hugging Face folder,
    a local ``.gguf`` file, or a folder saved by :func:`save` (quantized)."""
    import torch
    from pathlib import Path

    if path is not None and (Path(path).expanduser() / _io.folder.MANIFEST).is_file():
        return load(path)
    model, tok, source = _io.load_float_model(path, dtype=dtype or torch.float32)
    model.llmquant_tokenizer = tok
    model.llmquant_source = source
    return model, tok


def load(folder, *, device="cpu"):
    """``(model, tokenizer)`` from a folder written by :func:`save`; logits are bit-identical to the saved model's."""
    model, tok = _io.load(folder, device=device)
    model.llmquant_tokenizer = tok
    return model, tok


def save(model, tokenizer, folder, *, overwrite=False):
    """Write ``model`` (packed) and ``tokenizer`` to ``folder`` atomically; see :mod:`llmquant.io.folder`."""
    return _io.save(model, tokenizer, folder, overwrite=overwrite)


def _calib_windows(model, tokenizer, text, samples, seq_len, windows):
    from .models import context_length

    if windows is not None:
        return windows
    tok = tokenizer or getattr(model, "llmquant_tokenizer", None)
    return _io.calibration_windows(tok, text, samples, seq_len, context=context_length(model))


def calibrate(model, tokenizer=None, text=None, *, samples=64, seq_len=512, windows=None, batch_size=1, progress=True):
    """Run calibration text through a prepared model: ``samples`` windows of ``seq_len`` tokens from the end
    of ``text`` (None: the default text; a Path: a file; a str: the text), disjoint from evaluation windows;
    or the given token ``windows``. Returns the number of tokens seen."""
    wins = _calib_windows(model, tokenizer, text, samples, seq_len, windows)
    return _flows.calibrate(model, wins, batch_size=batch_size, progress=progress)


def quantize_static(model, config, tokenizer=None, text=None, *, samples=64, seq_len=512, windows=None, arch=None,
                    progress=True):
    """Calibrated quantization in place (SmoothQuant when ``config.smooth_alpha`` is set, then static scales);
    the config and the text are checked before the first pass. See :mod:`llmquant.flows.calibrate`."""
    from .schemes import resolve_config

    config = resolve_config(config)
    _check_calibration_config(config)
    wins = _calib_windows(model, tokenizer, text, samples, seq_len, windows)
    return _flows.quantize_static(model, config, wins, arch=arch, progress=progress)


__all__ = [
    "__version__",
    "EvalResult",
    "LLMQuantError",
    "PRESETS",
    "QuantConfig",
    "QuantLinear",
    "QuantScheme",
    "QuantSummary",
    "calibrate",
    "convert",
    "prepare",
    "quantize_static",
    "evaluate",
    "load",
    "load_model",
    "model_size",
    "quantize",
    "save",
]
