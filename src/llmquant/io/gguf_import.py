"""Import a GGUF file's quantized linears as packed QuantLinear modules (not dequantized floats).

``load_gguf_packed(path)`` builds the model through transformers (config, tokenizer, float tensors such as
norms and embeddings, dequantized) and then replaces every linear whose GGUF tensor is a block type
llmquant holds exactly (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the k-quants Q2_K .. Q6_K; see
:mod:`llmquant.io.ggml_blocks`) by a QuantLinear built from the file's own codes and scales / minima (for
k-quants the float32 products of the fp16 super-scales and the integer group scales), undoing llama.cpp's
q/k row permutation. Each imported layer's ``dequantize_weight()`` is checked to equal transformers'
dequantized weight bit for bit. Linears stored in other types (IQ*, F16...) stay float, with a log line
saying so. The token embedding in one of those types becomes a :class:`QuantEmbedding` holding the file's
blocks, and a head tied to it the QuantLinear sharing them (the tied pair stays tied, stored once).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..errors import CorruptFileError, ExportError, ModelNotFoundError
from ..models import arch_for_gguf, gguf_to_hf_name, gguf_to_hf_names, gguf_value_change, row_order_for
from ..modules import replace_module
from ..schemes import QuantConfig
from .ggml_blocks import BY_NAME, module_from_blocks
from .gguf_check import field_value, open_gguf

log = logging.getLogger(__name__)


@dataclass
class GGUFImport:
    path: str
    packed: dict[str, str] = field(default_factory=dict)  # HF module name -> GGML type
    kept_float: dict[str, str] = field(default_factory=dict)  # linears left float -> their GGML type
    embedding: tuple[str, ...] = ()  # the packed embedding (and the head tied to it), when its type is held

    def type_counts(self) -> dict[str, int]:
        return dict(Counter(self.packed.values()))


def hf_row_order(rows: np.ndarray, arch, hf_name: str, config) -> np.ndarray:
    """``rows`` of tensor ``hf_name`` as a GGUF file stores them, in Hugging Face's order: llama.cpp's
    converter reorders q/k rows for its rope layout, and fused q/k/v rows grouped per head (GGUF row r holds
    HF row ``order[r]``)."""
    order = row_order_for(arch, hf_name, config, rows.shape[0])
    if order is None:
        return rows
    order = np.asarray(order)
    out = np.empty_like(rows)
    out[order] = rows
    return out


def load_gguf_packed(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, GGUFImport)`` with the GGUF file's quantized linears packed (default: the default
    model's Q4_1 file)."""
    from .hf import default_model_file, load_float_model

    gpath = default_model_file() if path is None else Path(path).expanduser()
    if not gpath.is_file() or gpath.suffix != ".gguf":
        raise ModelNotFoundError(f"{str(gpath)!r} is not a .gguf file; packed loading reads GGUF files only")
    model, tok, source = load_float_model(None if path is None else gpath, dtype=dtype)
    reader = open_gguf(gpath)
    arch_name = field_value(reader, "general.architecture", gpath, required=True)
    arch = arch_for_gguf(arch_name) if isinstance(arch_name, str) else None
    if arch is None:
        raise ExportError(f"GGUF architecture {arch_name!r} has no tensor-name map in llmquant.models.arch")
    info = GGUFImport(path=str(gpath))
    modules = dict(model.named_modules())
    scheme_count: Counter = Counter()
    mismatched = []
    embedding = None
    for t in reader.tensors:
        hf = gguf_to_hf_name(arch, t.name)
        if hf is None or not hf.endswith(".weight"):
            continue
        mod_name = hf[: -len(".weight")]
        lin = modules.get(mod_name)
        if isinstance(lin, nn.Embedding) and lin is model.get_input_embeddings():
            embedding = (t, mod_name, lin)  # after the linears: a tied head becomes the embedding's QuantLinear
            continue
        if not isinstance(lin, nn.Linear):
            continue
        tname = t.tensor_type.name
        if tname not in BY_NAME:
            info.kept_float[mod_name] = tname
            continue
        if t.n_elements != lin.in_features * lin.out_features:
            raise CorruptFileError(f"{gpath}: tensor {t.name} holds {t.n_elements} values, the model's {mod_name} "
                                   f"needs {lin.out_features} x {lin.in_features}")
        raw = hf_row_order(np.asarray(t.data).reshape(lin.out_features, -1), arch, hf, model.config)
        q = module_from_blocks(raw, tname, lin.in_features, bias=None if lin.bias is None else lin.bias.detach())
        if not torch.equal(q.dequantize_weight(torch.float32), lin.weight.detach().float()):
            mismatched.append(mod_name)
        if lin.weight is getattr(model.get_input_embeddings(), "weight", None):
            continue  # a linear sharing the embedding's tensor stays tied and float
        replace_module(model, mod_name, q.to(lin.weight.device))
        info.packed[mod_name] = tname
        scheme_count[q.scheme] += 1
    head_scheme = None if embedding is None else _import_embedding(model, *embedding, info, mismatched)
    if mismatched:
        log.warning("%d imported layers differ from transformers' dequantization: %s", len(mismatched), mismatched[:3])
    if info.kept_float:
        log.info("linears kept float (block types llmquant does not hold): %s", Counter(info.kept_float.values()))
    if scheme_count:
        # the recipe that re-makes these codes from the file's dequantized weights: RTN onto the file's grid
        # (one scheme), or a plan naming each linear's scheme when the file mixes block types
        schemes = {n: m.scheme for n, m in model.named_modules() if n in info.packed}
        if len(scheme_count) == 1:
            main = scheme_count.most_common(1)[0][0]
            model.llmquant_config = QuantConfig(weight=main, method="rtn", ignore=(),
                                                targets=tuple(n for n in info.packed if n not in info.embedding),
                                                head="fp32" if head_scheme is None else head_scheme.to_dict())
        else:
            from ..schemes import Plan

            model.llmquant_plan = Plan.from_layers({n: s.to_dict() for n, s in schemes.items()})
    model.llmquant_source = source
    model.llmquant_gguf_import = info
    log.info("packed %d linears from %s: %s", len(info.packed), gpath.name, info.type_counts())
    return model.eval(), tok, info


