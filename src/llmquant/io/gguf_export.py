"""Export to GGUF, llama.cpp's single-file format: metadata + tokenizer + tensors in GGML block types.

Each quantized linear is written in the smallest block type that holds its values exactly (proved by
decoding with ``gguf.quants.dequantize`` and comparing bit for bit with ``dequantize_weight()``; see
:mod:`llmquant.io.ggml_blocks`). A layer whose scheme maps onto none (e.g. groups of 128, fp32 scales)
is refused, listing what would map, unless ``requant`` names a type: it is then re-quantized with the
``gguf`` package's (llama.cpp reference) quantizer and the extra error is measured and reported.
Float tensors: 1-D ones (norms) are F32 as llama.cpp wants; 2-D ones (embeddings, unquantized linears)
take ``float_type`` ("auto": the smallest of Q8_0 / F16 / BF16 / F32 that holds them exactly).
Per-family facts (names, metadata, row orders, norm offsets, what llama.cpp cannot run) are data in the
family's :class:`~llmquant.models.spec.GGUFSpec`; a model failing one of its requirements, or of a family
without one, is refused before anything is written.
Tokenizer: copied from the GGUF the model came from (the default model's, or ``tokenizer_gguf``) when its
vocabulary matches, else built from the Hugging Face tokenizer (byte-level BPE only).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import ExportError, OutputExistsError
from ..models import arch_for, gguf_value_change, hf_to_gguf_name, model_types_with, resolve, row_order_for
from ..modules import QuantEmbedding, QuantLinear
from ..schemes import sqnr_db
from .ggml_blocks import BLOCK_TYPES, BY_NAME, REQUANT_TYPES, dequantize_bytes, exact_blocks, ggml_type
from .gguf_tokenizer import add_tokenizer

log = logging.getLogger(__name__)

FLOAT_TYPES = ("auto", "F32", "F16", "BF16", "Q8_0")


@dataclass
class TensorRecord:
    name: str  # GGUF name
    source: str  # HF name
    type: str
    exact: bool
    nbytes: int
    sqnr_db: float = float("inf")  # of the written values vs llmquant's, when not exact
    max_abs_err: float = 0.0


@dataclass
class GGUFExportReport:
    path: str
    tensors: list[TensorRecord] = field(default_factory=list)
    tokenizer_source: str = ""

    @property
    def file_bytes(self) -> int:
        return Path(self.path).stat().st_size

    @property
    def inexact(self) -> list[TensorRecord]:
        return [t for t in self.tensors if not t.exact]

    def type_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type] = out.get(t.type, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "file_bytes": self.file_bytes,
            "types": self.type_counts(),
            "tokenizer": self.tokenizer_source,
            "inexact": [t.__dict__ for t in self.inexact],
        }


def _raw(arr: np.ndarray, type_name: str) -> np.ndarray:
    from gguf import quants

    if type_name == "F32":
        return arr.astype(np.float32)
    if type_name == "F16":
        return arr.astype(np.float16)
    return quants.quantize(arr.astype(np.float32), ggml_type(type_name))


def _decoded(raw: np.ndarray, type_name: str, shape) -> np.ndarray:
    if type_name in ("F32", "F16"):
        return raw.astype(np.float32).reshape(shape)
    return dequantize_bytes(raw, type_name).reshape(shape)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.astype(np.float32).view(np.uint32), b.astype(np.float32).view(np.uint32))


def _write_float(arr: np.ndarray, type_name: str) -> tuple[str, np.ndarray, bool]:
    """(type, raw, exact) for a float tensor; "auto" takes the smallest exact type."""
    if arr.ndim == 1:
        return "F32", arr.astype(np.float32), True
    if type_name != "auto":
        raw = _raw(arr, type_name)
        return type_name, raw, _same_bits(_decoded(raw, type_name, arr.shape), arr)
    for t in ("Q8_0", "F16", "BF16"):
        if t in ("Q8_0",) and arr.shape[-1] % 32:
            continue
        raw = _raw(arr, t)
        if _same_bits(_decoded(raw, t, arr.shape), arr):
            return t, raw, True
    return "F32", arr.astype(np.float32), True


def _unmappable_message(names: list[tuple[str, str]]) -> str:
    shown = ", ".join(f"{n} ({s})" for n, s in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    maps = ", ".join(f"{b.preset} -> {b.name}" for b in BLOCK_TYPES)
    return (
        f"{len(names)} quantized layer(s) have no exact GGUF block type: {shown}. GGUF holds blocks of 32 "
        f"values with fp16 scales, or super-blocks of 256 with two-level scales (k-quants, input width a "
        f"multiple of 256); schemes that map exactly: {maps} (any symmetric or asymmetric scheme "
        f"with group size 32, scale_dtype float16 and at most 5 or 8 bits maps too). Quantize with one of "
        f"those, or re-quantize with --requant TYPE ({', '.join(REQUANT_TYPES)}) to accept a measured extra error"
    )


_QUANT = (QuantLinear, QuantEmbedding)  # packed modules written as GGML blocks


def _model_tensors(model: nn.Module, head: str | None = None):
    """(hf_name, QuantLinear / QuantEmbedding or float tensor) for every parameter/buffer to write; tied
    copies once (a quantized head sharing a QuantEmbedding's tensors is written as the embedding: llama.cpp
    reads a missing output.weight from token_embd.weight), except the head ``head`` (the module path of a
    head the family's llama.cpp loader needs even when tied), written again under its own name."""
    seen: set[int] = set()
    quant = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    shared = {id(m.qweight) for m in quant.values() if isinstance(m, QuantEmbedding)}
    for n, m in quant.items():
        if isinstance(m, QuantLinear) and id(m.qweight) in shared and n != head:
            continue
        yield f"{n}.weight", m
        if getattr(m, "bias", None) is not None:
            yield f"{n}.bias", m.bias.detach()
    skip = tuple(f"{n}." for n in quant)
    for n, t in model.state_dict().items():
        if n.startswith(skip) or not t.is_floating_point():
            continue
        if t.data_ptr() in seen and n != f"{head}.weight":  # tied lm_head: llama.cpp falls back to token_embd
            continue
        seen.add(t.data_ptr())
        yield n, t.detach()


def export_gguf(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike,
    *,
    requant: str | None = None,
    float_type: str = "auto",
    tokenizer_gguf: str | os.PathLike | None = None,
    tokenizer_pre: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> GGUFExportReport:
    """Write ``model`` (quantized or not) and its tokenizer to the GGUF file ``path``; see the module doc."""
    import gguf

    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{str(out)!r} exists; choose another -o or pass --overwrite")
    if requant is not None and requant.upper() not in REQUANT_TYPES:
        raise ExportError(f"--requant {requant!r} is not a type llmquant can write; choose one of {', '.join(REQUANT_TYPES)}")
    if float_type.upper() not in [t.upper() for t in FLOAT_TYPES]:
        raise ExportError(f"float type {float_type!r} unknown; choose one of {', '.join(FLOAT_TYPES)}")
    requant = requant.upper() if requant else None
    float_type = "auto" if float_type.lower() == "auto" else float_type.upper()
    cfg = model.config
    arch = arch_for(model)
    if arch is None or arch.gguf is None:
        raise ExportError(
            f"GGUF export knows no tensor names for model type {getattr(cfg, 'model_type', None)!r}; "
            f"supported: {', '.join(model_types_with('gguf'))} (add GGUF facts to its entry in llmquant.models.arch)"
        )
    gg = arch.gguf
    unmet = [what for what, ok in gg.requires if not ok(model)]
    if unmet:
        raise ExportError(f"llama.cpp's {gg.arch!r} architecture cannot run this {cfg.model_type} model: it needs "
                          + "; ".join(unmet) + ". Nothing was written")
    from ..schemes import PRESETS

    llama_act = (None, PRESETS["gguf:Q8_0-act"], PRESETS["gguf:Q8_K-act"])
    if any(isinstance(m, QuantLinear) and m.activation_scheme not in llama_act for m in model.modules()):
        raise ExportError("GGUF holds weight-only quantized models; llama.cpp quantizes activations itself. "
                          "Export a weight-only model (or one with activation schemes gguf:Q8_0-act / gguf:Q8_K-act, llama.cpp's own "
                          "rounding), or use --format compressed-tensors for W8A8")
    items = list(_model_tensors(model, arch.lm_head if gg.head_required else None))
    unmapped = [n for n, _ in items if hf_to_gguf_name(arch, n) is None]
    if unmapped:
        raise ExportError(f"tensors without a GGUF name for architecture {gg.arch!r}: {unmapped[:5]}")
    plan, bad = [], []
    for n, obj in items:
        if isinstance(obj, _QUANT):
            found = exact_blocks(obj)
            if found is None and requant is None:
                bad.append((n, obj.scheme.name))
            plan.append((n, obj, found))
        else:
            plan.append((n, obj, None))
    if bad:
        raise ExportError(_unmappable_message(bad))

    report = GGUFExportReport(path=str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, gg.arch)
        w.add_name(str(getattr(cfg, "_name_or_path", "") or getattr(model, "llmquant_source", None) or "llmquant export"))
        w.add_string("general.quantized_by", "llmquant")
        for key, source, kind in gg.metadata:
            v = resolve(cfg, source)
            if v is None:
                continue
            add = {"u32": lambda k, x: w.add_uint32(k, int(x)), "f32": lambda k, x: w.add_float32(k, float(x)),
                   "bool": lambda k, x: w.add_bool(k, bool(x)), "str": lambda k, x: w.add_string(k, str(x))}[kind]
            add(f"{gg.arch}.{key}", v)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        report.tokenizer_source = add_tokenizer(w, tokenizer, model, tokenizer_gguf, pre=tokenizer_pre)
        for n, obj, found in tqdm(plan, desc="gguf tensors", disable=not progress, leave=False):
            gname = hf_to_gguf_name(arch, n)
            order = row_order_for(arch, n, cfg, obj.out_features if isinstance(obj, _QUANT) else obj.shape[0])
            order = None if order is None else np.asarray(order)
            if isinstance(obj, _QUANT):
                if found is not None:
                    bt, raw = found
                    rec = TensorRecord(gname, n, bt.name, True, raw.nbytes)
                else:
                    ref = obj.dequantize_weight(torch.float32).numpy()
                    tname = requant
                    raw = _raw(ref, tname)
                    dec = _decoded(raw, tname, ref.shape)
                    rec = TensorRecord(gname, n, tname, _same_bits(dec, ref), raw.nbytes,
                                       sqnr_db(torch.from_numpy(ref), torch.from_numpy(dec)), float(np.abs(dec - ref).max()))
                if order is not None:
                    raw = raw[order]
            else:
                transposed, offset = gguf_value_change(arch, n, gname)
                # a Conv1D quantizing made an nn.Linear (weight already (out, in)) is not transposed again
                transposed = transposed and not isinstance(model.get_submodule(n.rpartition(".")[0]), nn.Linear)
                arr = obj.float().cpu().numpy()
                arr = arr.T if transposed else arr  # HF (in, out) -> llama.cpp's (out, in)
                if order is not None:
                    arr = arr[order]
                if offset:
                    arr = arr + np.float32(offset)  # Gemma's 1 + w: llama.cpp's norms scale by the stored weight
                tname, raw, exact = _write_float(arr, float_type)
                rec = TensorRecord(gname, n, tname, exact, raw.nbytes)
                if not exact:
                    dec = _decoded(raw, tname, arr.shape)
                    rec.sqnr_db = sqnr_db(torch.from_numpy(arr), torch.from_numpy(dec))
                    rec.max_abs_err = float(np.abs(dec - arr).max())
            if rec.type in ("F32", "F16"):
                w.add_tensor(gname, np.ascontiguousarray(raw))
            else:
                w.add_tensor(gname, np.ascontiguousarray(raw), raw_dtype=ggml_type(rec.type))
            report.tensors.append(rec)
        for gname, fn in gg.computed_tensors:  # what llama.cpp's converter computes from the config
            arr = fn(cfg)
            if arr is not None:
                w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
                report.tensors.append(TensorRecord(gname, "(computed from the config)", "F32", True, arr.nbytes))
        w.add_file_type(_file_type(report))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for t in report.inexact:
        log.warning("%s written as %s, not exactly: SQNR %.1f dB, max |err| %.3g", t.name, t.type, t.sqnr_db, t.max_abs_err)
    log.info("wrote %s (%.1f MB): %s", out, report.file_bytes / 1e6, report.type_counts())
    return report


_FTYPE = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
          "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K",
          "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K"}


def _file_type(report: GGUFExportReport) -> int:
    """general.file_type: the type holding most weights among the 2-D tensors (informational)."""
    import gguf

    weight: dict[str, float] = {}
    float_bits = {"F32": 32, "F16": 16, "BF16": 16}
    for t in report.tensors:
        if t.name.endswith(".weight") and "norm" not in t.name:
            bits = BY_NAME[t.type].bits_per_weight if t.type in BY_NAME else float_bits[t.type]
            weight[t.type] = weight.get(t.type, 0) + t.nbytes * 8 / bits
    main = max(weight, key=weight.get) if weight else "F32"
    return int(gguf.LlamaFileType[_FTYPE[main]])
