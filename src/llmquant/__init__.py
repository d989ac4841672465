"""llmquant: make LLMs smaller and faster by lowering the precision of their weights and activations.

    import llmquant
    model, tok = llmquant.load_model()                 # SmolLM2-135M-Instruct, no network
    ref, _ = llmquant.load_model()
    summary = llmquant.quantize(model, "W4G64")         # RTN, int4 in groups of 64, packed
    print(llmquant.evaluate(model, reference=ref))      # perplexity, KL, top-1, size
    llmquant.save(model, tok, "out/w4g64")
    model, tok = llmquant.load("out/w4g64")
"""

from __future__ import annotations

from .version import __version__

import logging as _logging

from .errors import LLMQuantError
from .schemes import AWQParams, BlockQATParams, CalibSpec, GPTQParams, PRESETS, QATParams, QuantConfig, QuantScheme, RTNParams, scheme_for
from .schemes import AutoRoundParams, HQQParams
from .modules import QuantLinear
from .flows import METHODS, Method, QuantSummary, register_method
from .flows import convert, prepare
from .flows import quantize_dynamic
from .flows import QATResult, convert_qat, prepare_qat, train_qat
from . import flows as _flows
from .flows.calibrate import _check_config as _check_calibration_config
from .eval import EvalResult, ReferenceLogits, evaluate, model_size
from . import io as _io
from . import data as _data
from .report import compare
from .schemes import Plan
from .flows.mixed import autocast, llama_cpp_plan, plan_mixed_precision, sensitivity, to_half
from .runtime import generate

_logging.getLogger(__name__).addHandler(_logging.NullHandler())


def load_model(path=None, *, dtype=None, packed=False, stream=False, shard=False):
    """``(model, tokenizer)``: the default SmolLM2 model when ``path`` is None, a local Hugging Face folder,
    a local ``.gguf`` file, or a folder saved by :func:`save` (quantized).

    ``packed=True`` (GGUF files only, the default model included): the file's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0
    linears become packed QuantLinear modules holding its own codes and scales, instead of floats.
    ``stream=True`` (a Hugging Face folder with safetensors weights): only the embeddings and the head are
    read now; each decoder layer is read when :func:`quantize` reaches it, so a model larger than memory can
    be quantized by any method that runs layer by layer (bit-identical to loading it whole).
    ``shard=True`` (the same sources): no weight is read now, every parameter stays on the meta device; for
    :func:`train_qat` with ``shard=True`` in a distributed run, whose ranks each read only their own rows
    of every tensor (the same training as loading it whole, without a whole copy in any process)."""
    return _io.load_model(path, dtype=dtype, packed=packed, stream=stream, shard=shard)


