"""QAT-made candidates for the sensitivity (``sensitivity(..., quantizer="qat")``).

A plan applied by quantization-aware training (``Plan(method="qat")``) should be chosen on the damage each
layer keeps *after* training, not on RTN's. For each integer candidate format, one QAT run of a copy of the
model with every planned unit in that format: a uniform plan applied by QAT (:func:`.apply._apply_plan_qat`,
the same code that applies a QAT plan: RTN start, then distillation from the float model as the
:class:`~llmquant.schemes.QATParams` say). Each unit's candidate in that format is its trained, dequantized
weight; its damage is then measured with the rest of the model float, as for RTN / GPTQ / AWQ candidates.

Training text: the tokens of the sensitivity's text *before* its measurement windows (those are its last
``windows x seq_len`` tokens), windows cut from that prefix's end as ``train_qat`` cuts them, so no measured
token was trained on (and the evaluation range at the start of the text stays reserved as always).
``QATParams.text`` does not apply to the candidates; it is carried into the plan, for applying it.

Formats: float formats (bf16 / fp16 / fp32) are rounded, not trained (a QAT plan keeps such layers frozen in
their format); formats QAT cannot train (a k-quant's two-level scales, a stored float minimum as gguf:Q4_1)
are refused up front, since a plan holding them could not be applied by QAT either.

Each format's trained weights (packed codes and scales) are cached on disk next to the sensitivity results
(``<cache>/qat/<key>.pt``), keyed by the model's weights, the training tokens, the units, the format and the
QAT knobs: a second sensitivity over the same candidates (another measure, more label samples, a subset of
the formats) trains nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ...errors import SchemeError
from ...modules import QuantLinear
from ...schemes import Plan, QuantScheme
from ...schemes.formats import fake_weight, format_name

log = logging.getLogger(__name__)
WEIGHTS_VERSION = 1
_STORED = ("qweight", "scale", "zero")


def trainable(fmt) -> bool:
    """Whether QAT can train ``fmt`` (an integer format without k-quant super-blocks or a float minimum)."""
    return isinstance(fmt, QuantScheme) and fmt.super_group is None and fmt.zero_point != "min"


def check_formats(fmts) -> None:
    """Refuse candidates QAT cannot train (a plan holding them could not be applied by QAT)."""
    bad = [format_name(f) for f in fmts if isinstance(f, QuantScheme) and not trainable(f)]
    if bad:
        raise SchemeError(f"quantizer='qat' trains each candidate format; {', '.join(bad)} cannot be trained (a "
                          "k-quant's two-level scales, or a stored float minimum as gguf:Q4_1), and a QAT plan "
                          "could not hold it: leave it out of the candidates (W-presets such as W4G64 train), "
                          "or measure with quantizer='rtn', 'gptq' or 'awq'")


class QATCandidates:
    """``make(fmt, w0, inputs, unit=)`` for the sensitivity scans: a unit's QAT-trained weight in ``fmt``
    (float formats rounded). ``info``: per format, how it was made (seconds, losses, cached or not)."""

    def __init__(self, stored: dict[str, dict[str, dict]], info: dict) -> None:
        self.stored, self.info = stored, info

    def __call__(self, f, w0, inp=None, unit=None):
        if not isinstance(f, QuantScheme):
            return fake_weight(f, w0)
        if unit is None:
            raise SchemeError("QAT candidates are made per unit: the scan must name the unit")
        st = self.stored[format_name(f)][unit.name]
        return dequantized(st, f, tuple(w0.shape)).to(w0.dtype)


def dequantized(st: dict, fmt: QuantScheme, shape: tuple[int, int]) -> torch.Tensor:
    """The float32 weight of packed codes and scales ``st`` (a QuantLinear's / QuantEmbedding's buffers)."""
    q = QuantLinear(shape[1], shape[0], fmt)
    for k in _STORED:
        if k in st:
            setattr(q, k, st[k])
    return q.dequantize_weight(torch.float32)


def _key(fingerprint: str, text_key: str, end: int, units, fmt, params) -> str:
    knobs = {k: v for k, v in params.to_dict().items() if k != "text"}  # text: not what the candidates train on
    blob = {"v": WEIGHTS_VERSION, "model": fingerprint, "text": text_key, "train_tokens": [0, end],
            "units": [list(u.modules) for u in units], "format": format_name(fmt), "params": knobs}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def _train(model: nn.Module, units, fmt, ids: torch.Tensor, params, progress: bool) -> tuple[dict, dict]:
    """One QAT run of a copy of ``model``, every unit in ``fmt``: (each unit's packed buffers, a record)."""
    from .apply import _apply_plan_qat

    name = format_name(fmt)
    plan = Plan.from_layers({m: name for u in units for m in u.modules}, method="qat", params=params)
    m = copy.deepcopy(model)
    t0 = time.perf_counter()
    summary = _apply_plan_qat(m, plan, progress, {"text": ids})
    out = {}
    for u in units:
        mod = m.get_submodule(u.modules[0])
        if not hasattr(mod, "qweight") or getattr(mod, "scheme", None) != fmt:
            raise SchemeError(f"the QAT run in {name} left {u.modules[0]} as a {type(mod).__name__}, not a packed "
                              f"{name} module: it cannot be measured as a QAT candidate")
        out[u.name] = {k: getattr(mod, k).detach().cpu().clone() for k in _STORED if getattr(mod, k, None) is not None}
    losses = summary.calibration["qat"]["losses"]
    rec = {"seconds": time.perf_counter() - t0, "steps": len(losses), "first_loss": losses[0] if losses else None,
           "last_loss": losses[-1] if losses else None, "cached": False}
    del m
    return out, rec


def qat_candidates(model: nn.Module, units, fmts, train_ids: torch.Tensor, params, *, fingerprint: str,
                   text_key: str, folder: Path | None, progress: bool) -> QATCandidates:
    """Train (or read from the cache) each integer format of ``fmts`` on ``train_ids``. A distributed run:
    every rank trains together (:func:`llmquant.train_qat` splits each batch over the ranks), rank 0 decides
    whether the cache holds a format (every rank then reads it) and writes what was trained."""
    from .. import distributed

    check_formats(fmts)
    group = distributed.active()
    end = int(train_ids.numel())
    if end < params.seq_len:
        raise SchemeError(f"QAT candidates train on the text before the sensitivity's windows: {end} tokens, fewer "
                          f"than one training window of {params.seq_len}; give more text, fewer or shorter "
                          "sensitivity windows, or a smaller QAT seq_len")
    stored: dict[str, dict] = {}
    info: dict = {}
    todo = [f for f in fmts if isinstance(f, QuantScheme)]
    for f in tqdm(todo, desc="QAT candidates", disable=not progress, leave=False):
        name = format_name(f)
        if name in stored:
            continue
        path = None if folder is None else folder / "qat" / f"{_key(fingerprint, text_key, end, units, f, params)}.pt"
        hit = path is not None and path.is_file()
        if group is not None:
            hit = bool(group.broadcast(hit, 0, "the QAT candidates' cache"))
        if hit:
            try:
                stored[name] = torch.load(path, map_location="cpu", weights_only=True)
                info[name] = {"cached": True, "file": str(path)}
                log.info("QAT candidates in %s read from %s", name, path)
                continue
            except (OSError, RuntimeError, EOFError) as e:
                if group is not None:
                    raise SchemeError(f"could not read the cached QAT candidates {path} ({e}); delete it") from e
                log.warning("cached QAT candidates %s unreadable (%s); training again", path, e)
        log.info("QAT candidates: training every planned layer in %s (%d steps)", name, params.steps)
        stored[name], info[name] = _train(model, units, f, train_ids, params, progress)
        log.info("QAT candidates in %s: %d steps, loss %.4g -> %.4g, %.0f s", name, info[name]["steps"],
                 info[name]["first_loss"], info[name]["last_loss"], info[name]["seconds"])
        if path is not None and distributed.is_writer():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(stored[name], tmp)
                tmp.replace(path)
                info[name]["file"] = str(path)
            except OSError as e:
                log.warning("could not cache the QAT candidates: %s", e)
    return QATCandidates(stored, info)
