"""File formats: model loading, llmquant folders, GGUF / compressed-tensors. The only layer (with models/) that imports
transformers."""

from . import shards
from .folder import attach_saved, load, read_manifest, read_recipe
from .output import OutputFolder, partial_folder, read_progress, save
from .compressed_tensors import export_compressed_tensors
from .gguf_export import GGUFExportReport, export_gguf
from .gguf_import import GGUFImport, load_gguf_packed
from .hf import DEFAULT_MODEL_NAME, default_model_file, load_float_model, plain_copy_of_gguf_model, quiet_transformers
from .loading import load_model, load_saved
from .hf_quantizer import install as _install_hf_loader

_install_hf_loader()  # transformers' from_pretrained loads llmquant folders

__all__ = [
    "GGUFExportReport",
    "OutputFolder",
    "partial_folder",
    "read_progress",
    "attach_saved",
    "GGUFImport",
    "export_compressed_tensors",
    "export_gguf",
    "load_gguf_packed",
    "DEFAULT_MODEL_NAME",
    "default_model_file",
    "load",
    "load_float_model",
    "load_model",
    "load_saved",
    "plain_copy_of_gguf_model",
    "quiet_transformers",
    "read_manifest",
    "read_recipe",
    "save",
]
