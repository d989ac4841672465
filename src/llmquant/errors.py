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


class CalibrationError(LLMQuantError, ValueError):
    """Calibration data or activations are unusable (too little text, a window longer than the model's
    context, NaN/Inf in activations)."""


class UnsupportedArchitectureError(LLMQuantError, ValueError):
    """An algorithm needs per-architecture facts (e.g. which norm feeds which linears) llmquant lacks."""


class ArchitectureMismatchError(UnsupportedArchitectureError):
    """Declared architecture facts (a table entry, or pairs a user passed) disagree with what tracing the
    model's decoder layer finds."""


# SmoothQuant's name for the same condition
MappingError = UnsupportedArchitectureError


class UnsupportedError(LLMQuantError):
    """The operation is not supported for this model or module (e.g. saving PyTorch's dynamic LSTM/GRU)."""


class TrainingDivergedError(LLMQuantError):
    """QAT stopped because the loss (or its gradient) became NaN/Inf or exploded."""


class CheckpointError(LLMQuantError):
    """A QAT checkpoint is missing, damaged, or was written by a run with other settings."""


class BudgetError(LLMQuantError, ValueError):
    """A mixed-precision budget cannot be met (below the smallest plan) or makes no sense (above float size)."""


class ExportError(LLMQuantError, ValueError):
    """A model cannot be written in the asked format as it is (unmappable scheme, unknown architecture...)."""


class UnsupportedModelError(LLMQuantError):
    """A model family the requested path (e.g. the lean runtime) does not run."""


class GenerationError(LLMQuantError, ValueError):
    """Invalid generation arguments (no tokenizer for a text prompt, bad sampling settings...)."""


class EvaluationError(LLMQuantError, ValueError):
    """Invalid evaluation settings (no windows, a window shorter than 2 tokens or longer than the model's context)."""


class UsageError(LLMQuantError, ValueError):
    """A command-line argument is missing, malformed or out of range (the CLI's parser reports it)."""


class OutputLocationError(LLMQuantError, OSError):
    """The output path cannot be written: below an existing file, on a read-only location, or a file where a
    folder is meant (or the other way round)."""


class NewerFormatError(LLMQuantError):
    """A folder was written by a newer llmquant, in a format version this one cannot read."""


class ForeignFormatError(LLMQuantError):
    """A folder holds another tool's quantization (its config.json names another quant_method than llmquant)."""


class DistributedError(LLMQuantError):
    """A distributed run stopped: a rank died, hung past the timeout, or could not join the group."""
