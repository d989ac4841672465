"""What a valid ``llmquant.json`` holds, checked before anything is built from it, and its digest.

:func:`validate_manifest` turns every malformed manifest into :class:`CorruptFileError` (naming the file and
the field) instead of a ``KeyError`` deep inside ``load``:

* types and ranges of every field ``load`` reads (format and version, tensor records: shape, dtype,
  sha256; layer records: feature counts, bias flags, dtypes, padding index);
* names: tensor, layer and alias names are dotted module paths; each ``aliases`` entry points at a tensor
  the manifest lists, with the shape its own place needs;
* schemes: each layer's ``scheme`` / ``activation`` dict and the recorded ``config`` / ``plan`` parse
  (``QuantScheme.from_dict``, ``QuantConfig.from_dict``, ``Plan.from_dict``);
* consistency with the model config (``config.json``, when given): the model is built on PyTorch's
  ``meta`` device (no memory), the recorded layers are put in place exactly as ``load`` puts them, and
  every tensor name, shape and (for llmquant's own modules) dtype the manifest lists must be the one the
  model expects, with nothing missing and nothing extra.

:func:`manifest_digest` is the sha256 of the manifest's canonical JSON without its own ``manifest_sha256``
field; :func:`llmquant.io.save` records it and :func:`check_digest` compares it, so an edited manifest (a
scheme field changed by hand, a layer dropped) is refused even where it would still parse.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping

import torch

from ..errors import CorruptFileError, LLMQuantError

DIGEST_FIELD = "manifest_sha256"
_NAME = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MAX_DIM = 2**40  # no tensor dimension comes near this; it keeps products of dimensions exact and small
MAX_NDIM = 8
MAX_FEATURES = 2**31 - 1
# the dtypes safetensors stores that llmquant can write
TENSOR_DTYPES = frozenset(
    n for n in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
                "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")
    if isinstance(getattr(torch, n, None), torch.dtype)
)
FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")
REQUIRED = ("format", "format_version", "llmquant_version", "quantized_layers", "tensors")


def _canonical(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != DIGEST_FIELD}
    # through JSON once, so the digest of what save holds in memory (tuples, ...) equals that of what is read back
    return json.dumps(json.loads(json.dumps(body)), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON (sorted keys, no spaces) of ``manifest`` without ``manifest_sha256``."""
    return hashlib.sha256(_canonical(manifest).encode("ascii")).hexdigest()


def check_digest(manifest: Mapping[str, Any], where: str) -> None:
    """Compare the recorded ``manifest_sha256`` with the manifest; manifests written before llmquant recorded
    it (no such field) pass."""
    if DIGEST_FIELD not in manifest:
        return
    want = manifest[DIGEST_FIELD]
    if not isinstance(want, str) or not _HEX64.fullmatch(want):
        raise CorruptFileError(f"{where}: {DIGEST_FIELD} must be 64 hex digits, got {_short(want)}; the manifest is damaged")
    if manifest_digest(manifest) != want:
        raise CorruptFileError(f"{where} fails its {DIGEST_FIELD} check: the manifest was edited or damaged after it "
                               "was saved; restore the folder or quantize again")


# ---- small typed readers ------------------------------------------------------------------------------
def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


