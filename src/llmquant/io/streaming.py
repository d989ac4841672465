"""Streaming load: a model whose decoder layers are read from a safetensors checkpoint one at a time.

``load_streaming(folder)`` builds the model's skeleton without weights (meta device, accelerate's
``init_empty_weights``), reads the tensors outside the decoder layers (embeddings, final norm, output
head) at once, and attaches a :class:`SafetensorsLayerSource` as ``model.llmquant_layer_source``. The
layer-by-layer pipeline (:mod:`llmquant.flows.pipeline`) calls its ``load(i)`` just before it works on
layer i, so the float model is never whole in memory: what stays is the quantized layers, the
embeddings/head, and one float layer at a time. Tensors are read memory-mapped (``safe_open``) in their
stored dtype and converted to the compute dtype (fp32 by default) layer by layer, never the whole model.
A ``.gguf`` file streams the same way through :class:`~llmquant.io.gguf_import.GGUFCheckpoint` (each tensor
dequantized from the memory-mapped file when read; the embedding, block-quantized, is dequantized at load).

``load_streaming(folder, empty=True)`` reads no weight at all: every parameter stays on the meta device and
``model.llmquant_row_source`` (a :class:`RowSource`) reads any rows of any of them later. A sharded QAT run
(``train_qat(shard=True)``) builds its shards on that skeleton and fills each rank's rows from the file, so
no rank holds the whole model (safetensors: only the rows' bytes are read; GGUF: one tensor at a time is
dequantized whole, its rows kept).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CorruptFileError, ModelNotFoundError
from ..models import arch_for
from ..modules import replace_module
from ..modules.float_modules import FloatEmbedding, FloatLinear
from ..resources import trim_memory
from .shards import TORCH_DTYPES, FileSlice, safetensors_slices

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face safetensors checkpoint (one file, or shards with an index), read
    memory-mapped one tensor at a time. Missing or unreadable shards are named in the error."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorruptFileError(f"{index} is not a safetensors index ({e})") from None
        elif (self.folder / SINGLE).is_file():
            weight_map = None
        else:
            raise ModelNotFoundError(f"{self.folder} holds neither {SINGLE} nor {INDEX}: streaming needs safetensors")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            raise CorruptFileError(f"the checkpoint index names shards that are not there: {missing[:3]} in {self.folder}")
        self.where: dict[str, str] = {}
        self._where_in_file: dict[str, dict[str, FileSlice]] = {}
        for f in files:
            with self._open(f) as h:
                for k in h.keys():
                    self.where[k] = f
        if weight_map:
            absent = [k for k, f in weight_map.items() if self.where.get(k) != f]
            if absent:
                raise CorruptFileError(f"{weight_map[absent[0]]} lacks {absent[0]!r} (and {len(absent) - 1} more "
                                       "tensors the index names): the shard is truncated or not this model's")

    def _open(self, f: str):
        """The shard, memory-mapped for the ``with`` block only: a mapping left open would keep every page
        read so far resident, and the point of streaming is that they go."""
        from safetensors import safe_open

        try:
            return safe_open(str(self.folder / f), framework="pt")
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise CorruptFileError(f"{self.folder / f} cannot be read as safetensors: {str(e).splitlines()[0]}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, names: list[str], dtype: torch.dtype | None = None,
             rows: dict[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, each in its own memory, floats in ``dtype``. Read with plain file reads, one
        tensor at a time (no mapping that would keep the pages resident): the transient memory is the
        largest tensor in its stored and its compute dtype. ``rows``: ``{name: (start, stop)}`` reads only
        those rows (first dimension) of the named tensors: their bytes, nothing else of the tensor."""
        missing = [n for n in names if n not in self.where]
        if missing:
            raise CorruptFileError(f"the checkpoint in {self.folder} has no tensor {missing[0]!r}")
        rows = rows or {}
        out: dict[str, torch.Tensor] = {}
        for f in sorted({self.where[n] for n in names}):
            slices = self._slices(f)
            with open(self.folder / f, "rb") as fh:
                for n in names:
                    if self.where[n] != f:
                        continue
                    sl = slices[n]
                    if sl.dtype not in TORCH_DTYPES:
                        raise CorruptFileError(f"{self.folder / f}: tensor {n!r} has dtype {sl.dtype}, which llmquant "
                                               "cannot read")
                    offset, nbytes, shape = sl.offset, sl.nbytes, sl.shape
                    if n in rows:
                        start, stop = rows[n]
                        if not shape or not 0 <= start <= stop <= shape[0]:
                            raise CorruptFileError(f"{self.folder / f}: tensor {n!r} of shape {shape} has no rows "
                                                   f"{start}:{stop}")
                        row = nbytes // shape[0] if shape[0] else 0
                        offset, nbytes, shape = offset + start * row, (stop - start) * row, (stop - start, *shape[1:])
                    buf = bytearray(nbytes)
                    fh.seek(offset)
                    if fh.readinto(buf) != nbytes:
                        raise CorruptFileError(f"{self.folder / f} ends inside tensor {n!r}: the shard is truncated")
                    t = (torch.frombuffer(buf, dtype=TORCH_DTYPES[sl.dtype]) if nbytes
                         else torch.empty(0, dtype=TORCH_DTYPES[sl.dtype])).reshape(shape)
                    del buf
                    out[n] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def _slices(self, f: str) -> dict[str, FileSlice]:
        if f not in self._where_in_file:
            self._where_in_file[f] = safetensors_slices(self.folder / f)
        return self._where_in_file[f]

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.read([name], dtype)[name]

    def mapped(self, name: str) -> tuple[torch.Tensor, "FileSlice"]:
        """The tensor as stored, a view of the memory-mapped file (its pages are read when used, and can be
        dropped again by the system), and where its bytes lie in the file (for copying them unread)."""
        if name not in self.where:
            raise CorruptFileError(f"the checkpoint in {self.folder} has no tensor {name!r}")
        f = self.where[name]
        with self._open(f) as h:
            t = h.get_tensor(name)
        return t, self._slices(f)[name]


