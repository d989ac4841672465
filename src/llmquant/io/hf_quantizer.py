"""transformers' ``from_pretrained`` / ``save_pretrained`` for llmquant folders.

A folder :func:`llmquant.io.save` writes (format version 2 on) names llmquant in its ``config.json``::

    "quantization_config": {"quant_method": "llmquant", "format_version": 2, "manifest": "llmquant.json"}

and transformers hands such a folder to the quantizer registered here for ``"llmquant"`` (through
``transformers.quantizers.auto.register_quantization_config`` / ``register_quantizer``). Before the weights
load, the quantizer reads and checks the folder's manifest (the one place that records which layers are
quantized, with which scheme) and puts empty QuantLinear (and mixed-precision) modules at those names, so
transformers loads the packed codes, scales and zero points into them; the forward then runs llmquant's
kernels. After loading, the model's tensors are checked against the manifest (names, shapes, dtypes and
sha256, as :func:`llmquant.load` does) and the loaded model's ``save_pretrained`` writes an llmquant folder.

Registration happens when ``transformers.quantizers.auto`` is imported (at once if it already is):
``import llmquant`` does not import transformers itself, which keeps the command line quick to start.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ForeignFormatError, ModelNotFoundError, OutputExistsError, UnsupportedError

log = logging.getLogger(__name__)

QUANT_METHOD = "llmquant"
_registered = False


def config_entry() -> dict:
    """The ``quantization_config`` an llmquant folder's ``config.json`` holds."""
    from .folder import FORMAT_VERSION, MANIFEST

    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "manifest": MANIFEST}


def quant_method_of(folder: str | Path) -> str | None:
    """The ``quant_method`` of ``folder/config.json``'s quantization_config (None without one or unreadable)."""
    import json

    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
        qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    except (OSError, ValueError):
        return None
    return qc.get("quant_method") if isinstance(qc, dict) else None


def refuse_foreign(folder: Path) -> None:
    """Raise when ``folder``'s config.json names another quantization method than llmquant's."""
    method = quant_method_of(folder)
    if method not in (None, QUANT_METHOD):
        raise ForeignFormatError(
            f"{str(folder)!r}: config.json names quant_method {method!r}, so the folder holds another tool's "
            f"quantization, not llmquant's; load it with transformers' from_pretrained (with {method}'s package "
            "installed), or quantize its float original with llmquant")


def register() -> None:
    """Register llmquant's quantization config and quantizer with transformers (once)."""
    global _registered
    if _registered:
        return
    from transformers.quantizers import auto

    config_cls, quantizer_cls = _classes()
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(config_cls)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(quantizer_cls)
    _registered = True


def install() -> None:
    """Make transformers know llmquant folders: now if transformers' quantizers are imported, else when they are."""
    from .._hooks import after_import

    after_import("transformers.quantizers.auto", register)


def bind_save_pretrained(model) -> None:
    """Make ``model.save_pretrained(folder)`` write an llmquant folder (manifest, packed weights, config naming
    llmquant, tokenizer when the model carries one, model card) instead of transformers' own format."""
    import types

    model.save_pretrained = types.MethodType(_save_pretrained, model)


def _save_pretrained(model, save_directory, *, tokenizer=None, max_shard_size=None, push_to_hub=False, **kwargs):
    from ..modules import MANIFEST_MODULES, QuantLinear
    from .folder import MANIFEST
    from .output import save

    if not any(isinstance(m, QuantLinear) or type(m).__name__ in MANIFEST_MODULES for m in model.modules()):
        # a float model: transformers' own format
        return type(model).save_pretrained(model, save_directory, max_shard_size=max_shard_size or "50GB",
                                           push_to_hub=push_to_hub, **kwargs)
    if push_to_hub:
        raise UnsupportedError("llmquant never uploads to a hub: save_pretrained to a local folder, then upload it")
    if kwargs:
        log.info("save_pretrained of an llmquant model ignores %s", sorted(kwargs))
    out = Path(save_directory).expanduser()
    replace = out.is_dir() and (out / MANIFEST).is_file()
    if out.is_dir() and any(out.iterdir()) and not replace:
        raise OutputExistsError(f"{str(out)!r} exists and holds files that are not an llmquant folder; save_pretrained "
                                "to an empty or new folder")
    tok = tokenizer if tokenizer is not None else getattr(model, "llmquant_tokenizer", None)
    return save(model, tok, out, overwrite=replace, shard_size=max_shard_size)


def _classes():
    """The config and quantizer classes (built on first use: they subclass transformers' own)."""
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from .folder import FORMAT_VERSION, MANIFEST

    class LLMQuantConfig(QuantizationConfigMixin):
        """``quantization_config`` of an llmquant folder: which manifest describes its layers."""

        def __init__(self, format_version: int = FORMAT_VERSION, manifest: str = MANIFEST, **kwargs):
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.manifest = manifest

        def to_dict(self) -> dict:
            return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "manifest": self.manifest}

    class LLMQuantHfQuantizer(HfQuantizer):
        """Loads a folder saved by llmquant: packed QuantLinear modules, llmquant's kernels."""

        requires_calibration = True

        def __init__(self, quantization_config, **kwargs):
            if not kwargs.get("pre_quantized", True):
                raise UnsupportedError("from_pretrained cannot quantize with llmquant: load the float model, then "
                                       "llmquant.quantize(model, ...) and save it; from_pretrained loads the result")
            super().__init__(quantization_config, **kwargs)
            self.folder = None
            self.manifest = None

        def validate_environment(self, *args, **kwargs):
            from .manifest_schema import check_format_version

            check_format_version(self.quantization_config.format_version, "config.json's quantization_config")

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            from .folder import read_manifest
            from .layout import install_modules

            if not checkpoint_files:
                raise ModelNotFoundError("config.json names llmquant as its quant_method but the folder holds no "
                                         "safetensors weights: it is not a complete llmquant folder")
            self.folder = Path(checkpoint_files[0]).parent
            self.manifest = read_manifest(self.folder)  # checked, the layers and tensors against config.json
            install_modules(model, self.manifest)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .layout import attach_recipe, check_loaded, share_aliases

            share_aliases(model, self.manifest)  # a tied pair stored once: one tensor again, as llmquant.load gives
            check_loaded(model, self.folder, self.manifest)
            attach_recipe(model, self.manifest)
            bind_save_pretrained(model)
            return model

        def is_serializable(self, safe_serialization=None):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    return LLMQuantConfig, LLMQuantHfQuantizer
