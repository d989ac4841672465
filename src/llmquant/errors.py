"""Exceptions a user can cause. Each message says what to do; the CLI prints it as one line."""


class LLMQuantError(Exception):
    """Base class of every error llmquant raises on purpose."""


class SchemeError(LLMQuantError, ValueError):
    """A quantization scheme or config is invalid (bits, group size, granularity...)."""


class ModelNotFoundError(LLMQuantError, FileNotFoundError):
    """A model path does not exist or holds no loadable model."""


class HubUnavailableError(LLMQuantError):
    """A hub id was given but nothing can be fetched offline."""


class CorruptFileError(LLMQuantError):
    """A saved file is truncated, unreadable or does not match its manifest."""


class InvalidWeightsError(LLMQuantError, ValueError):
    """Weights hold NaN or Inf, or have a shape the scheme cannot take."""


class TextError(LLMQuantError, ValueError):
    """A text source is missing, empty, or too short for what was asked."""


class OutputExistsError(LLMQuantError, FileExistsError):
    """The output folder exists and overwriting was not asked for."""


class SelectionError(LLMQuantError, ValueError):
    """A targets/ignore selection matched nothing or named a module that does not exist."""


class UnsupportedModelError(LLMQuantError):
    """A model family the requested path (e.g. the lean runtime) does not run."""


class GenerationError(LLMQuantError, ValueError):
    """Invalid generation arguments (no tokenizer for a text prompt, bad sampling settings...)."""
