"""QAT checkpoints: the trainable state of the fake-quantized linears, the optimizer state, the step.

One file, ``qat_checkpoint.pt``, replaced atomically (written beside, then renamed), so the file on disk
is always the last good one. It is read with ``torch.load(weights_only=True)``: plain tensors and
containers only, nothing is unpickled. The settings that decide the meaning of the state (scheme, window
length, batch, loss...) are stored too, and a resume with other settings is refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..modules.fake_quant import FakeQuantLinear

log = logging.getLogger(__name__)

CHECKPOINT = "qat_checkpoint.pt"
FORMAT = "llmquant-qat-checkpoint"
VERSION = 1
#: settings a resumed run must share with the run that wrote the checkpoint
MUST_MATCH = ("config", "seq_len", "batch", "grad_accum", "loss", "learn_scales", "lora_rank", "lora_alpha", "seed")


def qat_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of every FakeQuantLinear (float weights, adapters, qparams), keyed by full name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantLinear):
            for k, v in m.state_dict().items():
                out[f"{name}.{k}"] = v.detach().cpu().clone()
    return out


def qat_state_names(model: nn.Module) -> list[str]:
    """The keys :func:`qat_state` gives, without reading any tensor (a sharded model's are not whole)."""
    return [f"{name}.{k}" for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)
            for k in m.state_dict(keep_vars=True)]


def checkpoint_path(folder: str | os.PathLike) -> Path:
    return Path(folder).expanduser() / CHECKPOINT


def save_checkpoint(folder, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, settings: dict,
                    history: dict, *, model_state: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write the checkpoint; ``model_state`` / ``optimizer_state``: the states already gathered (a sharded
    run), else read from ``model`` and ``optimizer``."""
    path = checkpoint_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "settings": settings,
        "history": history,
        "model": qat_state(model) if model_state is None else model_state,
        "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
    }
    clear_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info("QAT checkpoint at step %d: %s", step, path)
    return path


def clear_stale_temporaries(path: Path) -> None:
    """Remove half-written checkpoints (``.NAME.tmp-PID``) of processes that no longer run (a kill during a
    write): up to the size of the model each."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
            if pid == os.getpid():
                raise ProcessLookupError
        except (ValueError, ProcessLookupError):
            tmp.unlink(missing_ok=True)
            log.info("removed %s, left by a run that was killed while writing a checkpoint", tmp)
        except PermissionError:  # another user's live process
            pass


def load_checkpoint(folder) -> dict:
    path = checkpoint_path(folder)
    clear_stale_temporaries(path)
    if not path.is_file():
        raise CheckpointError(f"no QAT checkpoint at {str(path)!r}; run without --resume to start from step 0")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects we do not unpickle
        raise CheckpointError(f"{path} cannot be read ({str(e).splitlines()[0][:200]}); delete it and start again") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT or ck.get("version") != VERSION:
        raise CheckpointError(f"{path} is not an llmquant QAT checkpoint of version {VERSION}")
    return ck


def _recipe_free(settings: dict) -> dict:
    """The settings with the config's method and its knobs left out: the run's own knobs are compared one
    by one (a longer run or another time budget may resume a checkpoint)."""
    cfg = settings.get("config")
    if isinstance(cfg, dict):
        settings = {**settings, "config": {k: v for k, v in cfg.items() if k not in ("method", "method_params")}}
    return settings


def check_settings(saved: dict, now: dict, path) -> None:
    saved, now = _recipe_free(saved), _recipe_free(now)
    diff = [k for k in MUST_MATCH if saved.get(k) != now.get(k)]
    if diff:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff)
        raise CheckpointError(f"the checkpoint in {path} was written with other settings ({detail}); "
                              "use the same settings to resume, or another checkpoint folder")


def restore(model: nn.Module, ck: dict) -> None:
    """Put the checkpoint's QAT tensors into ``model`` (prepared the same way; sharded with FSDP2 or not:
    a shard gets its own rows)."""
    from .fsdp import copy_rows

    mine = qat_state_names(model)
    saved = ck["model"]
    if set(mine) != set(saved):
        missing, extra = sorted(set(mine) - set(saved))[:3], sorted(set(saved) - set(mine))[:3]
        raise CheckpointError(f"checkpoint does not fit this model (missing {missing}, unexpected {extra})")
    mods = dict(model.named_modules())
    with torch.no_grad():
        for key, t in saved.items():
            mod_name, _, attr = key.rpartition(".")
            owner = mods[mod_name]
            cur = getattr(owner, attr)
            if cur.shape != t.shape:
                raise CheckpointError(f"checkpoint tensor {key} has shape {tuple(t.shape)}, the model {tuple(cur.shape)}")
            copy_rows(cur, t.to(cur.device))
