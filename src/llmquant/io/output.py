"""Writing an llmquant folder (see :mod:`llmquant.io.folder` for the format): a save in progress
(:class:`OutputFolder`), the per-layer checkpoints that let a killed run resume, and :func:`save`.

A save writes into a work folder beside the target and puts it in place in one step at the end, so an
interrupted save never leaves a folder that looks complete and an existing output is replaced only as a
whole; a lock on the output is held for the whole run.

**Resume.** A run of the layer-by-layer pipeline that writes an output (``quantize(..., output=)``, the
CLI) works in ``.OUT.partial`` beside ``OUT`` and, after each finished decoder layer, records a checkpoint
in it (``.llmquant-resume/progress.json``, replaced atomically): the shards written so far (the open
shard's data synced and its size noted), the finished layers' module specs and summary rows, the RNG
state, the settings of the run (config, calibration, model, shard size, version) and, for calibrated
methods, the next layer's inputs (a safetensors file). A run killed at any point leaves that folder; the
same run with ``resume=True`` (``--resume``) checks the settings, cuts the shards back to the checkpoint,
rebuilds the finished layers from the files (memory-mapped, nothing recomputed) and continues from the
next layer: the result is bit-identical to an uninterrupted run. A run without ``resume`` discards such
a folder (with a warning); a failure that is not a kill keeps it (a full disk excepted).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, CorruptFileError, OutputExistsError, OutputLocationError, UnsupportedError
from ..modules import MANIFEST_MODULES, QuantLinear
from ..version import __version__
from .folder import FORMAT_VERSION, MANIFEST
from .layout import install_modules
from .manifest_schema import manifest_digest

log = logging.getLogger(__name__)

RESUME_DIR = ".llmquant-resume"
PROGRESS = "progress.json"
PROGRESS_FORMAT = "llmquant-layer-checkpoint"


def partial_folder(out: str | os.PathLike) -> Path:
    """Where a resumable run writing ``out`` works (and leaves its checkpoint if killed)."""
    out = Path(out).expanduser()
    return out.with_name(f".{out.name}.partial")


def read_progress(out: str | os.PathLike) -> dict | None:
    """The checkpoint of an interrupted run writing ``out`` (see the module docstring), or None."""
    p = partial_folder(out) / RESUME_DIR / PROGRESS
    if not p.is_file():
        return None
    try:
        progress = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise CheckpointError(f"the checkpoint {p} cannot be read ({e}); run without --resume to start over") from None
    if not isinstance(progress, dict) or progress.get("format") != PROGRESS_FORMAT:
        raise CheckpointError(f"{p} is not an llmquant layer checkpoint; run without --resume to start over")
    return progress


def _sync_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically and durably."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

def _tensors_and_aliases(module: nn.Module, prefix: str = "", skip=()) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``module``'s tensors by full name (``prefix`` + its own name), a tensor shared by two names stored once
    (the second listed as an alias of the first); names in ``skip`` are left out."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in module.state_dict(keep_vars=False).items():
        name = f"{prefix}.{name}" if prefix else name
        if name in skip:
            continue
        if t.is_meta:
            raise UnsupportedError(f"tensor {name} has no data (meta device): it was never loaded or was already written")
        key = (t.data_ptr(), tuple(t.shape), t.dtype, tuple(t.stride())) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach()
    return tensors, aliases


def _quant_layers(model: nn.Module) -> dict[str, dict]:
    return {
        name: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
            "bias_dtype": str(m.bias.dtype).replace("torch.", "") if m.bias is not None else None,
            "scheme": m.scheme.to_dict(),
            "activation": None if m.activation_scheme is None else m.activation_scheme.to_dict(),
        }
        for name, m in model.named_modules()
        if isinstance(m, QuantLinear)
    }


def _mixed_modules(model: nn.Module) -> dict[str, dict]:
    return {n: m.manifest_entry() for n, m in model.named_modules() if type(m).__name__ in MANIFEST_MODULES}


class OutputFolder:
    """A save in progress: a temporary folder beside ``folder`` holding a lock on the output. The
    layer-by-layer pipeline writes each finished decoder layer into it (``layer_done``, a pipeline hook:
    the layer's tensors go to disk and, with ``drop``, leave memory); :meth:`finish` writes the rest and
    puts the folder in place in one step. A failure or a kill leaves any previous output as it was."""

    def __init__(self, folder: str | os.PathLike, *, overwrite: bool = False, shard_size=None,
                 drop_written: bool = True, resumable: bool = False, resume: bool = False,
                 settings: dict | None = None) -> None:
        from .shards import OutputLock, ShardWriter, parse_size

        out = Path(folder).expanduser()
        if out.exists() and not out.is_dir():
            raise OutputExistsError(f"{str(out)!r} is a file, not a folder; choose another output folder")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise OutputExistsError(f"{str(out)!r} exists and is not empty; choose another folder or pass overwrite")
        self.out, self.drop_written = out, drop_written
        shard_bytes = parse_size(shard_size, "shard size")
        self.resumable = resumable or resume
        self.settings = {**(settings or {}), "shard_bytes": shard_bytes, "llmquant_version": __version__}
        self.progress: dict | None = None
        self.checkpoint_seconds = 0.0  # time spent writing resume checkpoints
        self.aliases: dict[str, str] = {}
        self.done = False
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            self.lock = OutputLock(out)
        except OSError as e:
            raise OutputExistsError(f"cannot write to {str(out)!r}: {e.strerror or e}") from None
        try:
            if self.resumable:
                self.tmp = partial_folder(out)
                if resume:
                    self.progress = self._check_resumable()
                else:
                    self._discard_partial()
            if self.progress is not None:
                try:
                    self.writer = ShardWriter.restore(self.tmp, shard_bytes, self.progress["writer"])
                except (CorruptFileError, KeyError, TypeError, ValueError) as e:
                    raise CheckpointError(f"the checkpoint in {str(self.tmp)!r} is damaged ({e}); run without "
                                          "--resume to start over") from None
                self.aliases = dict(self.progress["aliases"])
                return
            if self.resumable:
                self.tmp.mkdir()
            else:
                self.tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)  # the finished folder gets a folder's usual mode, not mkdtemp's 0700
        except OSError as e:
            self.lock.release()
            raise OutputExistsError(f"cannot write to {str(out)!r}: {e.strerror or e}") from None
        except BaseException:
            self.lock.release()
            raise
        self.writer = ShardWriter(self.tmp, shard_bytes)

    def _check_resumable(self) -> dict:
        progress = read_progress(self.out)
        if progress is None:
            raise CheckpointError(f"there is no interrupted run to resume for {str(self.out)!r} (no checkpoint in "
                                  f"{str(self.tmp)!r}); run without --resume")
        theirs = progress.get("settings", {})
        differ = sorted(k for k in set(theirs) | set(self.settings) if theirs.get(k) != self.settings.get(k))
        if differ:
            raise CheckpointError(f"the checkpoint in {str(self.tmp)!r} was written by a run with other settings "
                                  f"({', '.join(differ)} differ); run the same command as before with --resume, or "
                                  "run without --resume to start over")
        return progress

    def _discard_partial(self) -> None:
        if not self.tmp.exists():
            return
        try:
            old = read_progress(self.out)
        except CheckpointError:
            old = None
        if old is not None:
            log.warning("discarding the checkpoint of an interrupted run writing %s (%d of %d layers done); pass "
                        "--resume (resume=True) to continue such a run instead", self.out, old["done"], old["total"])
        shutil.rmtree(self.tmp)

    def write_module(self, prefix: str, module: nn.Module, drop: bool | None = None) -> None:
        """Write ``module``'s tensors now (named ``prefix.<name>``); with ``drop`` its tensors then move to
        the meta device so their memory is freed."""
        tensors, aliases = _tensors_and_aliases(module, prefix)
        with self._disk_errors():
            for name, t in tensors.items():
                self.writer.add(name, t)
        self.aliases.update(aliases)
        del tensors
        if self.drop_written if drop is None else drop:
            module.to("meta")

    @contextlib.contextmanager
    def _disk_errors(self):
        """A full disk while writing: one clean error, the partial shards removed at once."""
        try:
            yield
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.abort(keep=False)
            raise OutputLocationError(f"the disk holding {str(self.out)!r} is full ({e.strerror or e}); free space "
                                      "or choose another output folder (any previous output there is untouched)") from None

    def layer_done(self, index: int, prefix: str, layer: nn.Module, summary=None) -> None:
        self.write_module(prefix, layer)

    def resume_point(self, model: nn.Module, path: str, total: int):
        """Where an interrupted run stopped, for the pipeline (None: start at layer 0). The finished
        layers' modules are rebuilt on the meta device (their tensors are in the shards already)."""
        from ..flows.pipeline import ResumePoint
        from ..flows.summary import LayerSummary

        p = self.progress
        if p is None:
            return None
        if p["layers_path"] != path or p["total"] != total:
            raise CheckpointError(f"the checkpoint in {str(self.tmp)!r} is of a model with {p['total']} layers at "
                                  f"{p['layers_path']!r}, not {total} at {path!r}; run without --resume")
        install_modules(model, p)
        for i in range(p["done"]):
            model.get_submodule(f"{path}.{i}").to("meta")
        rows = [LayerSummary(**{**r, "shape": tuple(r["shape"])}) for r in p["rows"]]
        inputs = None
        if p["inputs"] is not None:
            inputs_file = self.tmp / RESUME_DIR / p["inputs"] / "model.safetensors"

            def inputs():
                from safetensors import safe_open

                with safe_open(str(inputs_file), "pt") as f:
                    for j in range(p["batches"]):
                        yield f.get_tensor(f"x{j}")

        rng = torch.tensor(bytearray.fromhex(p["rng"]), dtype=torch.uint8)
        log.info("resuming %s after layer %d of %d", self.out, p["done"], total)
        return ResumePoint(p["done"], rows, list(p["errors"]), inputs, rng)

    def checkpoint(self, model: nn.Module, index: int, path: str, total: int, xs, summary) -> None:
        """After decoder layer ``index`` is written (``layer_done``): record everything a resumed run needs
        to continue from layer ``index + 1``; ``xs``: that layer's inputs (None for data-free methods)."""
        if not self.resumable:
            return
        from .shards import ShardWriter

        t0 = time.perf_counter()
        with self._disk_errors():
            folder = self.tmp / RESUME_DIR
            folder.mkdir(exist_ok=True)
            state = self.writer.state()
            name = None
            if xs is not None and index + 1 < total:
                name = f"inputs-{index + 1:05d}"
                shutil.rmtree(folder / name, ignore_errors=True)
                (folder / name).mkdir()
                w = ShardWriter(folder / name, 1 << 62)
                for j, x in enumerate(xs):
                    w.add(f"x{j}", x)
                w.close()
            done = tuple(f"{path}.{i}." for i in range(index + 1))
            mods = {"quantized_layers": {n: e for n, e in _quant_layers(model).items() if n.startswith(done)},
                    "mixed_modules": {n: e for n, e in _mixed_modules(model).items() if n.startswith(done)}}
            progress = {
                "format": PROGRESS_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "settings": self.settings, "layers_path": path, "total": total, "done": index + 1,
                "writer": state, "aliases": self.aliases, "rows": [r.__dict__ for r in summary.layers],
                "errors": list(summary.layer_errors), "inputs": name, "batches": None if xs is None else len(xs),
                "rng": bytes(torch.get_rng_state().numpy()).hex(), **mods,
            }
            _sync_write(folder / PROGRESS, json.dumps(progress))
            for old in folder.glob("inputs-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        self.checkpoint_seconds += time.perf_counter() - t0
        log.debug("checkpoint after layer %d: %.2fs", index, time.perf_counter() - t0)

    def finish(self, model: nn.Module, tokenizer, *, base_model: str | None = None) -> Path:
        """Write what is not written yet, the manifest, config and tokenizer; put the folder in place."""
        try:
            with self._disk_errors():
                self._complete(model, tokenizer, base_model)
        except BaseException:
            self.abort()
            raise
        self.lock.release()
        log.info("saved %s (resume checkpoints: %.1fs)", self.out, self.checkpoint_seconds)
        return self.out

    def _complete(self, model: nn.Module, tokenizer, base_model: str | None) -> None:
        passthrough = getattr(model, "llmquant_passthrough", None) or {}
        tensors, aliases = _tensors_and_aliases(model, skip=set(self.writer.entries) | set(self.aliases))
        for name, t in tensors.items():
            src = passthrough.get(name)
            self.writer.add(name, src[0] if src is not None and src[1] == t.data_ptr() else t)
        del tensors
        self.aliases.update(aliases)
        entries = self.writer.close()
        _write_side_files(model, tokenizer, self.tmp)
        qcfg = getattr(model, "llmquant_config", None)
        cfg = getattr(model, "config", None)
        manifest = {
            "format": "llmquant",
            "format_version": FORMAT_VERSION,
            "llmquant_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base_model": base_model or getattr(model, "llmquant_source", None),
            "model_class": type(model).__name__,
            "model_type": getattr(cfg, "model_type", None),
            "config": None if qcfg is None else qcfg.to_dict(),
            "quantized_layers": _quant_layers(model),
            "mixed_modules": _mixed_modules(model),
            "plan": None if getattr(model, "llmquant_plan", None) is None else model.llmquant_plan.to_ordered_dict(),
            "aliases": dict(sorted(self.aliases.items())),
            "tensors": dict(sorted(entries.items())),
        }
        manifest["manifest_sha256"] = manifest_digest(manifest)
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        from .model_card import write_model_card

        write_model_card(self.tmp, manifest, self.out.name)
        from .shards import swap_in

        shutil.rmtree(self.tmp / RESUME_DIR, ignore_errors=True)  # the checkpoint lasts until the folder is whole
        swap_in(self.tmp, self.out)
        self.done = True

    def abort(self, keep: bool = True) -> None:
        """Remove the work folder (with ``keep``, a resumable run's checkpoint stays for ``--resume``); the
        previous output (if any) is untouched."""
        if not self.done:
            self.writer.abort()
            progress = self.resumable and keep and (self.tmp / RESUME_DIR / PROGRESS).is_file()
            if progress:
                log.warning("the finished layers are kept in %s: run the same command again with --resume "
                            "(resume=True) to continue from there", self.tmp)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
            self.done = True
        self.lock.release()

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self.done:
            self.abort()


def _write_side_files(model: nn.Module, tokenizer, folder: Path) -> None:
    cfg = getattr(model, "config", None)
    if cfg is not None:  # naming llmquant as the quant_method: transformers' from_pretrained loads the folder
        from .hf_quantizer import config_entry

        cfg.to_json_file(str(folder / "config.json"))
        d = json.loads((folder / "config.json").read_text())
        d["quantization_config"] = config_entry()
        (folder / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(str(folder))
        except Exception as e:  # a generation config that does not validate is not worth failing a save
            log.warning("generation config not saved: %s", e)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def _check_saveable(model: nn.Module) -> None:
    foreign = [n for n, m in model.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
    if foreign:
        raise UnsupportedError(
            f"cannot save {foreign[:3]}: PyTorch's dynamically quantized LSTM/GRU modules have no place in "
            "llmquant's folder format; save the float model and run quantize_dynamic again after loading it"
        )


def save(model: nn.Module, tokenizer, folder: str | os.PathLike, *, overwrite: bool = False,
         base_model: str | None = None, shard_size=None) -> Path:
    """Save a (quantized or float) model with its tokenizer to ``folder``; returns the folder.
    ``shard_size`` (bytes, or a string such as ``"2GB"``): the most each safetensors shard holds."""
    _check_saveable(model)
    with OutputFolder(folder, overwrite=overwrite, shard_size=shard_size) as out:
        return out.finish(model, tokenizer, base_model=base_model)