def _materialize(module: nn.Module, prefix: str, ckpt: SafetensorsCheckpoint, dtype: torch.dtype,
                 skip: tuple[str, ...] = ()) -> None:
    """Give every parameter (and persistent buffer) of ``module`` that is on the meta device its tensor
    from the checkpoint; ``prefix`` is the module's name in the model; modules named in ``skip`` (and
    everything under them) are left as they are."""
    wanted = []  # (module, kind, attribute name, full name, meta tensor)
    for mod_name, mod in module.named_modules():
        base = ".".join(p for p in (prefix, mod_name) if p)
        if any(base == k or base.startswith(k + ".") for k in skip):
            continue
        wanted += [(mod, "p", n, f"{base}.{n}", t) for n, t in mod.named_parameters(recurse=False) if t.is_meta]
        wanted += [(mod, "b", n, f"{base}.{n}", t) for n, t in mod.named_buffers(recurse=False)
                   if t.is_meta and f"{base}.{n}" in ckpt]
    tensors = ckpt.read([w[3] for w in wanted], dtype)
    for mod, kind, name, full, meta in wanted:
        t = tensors.pop(full)
        if tuple(t.shape) != tuple(meta.shape):
            raise CorruptFileError(f"{full} has shape {tuple(t.shape)} in the checkpoint, the model config says "
                                   f"{tuple(meta.shape)}")
        if meta.is_floating_point() and not t.is_floating_point():
            raise CorruptFileError(f"{ckpt.folder / ckpt.where[full]}: {full} is stored as {t.dtype}; the model "
                                   "needs a float tensor there (the checkpoint is not this model's)")
        if kind == "p":
            mod._parameters[name] = nn.Parameter(t, requires_grad=meta.requires_grad)
        else:
            mod._buffers[name] = t


class SafetensorsLayerSource:
    """The pipeline's :class:`~llmquant.flows.pipeline.LayerSource` for a streamed model: decoder layer i's
    tensors are read when the pipeline reaches it (``load``)."""

    def __init__(self, ckpt: SafetensorsCheckpoint, dtype: torch.dtype) -> None:
        self.ckpt, self.dtype = ckpt, dtype

    def load(self, index: int, prefix: str, layer: nn.Module) -> None:
        _materialize(layer, prefix, self.ckpt, self.dtype)

    def release(self, index: int, prefix: str, layer: nn.Module) -> None:
        """The pipeline has dropped the float linears it replaced: give their memory back to the system."""
        trim_memory()