def _import_embedding(model, t, name: str, emb: nn.Module, info: "GGUFImport", mismatched: list):
    """The file's token embedding as a :class:`QuantEmbedding` holding its own blocks (and a head tied to it
    as the QuantLinear sharing them); returns the scheme, or None when its type stays float."""
    from ..modules import QuantEmbedding
    from ..modules.float_modules import embed_scale_of

    tname = t.tensor_type.name
    if tname not in BY_NAME or emb.embedding_dim % BY_NAME[tname].block_values:
        if tname not in ("F32", "F16", "BF16"):
            info.kept_float[name] = tname
        return None
    raw = np.asarray(t.data).reshape(emb.num_embeddings, -1)
    q = module_from_blocks(raw, tname, emb.embedding_dim).to(emb.weight.device)
    if not torch.equal(q.dequantize_weight(torch.float32), emb.weight.detach().float()):
        mismatched.append(name)
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    replace_module(model, name, QuantEmbedding.sharing(q, emb.padding_idx, embed_scale_of(emb)))
    info.packed[name] = tname
    info.embedding = (name,)
    if tied:
        head_name = next(n for n, m in model.named_modules() if m is head)
        replace_module(model, head_name, q)
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False  # the modules share the tensors; keep HF from re-tying
        info.embedding = (name, head_name)
    return q.scheme


class GGUFCheckpoint:
    """A GGUF file's tensors under their Hugging Face names, for the streaming load: each is read from the
    memory-mapped file when asked for, dequantized with the ``gguf`` package (as transformers does) and
    its q/k rows put back in Hugging Face's order; nothing else of the file is read."""

    def __init__(self, path: str | os.PathLike, config) -> None:
        self.path = Path(path).expanduser()
        self.folder, self.config = self.path.parent, config
        self.reader = open_gguf(self.path)
        arch_name = field_value(self.reader, "general.architecture", self.path, required=True)
        self.arch = arch_for_gguf(arch_name) if isinstance(arch_name, str) else None
        if self.arch is None:
            raise ExportError(f"GGUF architecture {arch_name!r} has no tensor-name map in llmquant.models.arch: "
                              "load this file whole (without streaming)")
        self.tensors = {}
        for t in self.reader.tensors:
            for hf in gguf_to_hf_names(self.arch, t.name):  # the model asks for the one it has
                self.tensors[hf] = t
        self.where = {n: self.path.name for n in self.tensors}  # named in error messages

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, names: list[str], dtype: torch.dtype | None = None,
             rows: dict[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """The named tensors; ``rows`` (``{name: (start, stop)}``): only those rows are kept, the tensor
        being dequantized whole first (one at a time: GGUF's q/k rows are stored in another order)."""
        rows = rows or {}
        return {n: self.tensor(n, dtype)[slice(*rows[n])].clone() if n in rows else self.tensor(n, dtype)
                for n in names}

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self.tensors.get(name)
        if t is None:
            raise CorruptFileError(f"{self.path} has no tensor for {name!r}")
        shape = tuple(int(d) for d in reversed(list(t.shape)))  # GGUF lists dimensions fastest first
        try:
            arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except (ValueError, NotImplementedError, TypeError) as e:
            raise CorruptFileError(f"{self.path}: tensor {t.name} cannot be read ({e})") from None
        arr = hf_row_order(arr, self.arch, name, self.config)
        transposed, offset = gguf_value_change(self.arch, name, t.name)  # undo what the converter changed
        arr = np.ascontiguousarray(arr.T if transposed else arr)
        arr = arr - np.float32(offset) if offset else arr
        out = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # F32 data is a view of the mapped file
        return out.to(dtype) if dtype is not None else out
