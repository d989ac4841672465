"""Mixture-of-experts weights as one linear per expert.

transformers keeps the experts of Mixtral, Qwen2-MoE, Qwen3-MoE (and others laid out the same way) as two
fused 3-D parameters, ``gate_up_proj`` (experts, 2 x intermediate, hidden) and ``down_proj`` (experts,
hidden, intermediate), inside an ``...Experts`` module called with the router's choice
``(hidden_states, top_k_index, top_k_weights)``. :class:`ExpertLinears` holds the same weights as
``nn.Linear`` modules (``gate_up_proj.<e>``, ``down_proj.<e>``, views of the fused tensors: no copy) and
computes the same thing, expert by expert over the tokens routed to it, so every method quantizes each
expert as a linear and gathers its calibration statistics from the tokens the router sends it.

:func:`unfuse_experts` swaps them in (the float model's outputs are unchanged: the same products, as
transformers' eager experts path computes them); a saved model with unfused experts is rebuilt the same way
(:func:`unfuse_for_names`). A fused layout other than this one is left alone (and refused by the selection).
"""

from __future__ import annotations

import torch
import torch.nn as nn

FUSED = ("gate_up_proj", "down_proj")


class ExpertLinears(nn.Module):
    """The experts of one MoE block as linears: ``gate_up_proj[e]`` (hidden -> 2 x intermediate, gate then up)
    and ``down_proj[e]`` (intermediate -> hidden); ``act_fn`` between them."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act_fn: nn.Module,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.num_experts = num_experts
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.gate_up_proj = nn.ModuleList(nn.Linear(hidden, 2 * intermediate, **kw) for _ in range(num_experts))
        self.down_proj = nn.ModuleList(nn.Linear(intermediate, hidden, **kw) for _ in range(num_experts))
        self.act_fn = act_fn

    @classmethod
    def from_fused(cls, mod: nn.Module) -> "ExpertLinears":
        gu, dn = mod.gate_up_proj, mod.down_proj
        e, two_i, h = gu.shape
        with torch.device("meta"):
            new = cls(e, h, two_i // 2, mod.act_fn, dtype=gu.dtype)
        for k in range(e):  # views of the fused tensors: the weights stay where they are
            new.gate_up_proj[k].weight = nn.Parameter(gu.data[k], requires_grad=gu.requires_grad)
            new.down_proj[k].weight = nn.Parameter(dn.data[k], requires_grad=dn.requires_grad)
        return new

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():  # index num_experts: a slot the router left empty (as transformers allows)
            hit = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            used = [e for e in (hit.sum(dim=(-1, -2)) > 0).nonzero().flatten().tolist() if e < self.num_experts]
        for e in used:
            pos, tok = torch.where(hit[e])
            gate, up = self.gate_up_proj[e](hidden_states[tok]).chunk(2, dim=-1)
            y = self.down_proj[e](self.act_fn(gate) * up) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def is_fused_experts(mod: nn.Module) -> bool:
    """A module holding experts in transformers' fused layout (and nothing else to quantize)."""
    params = dict(mod.named_parameters(recurse=False))
    if set(params) != set(FUSED) or not hasattr(mod, "act_fn"):
        return False
    gu, dn = params["gate_up_proj"], params["down_proj"]
    return (gu.dim() == dn.dim() == 3 and gu.shape[0] == dn.shape[0] and gu.shape[2] == dn.shape[1]
            and gu.shape[1] == 2 * dn.shape[2])


def fused_experts(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_fused_experts(m)]


def unfuse_experts(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Swap every fused experts module (or those named) for its :class:`ExpertLinears`; returns their names."""
    from .selection import replace_module

    names = fused_experts(model) if names is None else names
    for n in names:
        replace_module(model, n, ExpertLinears.from_fused(model.get_submodule(n)))
    return names


def unfuse_for_names(model: nn.Module, names) -> list[str]:
    """Unfuse the experts modules that saved tensor or layer ``names`` show were unfused when saved."""
    names = list(names)
    todo = [m for m in fused_experts(model) if any(x.startswith(f"{m}.gate_up_proj.0") for x in names)]
    return unfuse_experts(model, todo)