def _map_embeddings(model: nn.Module, ckpt: SafetensorsCheckpoint, dtype: torch.dtype) -> dict:
    """The input embedding and the output head (the largest tensors outside the layers: 1 GB each in bf16
    for an 8B model) stay in the checkpoint, memory-mapped in their stored dtype: a lookup reads only the
    rows it uses, and a save copies their bytes file to file. Stored in another dtype than ``dtype`` they
    become :class:`FloatEmbedding` / :class:`FloatLinear`, which compute in ``dtype`` exactly as the
    converted weights would (every bf16/fp16 value is an fp32 value). A tied head shares the embedding's
    tensor. Returns ``{tensor name: (FileSlice, data_ptr)}`` of what is passed through unread."""
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    emb_name = names.get(id(emb)) if isinstance(emb, nn.Embedding) else None
    head_name = names.get(id(head)) if isinstance(head, nn.Linear) else None
    out: dict[str, tuple[FileSlice, int]] = {}
    shared = None
    for name, mod in ((emb_name, emb), (head_name, head)):
        if name is None:
            continue
        key = f"{name}.weight"
        if key not in ckpt:
            if mod is head and shared is not None and getattr(model.config, "tie_word_embeddings", False):
                t = shared  # tied: the head is the embedding's tensor
            else:
                continue
        else:
            t, where = ckpt.mapped(key)
            out[key] = (where, t.data_ptr())
            shared = t if mod is emb else shared
        if tuple(t.shape) != tuple(mod.weight.shape):
            raise CorruptFileError(f"{key} has shape {tuple(t.shape)} in the checkpoint, the model config says "
                                   f"{tuple(mod.weight.shape)}")
        if not t.is_floating_point():
            raise CorruptFileError(f"{key} is stored as {t.dtype} in the checkpoint; a float weight is needed")
        if mod is head and mod.bias is not None:
            bias = ckpt.tensor(f"{name}.bias", dtype) if f"{name}.bias" in ckpt else None
            if bias is None:
                raise CorruptFileError(f"the checkpoint in {ckpt.folder} has no tensor {name + '.bias'!r}")
        if t.dtype == dtype:
            mod.weight = nn.Parameter(t, requires_grad=False)
            if mod is head and mod.bias is not None:
                mod.bias = nn.Parameter(bias, requires_grad=False)
            continue
        with torch.device("meta"):
            new = (FloatEmbedding(mod.num_embeddings, mod.embedding_dim, t.dtype, mod.padding_idx) if mod is emb
                   else FloatLinear(mod.in_features, mod.out_features, t.dtype, bias=mod.bias is not None,
                                    bias_dtype=dtype))
        new.weight = t
        new.stands_for_linear = mod is head  # selected by targets as the nn.Linear it replaces
        if mod is head and mod.bias is not None:
            new.bias = bias
        replace_module(model, name, new)
    return out


class RowSource:
    """Where the weights of a model loaded with ``load_streaming(empty=True)`` are: every parameter stays in
    the checkpoint (on the meta device in the model) until a sharded run asks for its rows -- each rank
    reads only the rows of its own shard (:func:`llmquant.train_qat` with ``shard=True``). A tied head
    reads the embedding's tensor."""

    def __init__(self, ckpt, dtype: torch.dtype, aliases: dict[str, str]) -> None:
        self.ckpt, self.dtype, self.aliases = ckpt, dtype, aliases

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of parameter ``name``, in the model's dtype."""
        key = self.aliases.get(name, name)
        return self.ckpt.read([key], self.dtype, rows={key: (start, stop)})[key]


