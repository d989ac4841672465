"""What a manifest says the model looks like, put in place: the llmquant modules at their names (before the
weights are loaded into them) and the recipe the model was quantized with (after). Both ``llmquant.load``
and transformers' ``from_pretrained`` (through :mod:`llmquant.io.hf_quantizer`) build a saved model this way.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import CorruptFileError
from ..modules import MANIFEST_MODULES, QuantLinear, replace_module
from ..schemes import QuantScheme


def quant_linear_from_entry(layer: dict) -> QuantLinear:
    """An empty (meta-device) QuantLinear shaped as the manifest's ``quantized_layers`` entry says."""
    with torch.device("meta"):
        return QuantLinear(
            layer["in_features"],
            layer["out_features"],
            QuantScheme.from_dict(layer["scheme"]),
            bias=layer["bias"],
            activation_scheme=None if layer["activation"] is None else QuantScheme.from_dict(layer["activation"]),
            bias_dtype=getattr(torch, layer["bias_dtype"]) if layer.get("bias_dtype") else torch.float32,
        )


def install_modules(model: nn.Module, manifest: dict) -> None:
    """Replace the float modules the manifest names with empty llmquant modules (QuantLinear for each
    quantized layer; FloatLinear / FloatEmbedding / QuantEmbedding for mixed-precision entries). Fused
    mixture-of-experts weights saved one linear per expert are unfused first, as quantizing did."""
    from ..modules.experts import unfuse_for_names

    unfuse_for_names(model, [*manifest["quantized_layers"], *(manifest.get("mixed_modules") or {}),
                             *(manifest.get("tensors") or {})])
    for name, layer in manifest["quantized_layers"].items():
        _replace(model, name, quant_linear_from_entry(layer))
    for name, entry in (manifest.get("mixed_modules") or {}).items():  # bf16/fp16 layers, quantized embeddings
        if entry.get("type") not in MANIFEST_MODULES:
            raise CorruptFileError(f"manifest names module type {entry.get('type')!r} for {name!r}, unknown to this llmquant")
        with torch.device("meta"):
            new = MANIFEST_MODULES[entry["type"]].from_manifest(entry)
        _replace(model, name, new)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    try:
        replace_module(model, name, new)
    except AttributeError:
        raise CorruptFileError(f"manifest names layer {name!r}, which the model config has no place for") from None


def share_aliases(model, manifest: dict) -> None:
    """Make the tensors a folder stores once under two names (a tied embedding and head) one tensor again,
    after a loader that filled each name with its own copy (transformers' from_pretrained)."""
    for name, target in manifest.get("aliases", {}).items():
        mod_name, _, attr = name.rpartition(".")
        tmod_name, _, tattr = target.rpartition(".")
        mod, src = model.get_submodule(mod_name), getattr(model.get_submodule(tmod_name), tattr)
        for store in (mod._parameters, mod._buffers):
            if attr in store:
                store[attr] = src


def attach_recipe(model: nn.Module, manifest: dict) -> None:
    """Give a loaded model what the manifest records about how it was made: its QuantConfig or mixed-precision
    Plan (so it can be saved again, or reproduced) and the base model it came from."""
    if manifest.get("config"):
        from ..schemes import QuantConfig

        model.llmquant_config = QuantConfig.from_dict(manifest["config"])
    if manifest.get("plan"):
        from ..schemes import Plan

        model.llmquant_plan = Plan.from_dict(manifest["plan"])
    model.llmquant_source = manifest.get("base_model")


def file_state(folder, manifest: dict, tensors: dict) -> dict:
    """The folder's tensors by every name the model has for them (aliases included)."""
    state = dict(tensors)
    for alias, src in manifest.get("aliases", {}).items():
        state[alias] = tensors[src]
    return state


def check_loaded(model: nn.Module, folder, manifest: dict) -> None:
    """After another loader (transformers' ``from_pretrained``) filled ``model``: every tensor must be the
    folder's (sha256-checked) tensor, bit for bit and in its saved dtype. Those that are not (a ``dtype=``
    asked of ``from_pretrained`` casts floats, and packed scales must keep theirs) are replaced by the file's."""
    from .folder import _read_tensors

    state = file_state(folder, manifest, _read_tensors(folder, manifest))
    have = model.state_dict()
    missing = sorted(set(state) - set(have))
    if missing or set(have) - set(state):
        raise CorruptFileError(f"the model built from {folder}/config.json does not hold the folder's tensors "
                               f"(missing {missing[:3]}, unexpected {sorted(set(have) - set(state))[:3]})")
    differ = {k: t for k, t in state.items() if have[k].dtype != t.dtype or not torch.equal(have[k].cpu(), t)}
    if differ:
        import logging

        logging.getLogger(__name__).info("%d tensors re-read from %s in their saved dtype", len(differ), folder)
        device = next(iter(have.values())).device
        model.load_state_dict({k: t.to(device) for k, t in differ.items()}, strict=False, assign=True)
        if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in manifest.get("aliases", {}):
            model.tie_weights()
