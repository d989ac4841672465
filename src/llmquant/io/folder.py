"""llmquant's folder format: ``model.safetensors`` + ``llmquant.json`` manifest + ``config.json`` + tokenizer.

The safetensors file holds every tensor exactly as stored in memory (packed codes, scales, zero points,
float weights); a weight shared by two modules (tied embeddings) is stored once and listed under
``aliases``. The manifest records the llmquant version, the base model, each quantized layer's scheme
and each tensor's shape, dtype and sha256, which ``load`` checks before building anything. Saving writes
to a temporary folder beside the target and renames it at the end, so an interrupted save never leaves a
folder that looks complete, and an existing folder is replaced only as a whole. Loading never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CorruptFileError, ModelNotFoundError, SchemeError
from .layout import attach_recipe, file_state, install_modules
from .manifest_schema import validate_manifest
from .shards import read_chunks, safetensors_slices

log = logging.getLogger(__name__)

MANIFEST = "llmquant.json"
WEIGHTS = "model.safetensors"
# 1: the first format; 2: config.json names llmquant as its quant_method (transformers' from_pretrained loads
# the folder through llmquant.io.hf_quantizer) and the folder carries a README.md model card. Both load.
FORMAT_VERSION = 2


def _file_sha256(sl) -> str:
    h = hashlib.sha256()
    for chunk in read_chunks(sl):
        h.update(chunk)
    return h.hexdigest()


def attach_saved(model: nn.Module, folder: str | os.PathLike) -> None:
    """Give ``model``'s tensors that are on the meta device (written out as the pipeline went) their
    memory-mapped copies from ``folder``, just saved from this model: the model runs again, with its
    weights paged in from disk as they are used."""
    p = Path(folder).expanduser()
    manifest = read_manifest(p)
    tensors = _read_tensors(p, manifest, verify=False)
    aliases = manifest.get("aliases", {})
    hollow = {n: tensors[aliases.get(n, n)] for n, t in model.state_dict(keep_vars=True).items()
              if t.is_meta and aliases.get(n, n) in tensors}
    model.load_state_dict(hollow, strict=False, assign=True)


def read_recipe(path: str | os.PathLike) -> dict:
    """The quantization recipe ``path`` holds, as a dict for ``llmquant.quantize``: a folder written by
    :func:`save` (its manifest's plan or config) or a JSON file (a QuantConfig or a plan)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SchemeError(f"{str(path)!r} is neither a preset nor an existing folder or JSON file; give a "
                          "folder written by llmquant, a QuantConfig or plan .json file, or a preset such as W4G64")
    if p.is_dir():
        if not (p / MANIFEST).is_file():
            raise SchemeError(f"{str(path)!r} holds no {MANIFEST}: it is not a folder written by llmquant")
        manifest = read_manifest(p)
        recipe = manifest.get("plan") or manifest.get("config")
        if not recipe:
            raise SchemeError(f"{path} records no quantization config to reproduce")
        return recipe
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SchemeError(f"{path} is not valid JSON: {e}") from None


def read_manifest(folder: str | os.PathLike) -> dict:
    p = Path(folder).expanduser()
    if not p.is_dir():
        raise ModelNotFoundError(f"{str(p)!r} is not a folder saved by llmquant")
    from .hf_quantizer import refuse_foreign

    refuse_foreign(p)
    m = p / MANIFEST
    if not m.is_file():
        raise ModelNotFoundError(f"{str(p)!r} has no {MANIFEST}: not a folder saved by llmquant")
    try:
        manifest = json.loads(m.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as e:
        raise CorruptFileError(f"{m} is not valid JSON ({e}); the save is damaged, quantize again") from None
    # fields, digest, and the layers and tensors against config.json: see manifest_schema
    return validate_manifest(manifest, str(m), model_config=_model_config(p))


def _model_config(p: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise CorruptFileError(f"{p / 'config.json'} cannot be read ({str(e).splitlines()[0]})") from None


def _weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: the shards its index names, or the one ``model.safetensors``."""
    from .shards import INDEX

    index = folder / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CorruptFileError(f"{index} is not a safetensors index ({e}); the save is damaged, quantize again") from None
        if any(not isinstance(n, str) or "/" in n or n.startswith(".") for n in names):
            raise CorruptFileError(f"{index} names files outside the folder")
        files = [folder / n for n in names]
    else:
        files = [folder / WEIGHTS]
    for f in files:
        if not f.is_file():
            raise CorruptFileError(f"{f} is missing; the save is incomplete, quantize again")
    return files


def _read_tensors(folder: Path, manifest: dict, verify: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, memory-mapped (pages are read when first used), checked against the
    manifest: names, shapes, dtypes and (``verify``) sha256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    where: dict = {}
    for f in _weight_files(folder):
        try:
            part = load_file(str(f))
            where.update(safetensors_slices(f))
        except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise CorruptFileError(f"{f} is truncated or corrupt ({str(e).splitlines()[0]}); quantize again") from None
        if set(part) & set(tensors):
            raise CorruptFileError(f"{f} repeats tensors of another shard: {sorted(set(part) & set(tensors))[:3]}")
        tensors.update(part)
    expected = manifest.get("tensors", {})
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise CorruptFileError(f"the weights in {folder} do not match {MANIFEST}: missing {missing[:3]}, "
                               f"unexpected {extra[:3]}")
    for k, meta in expected.items():
        t = tensors[k]
        if list(t.shape) != meta["shape"] or str(t.dtype).replace("torch.", "") != meta["dtype"]:
            raise CorruptFileError(
                f"tensor {k}: file has {list(t.shape)} {t.dtype}, manifest says {meta['shape']} {meta['dtype']}"
            )
        # hashed from the file with plain reads: the mapped tensor's pages stay unread until the model uses them
        if verify and _file_sha256(where[k]) != meta["sha256"]:
            raise CorruptFileError(f"tensor {k} fails its sha256 check: the file was modified or damaged")
    return tensors


def load(folder: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Rebuild a model saved by :func:`save`: ``(model, tokenizer)`` with bit-identical weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(folder).expanduser()
    manifest = read_manifest(p)
    tensors = _read_tensors(p, manifest)
    try:
        config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"{p / 'config.json'} cannot be read ({str(e).splitlines()[0]})") from None
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # no memory for weights: the files' tensors are assigned
        model = AutoModelForCausalLM.from_config(config)
    install_modules(model, manifest)
    state = file_state(p, manifest, tensors)
    # match float dtypes of the saved tensors (a bf16-saved model stays bf16)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CorruptFileError(f"saved tensors do not fit the model config: {str(e).splitlines()[0]}") from None
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in manifest.get("aliases", {}):
        model.tie_weights()
    attach_recipe(model, manifest)
    model.eval().to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
