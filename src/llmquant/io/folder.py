"""llmquant's folder format: ``model.safetensors`` + ``llmquant.json`` manifest + ``config.json`` + tokenizer.

The safetensors file holds every tensor exactly as stored in memory (packed codes, scales, zero points,
float weights); a weight shared by two modules (tied embeddings) is stored once and listed under
``aliases``. The manifest records the llmquant version, the base model, each quantized layer's scheme
and each tensor's shape, dtype and sha256, which ``load`` checks before building anything. Saving writes
to a temporary folder beside the target and renames it at the end, so an interrupted save never leaves a
folder that looks complete, and an existing folder is replaced only as a whole. Loading never unpickles.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..version import __version__
from ..errors import (CorruptFileError, ModelNotFoundError, OutputExistsError, OutputLocationError, SchemeError,
                      UnsupportedError)
from ..modules import MANIFEST_MODULES, QuantLinear
from .layout import attach_recipe, file_state, install_modules
from .manifest_schema import manifest_digest, validate_manifest
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


def _tensors_and_aliases(module: nn.Module, prefix: str = "", skip=()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``module``'s tensors by full name (``prefix`` + its own name), a tensor shared by two names stored once
    (the second listed as an alias of the first); names in ``skip`` are left out."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in module.state_dict(keep_vars=False).items():
        name = f"{prefix}.{name}" if prefix else name
        if name in skip:
            continue
        if t.is_meta:
            raise UnsupportedError(f"tensor {name} has no data (meta device): it was never loaded or was already written")
        key = (t.data_ptr(), tuple(t.shape), t.dtype, tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach()
    return tensors, aliases


def _quant_layers(model: nn.Module) -> dict[str, dict]:
    return {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "bias_dtype": str(m.bias.dtype).replace("torch.", "") if m.bias is not None else None,
            "scheme": m.scheme.to_dict(),
            "activation": None if m.activation_scheme is None else m.activation_scheme.to_dict(),
        }
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }


class OutputFolder:
    """A save in progress: a temporary folder beside ``folder`` holding a lock on the output. The
    layer-by-layer pipeline writes each finished decoder layer into it (``layer_done``, a pipeline hook:
    the layer's tensors go to disk and, with ``drop``, leave memory); :meth:`finish` writes the rest and
    puts the folder in place in one step. A failure or a kill leaves any previous output as it was."""

    def __init__(self, folder: str | os.PathLike, *, overwrite: bool = False, shard_size=None,
                 drop_written: bool = True) -> None:
        from .shards import OutputLock, ShardWriter, parse_size

        out = Path(folder).expanduser()
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"{str(out)!r} is a file, not a folder; choose another output folder")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise OutputExistsError(f"{str(out)!r} exists and is not empty; choose another folder or pass overwrite")
        self.out, self.drop_written = out, drop_written
        shard_bytes = parse_size(shard_size, "shard size")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.lock = OutputLock(out)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # the finished folder gets a folder's usual mode, not mkdtemp's 0700
        except OSError as e:
            raise OutputExistsError(f"cannot write to {str(out)!r}: {e.strerror or e}") from None
        self.writer = ShardWriter(self.tmp, shard_bytes)
        self.aliases: dict[str, str] = {}
        self.done = False

    def write_module(self, prefix: str, module: nn.Module, drop: bool | None = None) -> None:
        """Write ``module``'s tensors now (named ``prefix.<name>``); with ``drop`` its tensors then move to
        the meta device so their memory is freed."""
        tensors, aliases = _tensors_and_aliases(module, prefix)
        with self._disk_errors():
            for name, t in tensors.items():
                self.writer.add(name, t)
        self.aliases.update(aliases)
        del tensors
        if self.drop_written if drop is None else drop:
            module.to("meta")

    @contextlib.contextmanager
    def _disk_errors(self):
        """A full disk while writing: one clean error, the partial shards removed at once."""
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.abort()
            raise OutputLocationError(f"the disk holding {str(self.out)!r} is full ({e.strerror or e}); free space "
                                      "or choose another output folder (any previous output there is untouched)") from None

    def layer_done(self, index: int, prefix: str, layer: nn.Module, summary=None) -> None:
        self.write_module(prefix, layer)

    def finish(self, model: nn.Module, tokenizer, *, base_model: str | None = None) -> Path:
        """Write what is not written yet, the manifest, config and tokenizer; put the folder in place."""
        try:
            with self._disk_errors():
                self._complete(model, tokenizer, base_model)
        except BaseException:
            self.abort()
            raise
        self.lock.release()
        log.info("saved %s", self.out)
        return self.out

    def _complete(self, model: nn.Module, tokenizer, base_model: str | None) -> None:
        passthrough = getattr(model, "llmquant_passthrough", None) or {}
        tensors, aliases = _tensors_and_aliases(model, skip=set(self.writer.entries) | set(self.aliases))
        for name, t in tensors.items():
            src = passthrough.get(name)
            self.writer.add(name, src[0] if src is not None and src[1] == t.data_ptr() else t)
        del tensors
        self.aliases.update(aliases)
        entries = self.writer.close()
        _write_side_files(model, tokenizer, self.tmp)
        qcfg = getattr(model, "llmquant_config", None)
        cfg = getattr(model, "config", None)
        manifest = {
            "format": "llmquant",
            "format_version": FORMAT_VERSION,
            "llmquant_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base_model": base_model or getattr(model, "llmquant_source", None),
            "model_class": type(model).__name__,
            "model_type": getattr(cfg, "model_type", None),
            "config": None if qcfg is None else qcfg.to_dict(),
            "quantized_layers": _quant_layers(model),
            "mixed_modules": {n: m.manifest_entry() for n, m in model.named_modules()
                              if type(m).__name__ in MANIFEST_MODULES},
            "plan": None if getattr(model, "llmquant_plan", None) is None else model.llmquant_plan.to_ordered_dict(),
            "aliases": dict(sorted(self.aliases.items())),
            "tensors": dict(sorted(entries.items())),
        }
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        from .model_card import write_model_card

        write_model_card(self.tmp, manifest, self.out.name)
        from .shards import swap_in

        swap_in(self.tmp, self.out)
        self.done = True

    def abort(self) -> None:
        """Remove the temporary folder; the previous output (if any) is untouched."""
        if not self.done:
            self.writer.abort()
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.done = True
        self.lock.release()

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.done:
            self.abort()


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


def _write_side_files(model: nn.Module, tokenizer, folder: Path) -> None:
    cfg = getattr(model, "config", None)
    if cfg is not None:  # naming llmquant as the quant_method: transformers' from_pretrained loads the folder
        from .hf_quantizer import config_entry

        cfg.to_json_file(str(folder / "config.json"))
        d = json.loads((folder / "config.json").read_text())
        d["quantization_config"] = config_entry()
        (folder / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(folder))
        except Exception as e:  # a generation config that does not validate is not worth failing a save
            log.warning("generation config not saved: %s", e)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def _check_saveable(model: nn.Module) -> None:
    foreign = [n for n, m in model.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
    if foreign:
        raise UnsupportedError(
            f"cannot save {foreign[:3]}: PyTorch's dynamically quantized LSTM/GRU modules have no place in "
            "llmquant's folder format; save the float model and run quantize_dynamic again after loading it"
        )


def save(model: nn.Module, tokenizer, folder: str | os.PathLike, *, overwrite: bool = False,
         base_model: str | None = None, shard_size=None) -> Path:
    """Save a (quantized or float) model with its tokenizer to ``folder``; returns the folder.
    ``shard_size`` (bytes, or a string such as ``"2GB"``): the most each safetensors shard holds."""
    _check_saveable(model)
    with OutputFolder(folder, overwrite=overwrite, shard_size=shard_size) as out:
        return out.finish(model, tokenizer, base_model=base_model)


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
