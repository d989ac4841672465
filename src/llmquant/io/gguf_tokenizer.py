"""The tokenizer part of a GGUF file (``tokenizer.ggml.*`` keys), which llama.cpp needs to run a model alone.

Two sources: the GGUF file the model came from (its keys are copied verbatim when its vocabulary has
the tokenizer's size), or a Hugging Face fast tokenizer with a byte-level BPE model (GPT-2 style, as
SmolLM, Llama 3, Qwen use), converted as llama.cpp's ``convert_hf_to_gguf.py`` does: tokens by id,
token types (control for special tokens), merges, special ids and chat template (``gguf.SpecialVocab``).
The pre-tokenizer name (``tokenizer.ggml.pre``) comes from a hash table in that script, which the ``gguf``
package does not ship: it is written as ``default`` (llama.cpp's GPT-2 pre-tokenizer) unless the source GGUF
gives it or ``pre`` names it (e.g. ``smollm``, ``llama-bpe``, ``qwen2``). Converting SmolLM2's tokenizer this
way reproduces the shipped GGUF's tokens, token types, merges, special ids and chat template exactly.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from ..errors import CorruptFileError, ExportError
from .gguf_check import open_gguf, wrap_gguf_errors

log = logging.getLogger(__name__)


def source_gguf(model) -> Path | None:
    """The GGUF file ``model`` was loaded from (the default model's, or a local .gguf), if any."""
    src = getattr(model, "llmquant_source", None)
    if src == "default":
        from .hf import default_model_file

        try:
            return default_model_file()
        except Exception:  # noqa: BLE001  (no default model installed: fall back to the HF tokenizer)
            return None
    if src and str(src).endswith(".gguf") and Path(src).is_file():
        return Path(src)
    return None


def copy_tokenizer_fields(writer, gguf_path: str | os.PathLike) -> int:
    """Copy every ``tokenizer.*`` key of ``gguf_path`` into ``writer``; returns the vocabulary size."""
    from gguf import GGUFValueType

    r = open_gguf(gguf_path)
    n = 0
    with wrap_gguf_errors(gguf_path, "copying its tokenizer"):
        for key, f in r.fields.items():
            if not key.startswith("tokenizer."):
                continue
            if f.types[0] == GGUFValueType.ARRAY:
                if len(f.types) < 2:  # an empty array: its item type is not recorded
                    log.warning("%s: tokenizer key %s is an empty array; not copied", gguf_path, key)
                    continue
                if f.types[1] == GGUFValueType.ARRAY:
                    raise CorruptFileError(f"{gguf_path}: tokenizer key {key!r} is a nested array, which llmquant does not copy")
                vals = f.contents()
                writer.add_key_value(key, vals, GGUFValueType.ARRAY, sub_type=f.types[-1])
                if key == "tokenizer.ggml.tokens":
                    n = len(vals)
            else:
                writer.add_key_value(key, f.contents(), f.types[0])
    return n


def _vocab_size(path: Path) -> int:
    f = open_gguf(path).fields.get("tokenizer.ggml.tokens")
    return 0 if f is None else len(f.data)


def add_tokenizer(writer, tokenizer, model, tokenizer_gguf=None, pre: str | None = None) -> str:
    """Write the tokenizer keys; returns where they came from."""
    src = Path(tokenizer_gguf).expanduser() if tokenizer_gguf else source_gguf(model)
    if tokenizer_gguf and not src.is_file():
        raise ExportError(f"tokenizer GGUF {str(src)!r} does not exist")
    if src is not None:
        n = _vocab_size(src)
        if tokenizer is None or n == len(tokenizer) or tokenizer_gguf:
            copy_tokenizer_fields(writer, src)
            return f"copied from {src.name}"
        log.warning("%s has %d tokens, the tokenizer %d: converting the tokenizer instead", src.name, n, len(tokenizer))
    if tokenizer is None:
        raise ExportError("the model has no tokenizer to write into the GGUF file; save it with one, or pass "
                          "--tokenizer-gguf FILE to copy the tokenizer of another GGUF file")
    add_hf_bpe_tokenizer(writer, tokenizer, getattr(model.config, "vocab_size", None), pre=pre)
    return "converted from the Hugging Face tokenizer"


def add_hf_bpe_tokenizer(writer, tokenizer, n_vocab: int | None = None, pre: str | None = None) -> None:
    import gguf

    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        tj_path = Path(d) / "tokenizer.json"
        if not tj_path.is_file():
            raise ExportError("GGUF export converts fast (tokenizer.json) tokenizers only; pass --tokenizer-gguf FILE")
        tj = json.loads(tj_path.read_text(encoding="utf-8"))
        model = tj.get("model", {})
        if model.get("type") != "BPE" or model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
            raise ExportError("GGUF export converts byte-level BPE (GPT-2 style) tokenizers only; for SentencePiece "
                              "and others pass --tokenizer-gguf FILE (a GGUF of the same model)")
        vocab = tokenizer.get_vocab()
        size = max(max(vocab.values()) + 1, n_vocab or 0)
        rev = {i: t for t, i in vocab.items()}
        added = {a["id"]: a for a in tj.get("added_tokens", [])}
        special_ids = set(getattr(tokenizer, "all_special_ids", []))
        tokens, types = [], []
        for i in range(size):
            if i not in rev:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
            elif i in added or i in special_ids:
                tokens.append(rev[i])
                special = i in special_ids or added.get(i, {}).get("special", False)
                types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            else:
                tokens.append(rev[i])
                types.append(gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre or "default")
        writer.add_add_space_prefix(False)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        sv = gguf.SpecialVocab(Path(d), load_merges=True, n_vocab=len(tokens))
        if "bos" not in sv.add_special_token:
            sv.add_special_token["bos"] = bool(getattr(tokenizer, "add_bos_token", False))
        sv.add_to_gguf(writer, quiet=True)
