"""FSDP2 for QAT (``train_qat(shard=True)`` in a distributed run): the model and the teacher sharded over
the ranks (``fully_shard`` per decoder layer, then the rest as the root's unit), their whole state gathered
for checkpoints, and the whole weights back after training.

A model loaded with ``load_model(..., shard=True)`` holds no weight yet (every parameter on the meta
device, a row source attached): it is sharded as it is, and :func:`fill` then gives each rank's shard its
rows read from the file -- the student's and the teacher's from one read -- so no rank ever holds the
whole float model. FSDP2 shards every parameter along its first dimension (rows), so the fake-quantized
linears' per-row / per-group step sizes are the rows' own: :func:`init_qparams` computes each rank's from
its own rows, the values one process computes for them (per-tensor step sizes, and frozen ones, which are
whole on every rank, come from the linear's weight gathered whole, one linear at a time).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import CorruptFileError
from ..modules.fake_quant import FakeQuantLinear
from . import qat_checkpoint as ckpt


def mesh(group):
    from torch.distributed.device_mesh import DeviceMesh
    import torch.distributed as dist

    cuda = group.backend == "nccl"
    return DeviceMesh.from_group(dist.group.WORLD if cuda or group.pg is None else group.pg, "cuda" if cuda else "cpu")


def shard(model: nn.Module, group) -> None:
    """FSDP2 on ``model`` in place: each decoder layer its own unit (gathered for its forward and backward
    only), then the rest (embeddings, norms, head) as the root's."""
    from torch.distributed.fsdp import fully_shard

    from ..models import arch_for

    m = mesh(group)
    arch = arch_for(model)
    layers = model.get_submodule(arch.layers) if arch is not None else []
    for layer in layers:
        fully_shard(layer, mesh=m)
    fully_shard(model, mesh=m)


def unshard(model: nn.Module, keep: bool = True) -> None:
    """Undo :func:`shard`: every parameter gathered whole (a collective: every rank calls it), the FSDP
    hooks removed and the modules' own classes back, so the model converts, saves and runs as one process's;
    a parameter shared by two modules (a tied head) stays one. ``keep=False``: this rank takes part in the
    gathers (one parameter at a time) but keeps nothing: its parameters are left on the meta device."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    whole: dict[int, nn.Parameter] = {}
    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            state = mod._get_fsdp_state()
            for h in (state._pre_forward_hook_handle, state._post_forward_hook_handle):
                h.remove()
            mod.__class__ = next(c for c in mod.__class__.__bases__ if c is not FSDPModule)
        for name, p in list(mod.named_parameters(recurse=False)):
            if isinstance(p, DTensor):
                if id(p) not in whole:
                    full = p.full_tensor().detach()
                    whole[id(p)] = nn.Parameter(full.clone() if keep else torch.empty_like(full, device="meta"),
                                                requires_grad=p.requires_grad)
                mod._parameters[name] = whole[id(p)]


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def full_optimizer(model: nn.Module, opt) -> dict:
    """The sharded optimizer's whole state in ``opt.state_dict()``'s own form (parameters numbered in
    group order), so a one-process run loads it as it is. A collective; rank 0 gets it, the others {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return {}
    names = _param_names(model)
    order = {names[id(p)]: i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    return {"state": {order[k]: v for k, v in full["state"].items()},
            "param_groups": [{**g, "params": [order[n] for n in g["params"]]} for g in full["param_groups"]]}


def load_full_optimizer(model: nn.Module, opt, saved: dict) -> None:
    """Load an ``opt.state_dict()``-form state (a checkpoint of any number of ranks) into a sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model)
    by_index = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    full = {"state": {by_index[int(k)]: v for k, v in saved["state"].items()},
            "param_groups": [{**g, "params": [by_index[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, opt, full, options=StateDictOptions(full_state_dict=True))


def full_qat_state(model: nn.Module) -> dict:
    """:func:`qat_checkpoint.qat_state` of a sharded model, gathered whole (a collective; rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    wanted = set(ckpt.qat_state_names(model))
    return {k: v for k, v in full.items() if k in wanted}


def local_rows(t) -> tuple[int, int]:
    """``(start, stop)``: the rows (first dimension) of a FSDP2-sharded parameter (a DTensor sharded on
    dim 0, in ``torch.chunk``'s pieces) this rank holds; a plain tensor's are all of them."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return 0, t.shape[0]
    (place,) = t.placements
    if place != Shard(0):
        raise ValueError(f"expected a tensor sharded on its rows, got {t.placements}")
    n, world, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    start = min(rank * -(-n // world), n)
    return start, start + t._local_tensor.shape[0]


def local(t) -> torch.Tensor:
    """This rank's part of a sharded parameter (its storage, for in-place writes); a plain tensor itself."""
    return getattr(t, "_local_tensor", t)


def copy_rows(dst, whole: torch.Tensor) -> None:
    """``dst.copy_(whole)``; into a sharded parameter, this rank's rows of ``whole``."""
    with torch.no_grad():
        local(dst).copy_(whole[slice(*local_rows(dst))] if local(dst) is not dst else whole)


@torch.no_grad()
def fill(model: nn.Module, teacher: nn.Module | None, source) -> None:
    """Give the sharded ``model``'s (and ``teacher``'s) parameters that are still on the meta device this
    rank's rows, read from ``source`` (:class:`llmquant.io.streaming.RowSource`): each tensor read once
    for both (the student's fake-quantized weights start as the teacher's float weights)."""
    models = [m for m in (model, teacher) if m is not None]
    pending = [[n for n, p in m.named_parameters() if p.is_meta] for m in models]
    dev = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    for m in models:  # FSDP re-registers each unit's shards after this (nn.Module._apply)
        m._apply(lambda t: torch.empty_like(t, device=dev) if t.is_meta else t)
    params = [dict(m.named_parameters()) for m in models]
    for name in dict.fromkeys(n for names in pending for n in names):
        holders = [ps[name] for ps, names in zip(params, pending) if name in names]
        start, stop = local_rows(holders[0])
        rows = source.rows(name, start, stop)
        for p in holders:
            if rows.shape != local(p).shape:
                raise CorruptFileError(f"{name} rows {start}:{stop} have shape {tuple(rows.shape)} in the checkpoint, "
                                       f"the model's shard {tuple(local(p).shape)}: the checkpoint is not this config's")
            local(p).copy_(rows)


@torch.no_grad()
def init_qparams(model: nn.Module) -> None:
    """Set the step sizes (and zero points) of the fake-quantized linears whose weights were filled after
    :func:`llmquant.prepare_qat` (``weight_quantizer.initialized`` False), from the filled weights, with the
    observer ``prepare_qat`` was given. Every rank calls it (a weight gathered whole is a collective)."""
    for fq in (m for m in model.modules() if isinstance(m, FakeQuantLinear)):
        wq = fq.weight_quantizer
        if bool(wq.initialized):
            continue
        own_rows = local(wq.scale) is not wq.scale and wq.scheme.granularity != "tensor"
        w = local(fq.weight) if own_rows else (fq.weight.full_tensor() if local(fq.weight) is not fq.weight else fq.weight)
        scale, zero = wq.qparams_of(w, wq.observer)
        for dst, v in ((wq.scale, scale), (wq.zero, zero)):
            if dst is None:
                continue
            if own_rows:
                local(dst).copy_(v.float().reshape(local(dst).shape))
            else:
                copy_rows(dst, v.float().reshape(dst.shape))
        wq.initialized.fill_(True)
