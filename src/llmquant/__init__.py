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
from .eval import EvalResult, evaluate, model_size
from . import io as _io
from .runtime import generate

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


__all__ = [
    "__version__",
    "EvalResult",
    "LLMQuantError",
    "PRESETS",
    "QuantConfig",
    "QuantLinear",
    "QuantScheme",
    "QuantSummary",
    "evaluate",
    "generate",
    "load",
    "load_model",
    "model_size",
    "quantize",
    "save",
]
