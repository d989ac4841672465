"""``train_qat``: a QAT loop users can run without writing one.

Loss: knowledge distillation from the unquantized model (Hinton et al., 2015, "Distilling the knowledge
in a neural network"; as in LLM-QAT, Liu et al., 2023), the mean over positions of
``KL(p_teacher(. | x_<t) || p_student(. | x_<t))`` of the next-token distributions -- the same quantity
llmquant's evaluation reports -- or plain next-token cross-entropy (``loss="ce"``). AdamW (Loshchilov &
Hutter, 2019) with a linear warm-up then cosine decay to a tenth of the learning rate, gradient
accumulation and clipping, optional gradient checkpointing, and a checkpoint every N steps to resume from.
Training windows come from the end of the text (:func:`llmquant.data.windows`), never from the
evaluation range. A NaN/Inf or exploding loss stops the run before the bad step is applied, leaving the
last good checkpoint on disk.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import token_windows, windows as cut_windows
from ..errors import CheckpointError, SchemeError, TrainingDivergedError
from ..resources import PeakMemory, peak_rss_mb, trim_memory
from ..modules.fake_quant import FakeQuantLinear
from ..schemes import QATParams, resolve_config
from . import distributed, fsdp as F2, qat_checkpoint as ckpt
from .qat import convert_qat, has_fake_quant, prepare_qat

log = logging.getLogger(__name__)

LOSSES = ("kl", "ce")


@dataclass
class QATResult:
    """What ``train_qat`` did: steps run (from ``start_step``), per-step losses, time and throughput."""

    steps: int
    start_step: int
    losses: list[float]
    seconds: float
    tokens: int
    trainable_params: int
    stopped_by_time: bool = False
    peak_rss_mb: float = 0.0  # peak resident memory of the training loop, MB (see llmquant.resources)
    setup_peak_rss_mb: float = 0.0  # the process's peak before the training loop (loading, preparing, sharding), MB
    checkpoint: str | None = None
    summary: dict | None = field(default=None)  # convert_qat's QuantSummary.to_dict() when converted

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        return d


def _windows(model, text, tokenizer, seq_len: int, needed: int) -> torch.Tensor:
    """Up to ``needed`` training windows from the end of the text (as many as there is room for); ``text``
    may be 1-D token ids (a tensor), cut the same way."""
    if isinstance(text, torch.Tensor):
        ids = text.flatten().long()
        if ids.numel() < seq_len:
            raise SchemeError(f"the training tokens ({ids.numel()}) do not fill one window of {seq_len}; give more "
                              "text or a shorter seq_len")
        return cut_windows(ids, needed, seq_len, split="calib", at_most=True)
    tokenizer = tokenizer or getattr(model, "llmquant_tokenizer", None)
    return token_windows(tokenizer, text, needed, seq_len, split="calib", purpose="train", at_most=True)


def _batch_indices(n: int, micro: int, batch: int, seed: int) -> torch.Tensor:
    """Window indices of micro-batch ``micro``: epochs of seeded permutations, so a resumed run sees the
    same data as an uninterrupted one."""
    out = []
    for j in range(micro * batch, (micro + 1) * batch):
        epoch, pos = divmod(j, n)
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        out.append(int(torch.randperm(n, generator=g)[pos]))
    return torch.tensor(out)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    t = (step - warmup) / max(steps - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _param_groups(model: nn.Module, lr: float, lr_qparams: float, weight_decay: float):
    """Trainable: the fake-quantized linears' weights (or adapters) and biases, and their qparams.
    Everything else (embeddings, norms, the float lm_head) is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    weights, qparams = [], []
    for m in model.modules():
        if not isinstance(m, FakeQuantLinear):
            continue
        if m.lora_rank > 0:
            weights += [m.lora_a, m.lora_b]
        else:
            weights.append(m.weight)
        if m.bias is not None:
            weights.append(m.bias)
        for mod in (m.weight_quantizer, getattr(m.input_quantizer, "static", None)):
            if mod is not None and mod.learn:
                qparams += [p for p in (mod.scale, mod.zero) if p is not None]
    for p in weights + qparams:
        p.requires_grad_(True)
    groups = [{"params": weights, "lr": lr, "weight_decay": weight_decay, "base_lr": lr}]
    if qparams:
        groups.append({"params": qparams, "lr": lr_qparams, "weight_decay": 0.0, "base_lr": lr_qparams})
    return groups, sum(p.numel() for p in weights + qparams)


