"""``load_model``: one call for every source a model comes from (the default model, a Hugging Face folder,
a ``.gguf`` file, a folder llmquant saved), returning ``(model, tokenizer)`` with the tokenizer attached
to the model (``model.llmquant_tokenizer``) for the functions that take text."""

from __future__ import annotations

from pathlib import Path

import torch

from .folder import MANIFEST, load
from .gguf_import import load_gguf_packed
from .hf import load_float_model
from .hf_quantizer import bind_save_pretrained
from .streaming import INDEX, SINGLE, load_streaming
from ..errors import ModelNotFoundError, UnsupportedError


def load_saved(folder, *, device="cpu"):
    """``(model, tokenizer)`` from a folder written by :func:`llmquant.io.save`."""
    model, tok = load(folder, device=device)
    model.llmquant_tokenizer = tok
    bind_save_pretrained(model)
    return model, tok


def load_model(path=None, *, dtype=None, packed=False, stream=False, shard=False):
    """``(model, tokenizer)``: the default model when ``path`` is None, a local Hugging Face folder, a local
    ``.gguf`` file, or a folder saved by :func:`llmquant.io.save` (quantized). ``packed=True`` (GGUF only):
    the file's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 linears become packed QuantLinear modules holding its own codes.
    ``stream=True`` (a Hugging Face folder with safetensors, or a .gguf file, the default model's included):
    the decoder layers stay in the checkpoint until ``quantize`` reaches them (:mod:`llmquant.io.streaming`).
    ``shard=True`` (the same sources as ``stream``): no weight is read; every parameter stays on the meta
    device until :func:`llmquant.train_qat` with ``shard=True``, in a distributed run, shards the model and
    each rank reads only its own rows of each tensor (``load_streaming(empty=True)``)."""
    if shard:
        if packed or stream:
            raise ModelNotFoundError("shard=True leaves every weight in the file for a sharded QAT run; it goes "
                                     "with neither packed=True nor stream=True")
        _check_shardable(path)
        return load_streaming(path, dtype=dtype or torch.float32, empty=True)
    if stream:
        if packed:
            raise ModelNotFoundError("stream=True reads float weights layer by layer; packed=True keeps a GGUF "
                                     "file's codes: choose one")
        return load_streaming(path, dtype=dtype or torch.float32)
    if packed:
        model, tok, _ = load_gguf_packed(path, dtype=dtype or torch.float32)
        model.llmquant_tokenizer = tok
        bind_save_pretrained(model)
        return model, tok
    if path is not None and (Path(path).expanduser() / MANIFEST).is_file():
        return load_saved(path)
    model, tok, source = load_float_model(path, dtype=dtype or torch.float32)
    model.llmquant_tokenizer = tok
    model.llmquant_source = source
    bind_save_pretrained(model)
    return model, tok


def _check_shardable(path) -> None:
    """Refuse, with :class:`UnsupportedError`, a source whose tensors' rows cannot be read apart: a folder
    saved by llmquant (packed codes), a folder without safetensors weights."""
    if path is None:
        return
    p = Path(path).expanduser()
    if not p.is_dir():
        return  # a .gguf file (read one tensor at a time), or a path the loader names as missing
    if (p / MANIFEST).is_file():
        raise UnsupportedError(f"{str(p)!r} was saved by llmquant (quantized): its packed weights cannot be loaded "
                               "sharded; load it whole (without shard=True)")
    if not ((p / SINGLE).is_file() or (p / INDEX).is_file()):
        raise UnsupportedError(f"{str(p)!r} holds no {SINGLE} (nor {INDEX}): only safetensors folders and .gguf files "
                               "load sharded; load it whole (without shard=True), or save it as safetensors")