def _row_source(model: nn.Module, ckpt, dtype: torch.dtype) -> RowSource:
    """The model's :class:`RowSource`, every parameter checked to be in the checkpoint."""
    names = {id(m): n for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    aliases = {}
    if head is not None and emb is not None and id(head) in names and id(emb) in names:
        h, e = f"{names[id(head)]}.weight", f"{names[id(emb)]}.weight"
        if h not in ckpt and (head.weight is emb.weight or getattr(model.config, "tie_word_embeddings", False)):
            aliases[h] = e  # tied: stored once, under the embedding's name
    missing = [n for n, _ in model.named_parameters() if aliases.get(n, n) not in ckpt]
    if missing:
        raise CorruptFileError(f"the checkpoint in {ckpt.folder} has no tensor {missing[0]!r} (and {len(missing) - 1} "
                               "more the model's config needs): it is incomplete or not this config's")
    return RowSource(ckpt, dtype, aliases)


def is_streamed(model: nn.Module) -> bool:
    """True while some of ``model``'s weights are still to be read from its checkpoint."""
    return getattr(model, "llmquant_layer_source", None) is not None


def load_streaming(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32, empty: bool = False):
    """``(model, tokenizer)`` with the decoder layers left in the checkpoint until the pipeline reads them.

    Quantize it with :func:`llmquant.quantize` (any method that runs layer by layer: rtn, gptq, awq,
    static, smoothquant, dynamic, plans); the result is bit-identical to quantizing the model loaded whole.
    ``empty=True``: no weight is read at all (every parameter on the meta device, a :class:`RowSource` as
    ``model.llmquant_row_source``), for a sharded QAT run whose ranks each read their own rows.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .hf import _offline_env, default_model_file

    _offline_env()
    p = default_model_file() if folder is None else Path(folder).expanduser()
    gguf = p if p.suffix == ".gguf" and p.is_file() else None
    if gguf is not None:
        from .gguf_check import wrap_gguf_errors
        from .gguf_import import GGUFCheckpoint

        with wrap_gguf_errors(gguf, "reading its metadata"):
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        for attr in ("quantization_config",):  # the file's block types; the float model does not have them
            if hasattr(config, attr):
                delattr(config, attr)
        ckpt = GGUFCheckpoint(gguf, config)
    elif not (p / "config.json").is_file():
        raise ModelNotFoundError(f"{str(folder)!r} holds no config.json: streaming takes a Hugging Face folder "
                                 "with safetensors weights or a .gguf file")
    else:
        ckpt = SafetensorsCheckpoint(p)
        try:
            config = AutoConfig.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as e:
            raise CorruptFileError(f"{p / 'config.json'} cannot be read ({str(e).splitlines()[0]})") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    config.architectures = config.architectures or [type(model).__name__]
    arch = arch_for(model)
    layers_path = arch.layers if arch is not None else None
    if layers_path is None:
        raise ModelNotFoundError(f"streaming needs to know where {type(model).__name__}'s decoder layers are: add "
                                 "its family to llmquant.models.arch")
    if empty:
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()  # the skeleton's head is the embedding's parameter, as a whole load's is
        model.eval()
        model.llmquant_row_source = _row_source(model, ckpt, dtype)
        return _finish(model, folder, p, gguf)
    skip = (layers_path,)  # read by the pipeline, layer by layer
    if gguf is None:
        passthrough = _map_embeddings(model, ckpt, dtype)
    else:  # GGUF embeddings are block-quantized: dequantized now, like every other tensor of the file
        passthrough = {}
        tied = getattr(config, "tie_word_embeddings", False) and f"{arch.lm_head}.weight" not in ckpt
        skip += (arch.lm_head,) if tied else ()  # the head gets the embedding's tensor
    skip += tuple(n.rsplit(".", 1)[0] for n in passthrough)
    _materialize(model, "", ckpt, dtype, skip)
    if gguf is not None and tied:
        model.tie_weights()
    model.llmquant_passthrough = passthrough
    model.eval()
    model.llmquant_layer_source = SafetensorsLayerSource(ckpt, dtype)
    return _finish(model, folder, p, gguf)


def _finish(model: nn.Module, folder, p: Path, gguf: Path | None):
    """The streamed (or empty) model's source and tokenizer: ``(model, tokenizer)``."""
    from transformers import AutoTokenizer

    model.llmquant_source = "default" if folder is None else str(p.resolve())
    if gguf is not None:
        from .hf import gguf_tokenizer

        tok = gguf_tokenizer(gguf)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            log.warning("no tokenizer in %s (%s)", p, str(e).splitlines()[0])
            tok = None
    model.llmquant_tokenizer = tok
    return model, tok