def quantize(model, config="W4G128", *, calib=None, tokenizer=None, progress: bool = True, output=None,
             overwrite: bool = False, shard_size=None, max_memory=None, resume: bool = False):
    """Quantize ``model`` in place with ``config``; returns a :class:`QuantSummary`.

    ``config``: a :class:`QuantConfig` whose ``method`` names a registered method (``rtn``, ``gptq``,
    ``awq``, ``static``, ``smoothquant``, ``dynamic``, ``qat``, ``plan``; a list such as ``["awq", "gptq"]``
    composes layer-wise methods), a scheme or preset name (RTN), a dict (a saved manifest's ``config``), a
    mixed-precision :class:`Plan` (or its .json file), or a folder written by :func:`save` (its recipe).
    Calibrated methods take ``calib``: None for the calibration in ``config.calibration`` (default: 64 x 512
    tokens from the end of the default text), a path to a .txt / .jsonl file, or a tensor of token ids
    (windows, seq_len) / float inputs.

    ``output``: a folder to save the quantized model to (as :func:`save` does, atomically), written as the
    work goes: each decoder layer is written when it is finished, and for a model loaded with
    ``stream=True`` it then leaves memory (the returned model reads it back from the folder, memory-mapped).
    ``shard_size`` (e.g. ``"2GB"``): the most each safetensors file holds. A run writing ``output``
    checkpoints each finished decoder layer in ``.OUTPUT.partial`` beside it; if it is killed or fails,
    the same call with ``resume=True`` continues from the last finished layer (same result as a run that was
    never interrupted; a checkpoint of other settings is refused with :class:`~llmquant.errors.CheckpointError`).
    Started by ``torchrun`` (or ``llmquant ... --workers N``) as one of several processes, the calibration
    is split over them (:mod:`llmquant.flows.distributed`): every process gets the same quantized model and
    rank 0 alone writes ``output``.
    ``max_memory`` (e.g. ``"8GB"``): a budget for a layer-by-layer run. Checked against an estimate from the
    model's shapes before any work: refused (:class:`~llmquant.errors.BudgetError`, with the number it needs)
    when one layer and its work do not fit; calibration activations spill to a file on disk when all of
    them do not.
    """
    from pathlib import Path

    group = _flows.distributed.init() if _flows.distributed.launched() else None  # started by torchrun
    if group is not None and group.rank != 0:  # rank 0 alone prints progress and writes the output
        progress, output_here = False, None
    else:
        output_here = output
    if resume and output is None:
        from .errors import UsageError

        raise UsageError("resume=True continues an interrupted run writing an output: give output=")
    if isinstance(config, Path) or (isinstance(config, str) and ("/" in config or config.endswith(".json"))):
        config = _io.read_recipe(config)  # a saved folder's recipe, or a QuantConfig / plan JSON file
    cfg = _flows.registry.resolve(config, model)
    limit = _io.shards.parse_size(max_memory, "max_memory")
    if limit is not None and not all(_flows.registry.get_method(m).streams for m in cfg.methods):
        from .errors import SchemeError

        raise SchemeError(f"max_memory budgets a layer-by-layer run; method {cfg.method!r} does not run layer by layer")
    if _flows.needs_calibration(cfg) and (calib is None or isinstance(calib, (str, Path))):
        spec = cfg.calibration or CalibSpec()
        if calib is not None:
            spec = spec.__class__(**{**spec.to_dict(), "source": str(calib)})
        if cfg.methods[0] in ("static", "smoothquant"):
            _check_calibration_config(cfg)  # before the text is read
        tok = tokenizer or getattr(model, "llmquant_tokenizer", None)
        ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        src = None if spec.source in (None, "default") else Path(spec.source)
        calib = _data.calibration_windows(tok, src, spec.samples, spec.seq_len, context=ctx)
        cfg = cfg.with_(calibration=spec)
    if limit is not None:
        model.llmquant_max_memory = limit
    _read_imatrices(model, cfg)
    if hasattr(model, "save_pretrained"):  # a transformers model: its save_pretrained writes an llmquant folder
        _io.hf_quantizer.bind_save_pretrained(model)
    try:
        if output_here is None:
            return _flows.quantize(model, cfg, calib=calib, progress=progress)
        return _quantize_to(model, cfg, calib, progress, output, overwrite, shard_size, tokenizer, resume)
    finally:
        if limit is not None:
            del model.llmquant_max_memory


def _read_imatrices(model, cfg) -> None:
    """Read the importance matrix files RTN's params name (``RTNParams(observer="imse", imatrix=PATH)``, in a
    config or an rtn plan) onto ``model.llmquant_importance`` ({path: {linear: importance}}), where the
    layer-by-layer methods look them up; a file made for another model is refused here, before any work."""
    from .schemes import Plan

    params = cfg.method_params if isinstance(cfg.method, tuple) else (cfg.method_params,)
    paths = {getattr(p.params if isinstance(p, Plan) else p, "imatrix", None) for p in params} - {None}
    if not paths:
        return
    import torch.nn as nn

    from .io.imatrix import importance_for, read_imatrix

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    model.llmquant_importance = {p: importance_for(model, read_imatrix(p), names) for p in sorted(paths)}


def _run_settings(model, cfg, calib) -> dict:
    """What decides a run's result, for refusing to resume a checkpoint of another run."""
    import hashlib
    import json

    import torch

    h = None
    if isinstance(calib, torch.Tensor):
        t = calib.detach().contiguous().cpu()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
    mcfg = getattr(model, "config", None)
    return {"config": json.loads(json.dumps(cfg.to_dict())), "calibration": None if h is None else h.hexdigest(),
            "model": getattr(model, "llmquant_source", None),
            "model_config": None if mcfg is None else hashlib.sha256(mcfg.to_json_string().encode()).hexdigest()}


def _quantize_to(model, cfg, calib, progress, output, overwrite, shard_size, tokenizer, resume=False):
    _io.output._check_saveable(model)
    streamed = getattr(model, "llmquant_layer_source", None) is not None
    with _io.OutputFolder(output, overwrite=overwrite, shard_size=shard_size, drop_written=streamed, resumable=True,
                          resume=resume, settings=_run_settings(model, cfg, calib)) as out:
        model.llmquant_layer_sink = out
        try:
            summary = _flows.quantize(model, cfg, calib=calib, progress=progress)
        finally:
            del model.llmquant_layer_sink
        out.finish(model, tokenizer or getattr(model, "llmquant_tokenizer", None))
    if any(t.is_meta for t in model.state_dict().values()):  # layers written as they went (streamed, resumed)
        _io.attach_saved(model, output)
    return summary