class _Where:
    def __init__(self, where: str):
        self.where = where

    def fail(self, what: str) -> CorruptFileError:
        return CorruptFileError(f"{self.where}: {what}; the manifest is damaged or was edited, quantize again")

    def dict(self, v: Any, what: str) -> dict:
        if not isinstance(v, dict):
            raise self.fail(f"{what} must be a JSON object, got {type(v).__name__}")
        return v

    def int(self, v: Any, what: str, lo: int = 0, hi: int = MAX_DIM) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise self.fail(f"{what} must be an integer in [{lo}, {hi}], got {_short(v)}")
        return v

    def bool(self, v: Any, what: str) -> bool:
        if not isinstance(v, bool):
            raise self.fail(f"{what} must be true or false, got {_short(v)}")
        return v

    def str(self, v: Any, what: str, *, none: bool = False) -> str | None:
        if v is None and none:
            return None
        if not isinstance(v, str):
            raise self.fail(f"{what} must be a string{' or null' if none else ''}, got {_short(v)}")
        return v

    def name(self, v: Any, what: str) -> str:
        if not isinstance(v, str) or not _NAME.fullmatch(v):
            raise self.fail(f"{what} {_short(v)} is not a module or tensor name (dotted path)")
        return v

    def choice(self, v: Any, what: str, options, *, none: bool = False) -> Any:
        if v is None and none:
            return None
        if not isinstance(v, str) or v not in options:
            raise self.fail(f"{what} must be one of {sorted(options)}{' or null' if none else ''}, got {_short(v)}")
        return v

    def parse(self, fn, v: Any, what: str):
        """``fn(v)`` (a ``from_dict``) with its complaints about ``v`` as CorruptFileError."""
        try:
            return fn(v)
        except CorruptFileError:
            raise
        except (LLMQuantError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise self.fail(f"{what} is invalid ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


# ---- the manifest ---------------------------------------------------------------------------------------
def _tensor_records(w: _Where, tensors: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for name, rec in w.dict(tensors, "tensors").items():
        w.name(name, "tensor")
        rec = w.dict(rec, f"tensors[{name!r}]")
        for k in ("shape", "dtype", "sha256"):
            if k not in rec:
                raise w.fail(f"tensors[{name!r}] has no {k!r}")
        shape = rec["shape"]
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise w.fail(f"tensors[{name!r}].shape must be a list of at most {MAX_NDIM} integers, got {_short(shape)}")
        dims = tuple(w.int(d, f"tensors[{name!r}].shape[{i}]") for i, d in enumerate(shape))
        w.choice(rec["dtype"], f"tensors[{name!r}].dtype", TENSOR_DTYPES)
        if not isinstance(rec["sha256"], str) or not _HEX64.fullmatch(rec["sha256"]):
            raise w.fail(f"tensors[{name!r}].sha256 must be 64 hex digits, got {_short(rec['sha256'])}")
        out[name] = (dims, rec["dtype"])
    return out


def _scheme(w: _Where, v: Any, what: str):
    from ..schemes import QuantScheme
    from ..schemes.scheme import SCALE_DTYPES

    d = w.dict(v, what)
    for k in ("symmetric", "dynamic", "restricted_range", "signed_scale"):  # QuantScheme takes any truthy value
        if k in d:
            w.bool(d[k], f"{what}.{k}")
    if "scale_dtype" in d:
        w.choice(d["scale_dtype"], f"{what}.scale_dtype", SCALE_DTYPES)
    return w.parse(QuantScheme.from_dict, d, what)


def _quant_linear(w: _Where, name: str, e: dict):
    from ..modules import QuantLinear

    what = f"quantized_layers[{name!r}]"
    for k in ("in_features", "out_features", "bias", "scheme", "activation"):
        if k not in e:
            raise w.fail(f"{what} has no {k!r}")
    i, o = (w.int(e[k], f"{what}.{k}", 1, MAX_FEATURES) for k in ("in_features", "out_features"))
    bias = w.bool(e["bias"], f"{what}.bias")
    bias_dtype = w.choice(e.get("bias_dtype"), f"{what}.bias_dtype", FLOAT_DTYPE_NAMES, none=True)
    scheme = _scheme(w, e["scheme"], f"{what}.scheme")
    act = None if e["activation"] is None else _scheme(w, e["activation"], f"{what}.activation")
    with torch.device("meta"):  # shapes and dtypes only: nothing is allocated
        return w.parse(lambda _: QuantLinear(i, o, scheme, bias=bias, activation_scheme=act,
                                             bias_dtype=getattr(torch, bias_dtype or "float32")), e, what)


def _mixed_module(w: _Where, name: str, e: dict):
    from ..modules import MANIFEST_MODULES

    what = f"mixed_modules[{name!r}]"
    kind = w.choice(e.get("type"), f"{what}.type", MANIFEST_MODULES)
    if kind == "FloatLinear":
        for k in ("in_features", "out_features", "dtype", "bias"):
            if k not in e:
                raise w.fail(f"{what} has no {k!r}")
        for k in ("in_features", "out_features"):
            w.int(e[k], f"{what}.{k}", 1, MAX_FEATURES)
        w.bool(e["bias"], f"{what}.bias")
        w.choice(e.get("bias_dtype"), f"{what}.bias_dtype", FLOAT_DTYPE_NAMES, none=True)
    else:
        for k in ("num_embeddings", "embedding_dim"):
            if k not in e:
                raise w.fail(f"{what} has no {k!r}")
            w.int(e[k], f"{what}.{k}", 1, MAX_FEATURES)
        pad = e.get("padding_idx")
        if pad is not None:
            n = e["num_embeddings"]
            w.int(pad, f"{what}.padding_idx", -n, n - 1)
        if kind == "QuantEmbedding":
            _scheme(w, e.get("scheme"), f"{what}.scheme")
    if kind != "QuantEmbedding":
        w.choice(e.get("dtype"), f"{what}.dtype", FLOAT_DTYPE_NAMES)
    with torch.device("meta"):
        return w.parse(MANIFEST_MODULES[kind].from_manifest, e, what)


def validate_manifest(manifest: Any, where: str = "llmquant.json", model_config=None) -> dict:
    """Check ``manifest`` (the parsed ``llmquant.json``) field by field; with ``model_config`` (the folder's
    transformers config) also check that its layers and tensors are the ones that model has. Returns the
    manifest; raises :class:`CorruptFileError` saying which field is wrong."""
    w = _Where(where)
    if not isinstance(manifest, dict):
        raise CorruptFileError(f"{where} holds a JSON {type(manifest).__name__}, not an llmquant manifest (an object)")
    if manifest.get("format") != "llmquant":
        raise CorruptFileError(f"{where} is not an llmquant manifest (no \"format\": \"llmquant\")")
    check_format_version(manifest.get("format_version"), where, manifest.get("llmquant_version"))
    check_digest(manifest, where)
    for k in REQUIRED:
        if k not in manifest:
            raise w.fail(f"the field {k!r} is missing")
    w.str(manifest["llmquant_version"], "llmquant_version")
    for k in ("created", "base_model", "model_class", "model_type"):
        w.str(manifest.get(k), k, none=True)
    tensors = _tensor_records(w, manifest["tensors"])
    aliases = w.dict(manifest.get("aliases") or {}, "aliases")
    for a, src in aliases.items():
        w.name(a, "alias")
        w.name(src, f"aliases[{a!r}]")
        if src not in tensors:
            raise w.fail(f"alias {a!r} points at {src!r}, which is not among the tensors")
        if a in tensors:
            raise w.fail(f"{a!r} is both a tensor and an alias")
    modules = {}
    for name, e in w.dict(manifest["quantized_layers"], "quantized_layers").items():
        w.name(name, "quantized layer")
        modules[name] = _quant_linear(w, name, w.dict(e, f"quantized_layers[{name!r}]"))
    for name, e in w.dict(manifest.get("mixed_modules") or {}, "mixed_modules").items():
        w.name(name, "mixed-precision module")
        if name in modules:
            raise w.fail(f"{name!r} is both a quantized layer and a mixed-precision module")
        modules[name] = _mixed_module(w, name, w.dict(e, f"mixed_modules[{name!r}]"))
    if manifest.get("config") is not None:
        from ..schemes import QuantConfig

        w.parse(QuantConfig.from_dict, w.dict(manifest["config"], "config"), "config")
    if manifest.get("plan") is not None:
        from ..schemes import Plan

        w.parse(Plan.from_dict, w.dict(manifest["plan"], "plan"), "plan")
    if model_config is not None:
        _check_against_model(w, manifest, model_config, modules, tensors, aliases)
    return manifest


def check_format_version(version: Any, where: str, written_by: Any = None) -> int:
    """``version`` (a folder's format version) if this llmquant reads it: every version from 1 (folders written
    before transformers could load them still load with ``llmquant.load``) up to the one it writes."""
    from ..errors import NewerFormatError
    from ..io.folder import FORMAT_VERSION
    from ..version import __version__

    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptFileError(f"{where}: format_version must be a positive integer, got {_short(version)}; the "
                               "folder is damaged, quantize again")
    if version > FORMAT_VERSION:
        by = f" (llmquant {written_by})" if isinstance(written_by, str) else ""
        raise NewerFormatError(f"{where} is in llmquant format version {version}, written by a newer llmquant{by}; "
                               f"this llmquant {__version__} reads versions 1 to {FORMAT_VERSION}: upgrade llmquant "
                               "(pip install -U llmquant)")
    return version


def _check_against_model(w: _Where, manifest: dict, model_config, modules: dict, tensors: dict, aliases: dict) -> None:
    """Build the model of ``model_config`` on the meta device with the recorded modules in place (as ``load``
    does) and compare its state dict with the recorded tensors and aliases."""
    import torch.nn as nn
    from transformers import AutoModelForCausalLM

    from ..modules import QuantLinear, replace_module

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptFileError(f"{w.where}: the folder's config.json does not describe a model transformers can "
                               f"build ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    from ..modules.experts import unfuse_for_names

    unfuse_for_names(model, [*modules, *tensors])  # experts saved one linear per expert, as load rebuilds them
    own: dict[str, torch.Tensor] = {}  # tensors of llmquant's modules: their dtype is part of the format
    for name, new in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise w.fail(f"layer {name!r} has no place in the model config.json describes") from None
        from ..models import is_linear

        lin = isinstance(new, QuantLinear) or type(new).__name__ == "FloatLinear"
        want = nn.Linear if lin else nn.Embedding
        dims = (new.in_features, new.out_features) if lin else (new.num_embeddings, new.embedding_dim)
        have = ((old.in_features, old.out_features) if isinstance(old, nn.Linear)
                else (old.weight.shape[0], old.nf) if is_linear(old)  # GPT-2's Conv1D: weight (in, out)
                else (old.num_embeddings, old.embedding_dim) if isinstance(old, nn.Embedding) else None)
        if not (is_linear(old) if lin else isinstance(old, want)) or have != dims:
            raise w.fail(f"layer {name!r} is recorded as a {want.__name__} {dims}, the model has {type(old).__name__} "
                         f"{have or ''} there")
        replace_module(model, name, new)
        own.update({f"{name}.{k}": t for k, t in new.state_dict().items()})
    expected = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict().items()}
    recorded = dict(tensors)
    recorded.update({a: tensors[src] for a, src in aliases.items()})
    missing = sorted(set(expected) - set(recorded))
    extra = sorted(set(recorded) - set(expected))
    if missing or extra:
        raise w.fail(f"its tensors do not match the model config.json describes: missing {missing[:3]}, "
                     f"unexpected {extra[:3]}")
    for k, (shape, dtype) in expected.items():
        rshape, rdtype = recorded[k]
        if rshape != shape:
            raise w.fail(f"tensor {k!r} is recorded as {list(rshape)}, the model needs {list(shape)}")
        rdt = getattr(torch, rdtype)
        if k in own and rdt != own[k].dtype:
            raise w.fail(f"tensor {k!r} is recorded as {rdtype}, the layer stores {str(own[k].dtype)[6:]}")
        if k not in own and rdt.is_floating_point != dtype.is_floating_point:
            raise w.fail(f"tensor {k!r} is recorded as {rdtype}, the model needs a {'float' if dtype.is_floating_point else str(dtype)[6:]} tensor")


def check_weights_header(folder, manifest: dict) -> None:
    """Compare the manifest's tensor names, shapes and dtypes with the safetensors headers of the folder's
    weights (one file or shards; the headers only: the sha256 of the data is checked when the tensors are
    loaded). For readers that do not load the tensors (``llmquant inspect``), so they refuse the folders
    ``load`` refuses."""
    from pathlib import Path

    from .folder import _weight_files
    from .shards import TORCH_DTYPES, safetensors_slices

    have = {}
    for f in _weight_files(Path(folder).expanduser()):
        try:
            slices = safetensors_slices(f)
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise CorruptFileError(f"{f} is truncated or corrupt ({e}); quantize again") from None
        for k, sl in slices.items():
            dt = TORCH_DTYPES.get(sl.dtype)
            have[k] = (list(sl.shape), str(dt).replace("torch.", "") if dt is not None else sl.dtype)
    f = Path(folder).expanduser()
    want = manifest["tensors"]
    if set(want) != set(have):
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        raise CorruptFileError(f"{f} does not match its manifest: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, rec in want.items():
        if have[k] != (rec["shape"], rec["dtype"]):
            raise CorruptFileError(f"tensor {k}: file has {have[k][0]} {have[k][1]}, manifest says {rec['shape']} {rec['dtype']}")