def distill_loss(logits: torch.Tensor, ids: torch.Tensor, teacher_logp: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Mean per-position KL(teacher || student) (``kl``) or next-token cross-entropy (``ce``)."""
    if kind == "ce":
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    logp = F.log_softmax(logits.float(), dim=-1)
    return F.kl_div(logp.flatten(0, 1), teacher_logp.flatten(0, 1), log_target=True, reduction="batchmean")


def _logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def train_qat(
    model: nn.Module,
    text=None,
    *,
    config="W4G64",
    tokenizer=None,
    teacher: nn.Module | None = None,
    steps: int = 100,
    lr: float = 5e-5,
    lr_qparams: float | None = None,
    seq_len: int = 256,
    batch: int = 4,
    grad_accum: int = 1,
    loss: str = "kl",
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    warmup: int | None = None,
    learn_scales: bool = True,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    init="mse",
    gradient_checkpointing: bool = False,
    checkpoint_dir=None,
    checkpoint_every: int = 50,
    resume: bool = False,
    max_seconds: float | None = None,
    explode_factor: float = 10.0,
    seed: int = 0,
    convert: bool = True,
    shard: bool = False,
    keep_whole: bool = True,
    progress: bool = True,
) -> QATResult:
    """Fine-tune ``model`` under fake quantization; by default convert it to packed modules at the end.

    ``model``: a float model (prepared here with ``config``; for ``loss="kl"`` a frozen copy of it is the
    teacher) or one already prepared with :func:`prepare_qat` (then pass ``teacher=``). ``text``: None (the
    default text), a ``Path`` to a .txt/.jsonl file, a string, or 1-D token ids (a tensor). One step =
    ``grad_accum`` micro-batches of ``batch`` windows of ``seq_len`` tokens. ``max_seconds`` ends training early
    (a fixed time budget).
    ``checkpoint_dir`` + ``checkpoint_every``: save every N steps (and at the end); ``resume=True`` continues
    from the checkpoint there. A loss that is NaN/Inf, or above ``explode_factor`` x the first step's loss
    (and above 0.1), raises :class:`TrainingDivergedError` before the step is applied.
    ``shard``: in a distributed run, shard the model (and the teacher) over the ranks with FSDP2
    (``fully_shard`` per decoder layer, then the whole model): each rank holds 1/N of the weights,
    gradients and optimizer state between layers instead of a whole copy (DistributedDataParallel);
    checkpoints hold the full state either way, so any number of ranks resumes them. One process: ignored.
    A model from ``load_model(..., shard=True)`` (no weights read yet) is sharded as it is and each rank
    reads only its own rows of every tensor: no process holds the whole model while loading (the same
    training as loading it whole, bit for bit); it needs ``shard=True`` in a distributed run.
    ``keep_whole=False`` (sharded): only rank 0 (the writer) gets the whole trained model back (and converts
    it); the other ranks free their shards and are left with the model on the meta device, so no rank but
    the writer ever holds it whole.
    """
    if loss not in LOSSES:
        raise SchemeError(f"loss must be one of {LOSSES}, got {loss!r}")
    if steps < 1 or batch < 1 or grad_accum < 1 or seq_len < 2:
        raise SchemeError("steps, batch and grad_accum must be >= 1 and seq_len >= 2")
    if resume and checkpoint_dir is None:
        raise CheckpointError("resume needs a checkpoint folder (checkpoint_dir=, or --checkpoint-dir)")
    lr_qparams = lr if lr_qparams is None else lr_qparams
    warmup = min(10, steps // 10) if warmup is None else warmup
    windows = _windows(model, text, tokenizer, seq_len, steps * batch * grad_accum)

    group = distributed.active()
    fsdp = shard and group is not None
    rows = getattr(model, "llmquant_row_source", None)  # load_model(shard=True): the weights are still in the file
    if rows is not None and not fsdp:
        raise SchemeError("the model was loaded with shard=True (its weights are still in the file): train it with "
                          "shard=True in a distributed run (torchrun / --workers), or load it whole")
    prepared = has_fake_quant(model)
    own_teacher = loss == "kl" and teacher is None  # made here: dropped after training, never gathered whole
    if own_teacher:
        if prepared:
            raise SchemeError("the model is already prepared for QAT: pass teacher= (the unquantized model) for loss='kl'")
        teacher = copy.deepcopy(model, {id(rows): rows})  # the row source is shared, not copied
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    if not prepared:
        prepare_qat(model, config, learn_scales=learn_scales, lora_rank=lora_rank, lora_alpha=lora_alpha,
                    init=init, progress=progress)
        cfg = resolve_config(config)
        if cfg.method != "qat":  # the saved recipe: QAT with the knobs of this call
            params = QATParams(
                steps=steps, lr=lr, lr_qparams=lr_qparams, seq_len=seq_len, batch=batch, grad_accum=grad_accum,
                loss=loss, weight_decay=weight_decay, max_grad_norm=max_grad_norm, warmup=warmup,
                learn_scales=learn_scales, lora_rank=lora_rank, lora_alpha=lora_alpha,
                init=init if isinstance(init, str) else "custom", gradient_checkpointing=gradient_checkpointing,
                max_seconds=max_seconds, seed=seed, text=str(text) if isinstance(text, Path) else None)
            model.llmquant_qat["config"] = cfg.with_(method="qat", method_params=params).to_dict()
    qat = getattr(model, "llmquant_qat", {})
    settings = {
        "config": qat.get("config", resolve_config(config).to_dict()),
        "seq_len": seq_len, "batch": batch, "grad_accum": grad_accum, "loss": loss,
        "learn_scales": qat.get("learn_scales", learn_scales), "lora_rank": qat.get("lora_rank", lora_rank),
        "lora_alpha": qat.get("lora_alpha", lora_alpha), "seed": seed,
        "steps": steps, "lr": lr, "lr_qparams": lr_qparams, "weight_decay": weight_decay,
    }
    groups, n_train = _param_groups(model, lr, lr_qparams, weight_decay)
    ck = None
    if resume:
        ck = ckpt.load_checkpoint(checkpoint_dir)
        ckpt.check_settings(ck["settings"], settings, checkpoint_dir)
        if rows is None:
            ckpt.restore(model, ck)
    if fsdp:  # the optimizer is made on the sharded parameters
        F2.shard(model, group)
        if teacher is not None:
            F2.shard(teacher, group)
        if rows is not None:  # each rank reads its own rows of every tensor, then the step sizes of its rows
            F2.fill(model, teacher, rows)
            with group._guard("the initial step sizes"):  # a per-tensor one gathers its weight whole
                F2.init_qparams(model)
            for m in (model, teacher):
                if m is not None and hasattr(m, "llmquant_row_source"):
                    del m.llmquant_row_source
            rows = None  # the file's mapping (GGUF) goes with it
            if ck is not None:
                ckpt.restore(model, ck)
        trim_memory()  # the whole weights the shards replaced go back to the system
        groups, n_train = _param_groups(model, lr, lr_qparams, weight_decay)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    start, history = 0, {"losses": []}
    if ck is not None:
        if fsdp:
            F2.load_full_optimizer(model, opt, ck["optimizer"])
        else:
            opt.load_state_dict(ck["optimizer"])
        for g, base in zip(opt.param_groups, (lr, lr_qparams)):  # the learning rates asked for now
            g["base_lr"] = base
        start, history = ck["step"], ck["history"]
        log.info("resumed QAT from step %d (%s)", start, ckpt.checkpoint_path(checkpoint_dir))
        if start >= steps:
            log.warning("the checkpoint is at step %d, and %d steps were asked: nothing to train", start, steps)

    dev = next(p.device for p in model.parameters())
    if gradient_checkpointing:
        _checkpointing_methods(model)[0]()
    model.train()
    if group is not None:
        if batch < group.world:
            raise SchemeError(f"a distributed QAT run splits each micro-batch over the ranks: batch ({batch}) must be "
                              f"at least the number of ranks ({group.world})")
        progress = progress and group.rank == 0
    student = model if group is None or fsdp else _ddp(model, group)
    # FSDP's own collectives (gathers in the forward, reduce-scatters in the backward): a rank that stops
    # answering becomes the same one clean error as llmquant's collectives give
    guard = group._guard if fsdp else (lambda what: contextlib.nullcontext())
    losses = list(history["losses"])
    first = losses[0] if losses else None
    tokens, t0, stopped_by_time = 0, time.perf_counter(), False
    last_saved = ckpt.checkpoint_path(checkpoint_dir) if (checkpoint_dir and resume) else None
    bar = tqdm(total=steps, initial=start, desc=f"qat ({settings['config']['weight'].get('bits')}-bit, {loss})",
               disable=not progress)
    setup_peak = peak_rss_mb()
    with PeakMemory() as mem:
        try:
            for step in range(start, steps):
                if group is not None:
                    group.where = f"QAT step {step + 1}"
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * _lr_factor(step, steps, warmup)
                opt.zero_grad(set_to_none=True)
                step_loss = 0.0
                for a in range(grad_accum):
                    ids = windows[_batch_indices(windows.shape[0], step * grad_accum + a, batch, seed)]
                    share = 1.0
                    if group is not None:  # this rank's windows of the micro-batch, weighted by their share
                        share = len(group.mine(batch)) / batch
                        ids = ids[group.mine(batch)]
                    ids = ids.to(dev)
                    t_logp = None
                    if loss == "kl":
                        with torch.no_grad(), guard("the teacher's sharded forward"):
                            t_logp = F.log_softmax(_logits(teacher, ids).float(), dim=-1)
                    sync = group is None or a == grad_accum - 1
                    if fsdp:
                        student.set_requires_gradient_sync(sync)
                    with (contextlib.nullcontext() if sync or fsdp else student.no_sync()), guard("the sharded forward/backward"):
                        lval = distill_loss(_logits(student, ids), ids, t_logp, loss) * (share / grad_accum)
                        # DistributedDataParallel averages the ranks' gradients: scaled by the number of ranks,
                        # their sum is the gradient of the whole micro-batch's loss
                        (lval * (group.world if group is not None else 1)).backward()
                    part = float(lval.detach())
                    if group is not None:  # every rank sees the same loss (the checks below agree)
                        part = float(group.sum_(torch.tensor([part], dtype=torch.float64), "the QAT loss").item())
                    if not math.isfinite(part):
                        _diverged(f"the loss became {part} at step {step + 1}", last_saved)
                    step_loss += part
                    tokens += ids.numel()
                params = [p for g in opt.param_groups for p in g["params"]]
                with guard("the sharded gradient norm"):
                    gnorm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
                    gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm  # every rank's part
                if not torch.isfinite(gnorm):
                    _diverged(f"the gradient norm became {float(gnorm)} at step {step + 1}", last_saved)
                if first is None:
                    first = step_loss
                if step_loss > explode_factor * first and step_loss > 0.1:
                    _diverged(f"the loss exploded to {step_loss:.4g} at step {step + 1} "
                              f"({explode_factor:g}x the first step's {first:.4g})", last_saved)
                opt.step()
                losses.append(step_loss)
                el = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tokens / max(el, 1e-9):.0f}")
                done = step + 1
                if checkpoint_dir and checkpoint_every and (done % checkpoint_every == 0 or done == steps):
                    last_saved = _save(checkpoint_dir, model, opt, done, settings, losses, group, fsdp)
                over = max_seconds is not None and el > max_seconds and done < steps
                if group is not None:  # rank 0's clock decides, so every rank stops at the same step
                    over = bool(group.broadcast(over, 0, "the time budget"))
                if over:
                    stopped_by_time = True
                    log.info("time budget of %.0f s used after %d steps", max_seconds, done)
                    if checkpoint_dir:
                        last_saved = _save(checkpoint_dir, model, opt, done, settings, losses, group, fsdp)
                    break
        finally:
            bar.close()
            if gradient_checkpointing:
                _checkpointing_methods(model)[1]()
            model.eval()
    if own_teacher:
        teacher = None  # its shards (or its copy) go now
    whole_here = not fsdp or keep_whole or group.rank == 0
    if fsdp:  # whole weights again (on rank 0 alone, keep_whole=False): converted and saved as from one process
        trim_memory()  # first the training loop's freed activations go back to the system
        F2.unshard(model, keep=whole_here)
        if teacher is not None:  # the caller's teacher, given back whole
            F2.unshard(teacher)
    seconds = time.perf_counter() - t0
    res = QATResult(
        steps=len(losses), start_step=start, losses=losses, seconds=seconds, tokens=tokens,
        trainable_params=n_train, stopped_by_time=stopped_by_time, peak_rss_mb=mem.peak_mb,
        setup_peak_rss_mb=setup_peak,
        checkpoint=None if last_saved is None else str(last_saved),
    )
    log.info("QAT: %d steps, loss %.4f -> %.4f, %.0f s, %.0f tokens/s", res.steps,
             losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"), seconds, res.tokens_per_s)
    if convert and whole_here:
        res.summary = convert_qat(model, progress=progress).to_dict()
    return res


def _ddp(model: nn.Module, group):
    """``model`` wrapped in DistributedDataParallel (gradients averaged over the ranks as they are made)."""
    from torch.nn.parallel import DistributedDataParallel

    dev = next(p.device for p in model.parameters())
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   process_group=group.pg)


def _save(folder, model, opt, done: int, settings: dict, losses: list, group, fsdp: bool = False):
    """A checkpoint at step ``done`` (written by rank 0; the others wait for it, so a resume finds it). A
    sharded run gathers the whole state first (every rank takes part), so the file is the same either way."""
    path = None
    states = (F2.full_qat_state(model), F2.full_optimizer(model, opt)) if fsdp else (None, None)
    if group is None or group.rank == 0:
        path = ckpt.save_checkpoint(folder, model, opt, done, settings, {"losses": losses},
                                    model_state=states[0], optimizer_state=states[1])
    if group is not None:
        group.check(f"the checkpoint at step {done}")
        path = ckpt.checkpoint_path(folder)
    return path


def _checkpointing_methods(model):
    """(enable, disable) of a Hugging Face model's gradient (activation) checkpointing, non-reentrant."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        return (lambda: model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw),
                model.activation_checkpointing_disable)
    if hasattr(model, "gradient_checkpointing_enable"):
        return (lambda: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw),
                model.gradient_checkpointing_disable)
    raise SchemeError("this model has no gradient checkpointing support; train without it")


def _diverged(what: str, last_saved) -> None:
    keep = (f"the last good checkpoint is {last_saved}; resume from it with a lower learning rate"
            if last_saved else "no checkpoint was written yet; lower the learning rate and start again")
    raise TrainingDivergedError(f"QAT stopped: {what}; {keep}")