def load(folder, *, device="cpu"):
    """``(model, tokenizer)`` from a folder written by :func:`save`; logits are bit-identical to the saved model's."""
    return _io.load_saved(folder, device=device)


def save(model, tokenizer, folder, *, overwrite=False):
    """Write ``model`` (packed) and ``tokenizer`` to ``folder`` atomically; see :mod:`llmquant.io.folder`."""
    return _io.save(model, tokenizer, folder, overwrite=overwrite)


def export(model, tokenizer, path, *, format="gguf", overwrite=False, **kw):
    """Write ``model`` for another runtime: ``format="gguf"`` (llama.cpp, one file; keywords ``requant``,
    ``float_type``, ``tokenizer_gguf``) or ``"compressed-tensors"`` (transformers / vLLM, a folder).
    Returns the GGUF export report, or the folder."""
    if format == "gguf":
        return _io.export_gguf(model, tokenizer, path, overwrite=overwrite, **kw)
    if format == "compressed-tensors":
        return _io.export_compressed_tensors(model, tokenizer, path, overwrite=overwrite, **kw)
    from .errors import ExportError

    raise ExportError(f"unknown export format {format!r}; choose gguf or compressed-tensors")


def _calib_windows(model, tokenizer, text, samples, seq_len, windows):
    from .models import context_length

    if windows is not None:
        return windows
    tok = tokenizer or getattr(model, "llmquant_tokenizer", None)
    return _data.calibration_windows(tok, text, samples, seq_len, context=context_length(model))


def calibrate(model, tokenizer=None, text=None, *, samples=64, seq_len=512, windows=None, batch_size=1, progress=True):
    """Run calibration text through a prepared model: ``samples`` windows of ``seq_len`` tokens from the end
    of ``text`` (None: the default text; a Path: a file; a str: the text), disjoint from evaluation windows;
    or the given token ``windows``. Returns the number of tokens seen."""
    wins = _calib_windows(model, tokenizer, text, samples, seq_len, windows)
    return _flows.calibrate(model, wins, batch_size=batch_size, progress=progress)


def quantize_static(model, config, tokenizer=None, text=None, *, samples=64, seq_len=512, windows=None, arch=None,
                    progress=True):
    """Static W8A8 in place (SmoothQuant first when ``config.smooth_alpha`` is set): the ``static`` /
    ``smoothquant`` method of :func:`quantize` on ``samples`` windows of ``seq_len`` tokens from the end of
    ``text`` (None: the default text; a Path: a file; a str: the text), or on the given token ``windows``.
    The config and the text are checked before the first pass. ``arch``: an ``llmquant.models.ArchSpec``
    with the norm -> linears pairs of a model family llmquant has no record of."""
    from .schemes import resolve_config

    config = resolve_config(config)
    if config.method not in ("static", "smoothquant"):
        config = config.with_(method="smoothquant" if config.smooth_alpha is not None else "static")
    _check_calibration_config(config)
    wins = _calib_windows(model, tokenizer, text, samples, seq_len, windows)
    if arch is not None:  # norm -> linears pairs for a family llmquant has no record of
        return _flows.quantize_static(model, config, wins, arch=arch, progress=progress)
    return _flows.quantize(model, config, calib=wins, progress=progress)


__all__ = [
    "__version__",
    "compare",
    "AWQParams",
    "CalibSpec",
    "METHODS",
    "Method",
    "QATParams",
    "BlockQATParams",
    "AutoRoundParams",
    "HQQParams",
    "register_method",
    "scheme_for",
    "GPTQParams",
    "RTNParams",
    "Plan",
    "autocast",
    "llama_cpp_plan",
    "plan_mixed_precision",
    "sensitivity",
    "to_half",
    "export",
    "EvalResult",
    "LLMQuantError",
    "PRESETS",
    "QuantConfig",
    "QuantLinear",
    "QuantScheme",
    "QuantSummary",
    "calibrate",
    "convert",
    "prepare",
    "quantize_static",
    "evaluate",
    "ReferenceLogits",
    "generate",
    "load",
    "load_model",
    "model_size",
    "prepare_qat",
    "convert_qat",
    "train_qat",
    "QATResult",
    "quantize",
    "quantize_dynamic",
    "save",
]
