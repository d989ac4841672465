"""File formats: model loading, llmquant folders, text sources. The only layer (with models/) that imports
transformers."""

from .folder import load, read_manifest, save
from .hf import DEFAULT_MODEL_NAME, default_model_file, load_float_model, plain_copy_of_gguf_model
from .text import calib_windows, calibration_windows, default_text, eval_windows, read_text, tokenize

__all__ = [
    "DEFAULT_MODEL_NAME",
    "calib_windows",
    "calibration_windows",
    "default_model_file",
    "default_text",
    "eval_windows",
    "load",
    "load_float_model",
    "plain_copy_of_gguf_model",
    "read_manifest",
    "read_text",
    "save",
    "tokenize",
]
