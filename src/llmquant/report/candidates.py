"""The configurations ``llmquant compare`` tries, one builder per configuration.

A builder gets the comparison context and returns the model to measure and what it took: the steps a
user runs, the data it needed, notes (e.g. which kernel computes it).
"""

from __future__ import annotations

import torch

from .runner import Candidate, Context


def _data(ctx: Context, what: str = "calibration") -> str:
    return f"{ctx.profile.calib_samples} x 512 tokens of {what} text"


def _kernels(model) -> str:
    from ..modules import QuantLinear

    names = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            names.add(m.kernel.name)
    return ",".join(sorted(names)) or "torch float"


def fp32(ctx: Context):
    ctx.shared["weight_histogram"] = weight_histogram(ctx.reference)
    return ctx.reference, {"steps": [], "data": "none", "kernel": "torch fp32"}


def rtn(preset: str):
    def build(ctx: Context):
        import llmquant

        m = ctx.load()
        s = llmquant.quantize(m, preset, progress=False)
        return m, {"steps": ["quantize"], "data": "none", "kernel": ",".join(s.kernels),
                   "notes": f"RTN {s.layers[0].scheme}, kernel {','.join(s.kernels)}"}

    return build


def bf16_weights(ctx: Context):
    """Weights stored in bf16 with norms kept in fp32 (mixed precision by storage type)."""
    m = ctx.load()
    for mod in m.modules():
        if isinstance(mod, torch.nn.Linear) or isinstance(mod, torch.nn.Embedding):
            mod.to(torch.bfloat16)
    wrapped = _CastInputs(m)
    return wrapped, {"steps": ["cast"], "data": "none", "kernel": "torch bf16",
                     "notes": "linear and embedding weights in bf16, norms and softmax in fp32"}


class _CastInputs(torch.nn.Module):
    """Runs a model whose linears hold bf16 weights: inputs of each Linear cast to its weight dtype."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config
        self.generation_config = getattr(model, "generation_config", None)
        self.llmquant_tokenizer = getattr(model, "llmquant_tokenizer", None)
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.register_forward_pre_hook(lambda mod, args: (args[0].to(mod.weight.dtype),))
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):  # the residual stream stays fp32
                mod.register_forward_hook(lambda mod, args, out: out.float())

    def forward(self, *a, **kw):
        return self.model(*a, **kw)

    def generate(self, *a, **kw):
        return self.model.generate(*a, **kw)


def weight_histogram(model, layer: str = "model.layers.0.mlp.down_proj") -> dict | None:
    """One row of one layer's weights, and the same values quantized at 16, 8, 4 and 2 bits."""
    from ..schemes import QuantScheme, fake_quantize

    try:
        w = model.get_submodule(layer).weight.detach().float()
    except AttributeError:
        lin = next((n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)), None)
        if lin is None:
            return None
        layer, w = lin, model.get_submodule(lin).weight.detach().float()
    w = w[: max(1, 4096 // w.shape[1] + 1)].reshape(1, -1)[:, :4096]
    q = {"16 bits (fp16)": w.half().float()}
    for bits in (8, 4, 2):
        q[f"{bits} bits (g64)"] = fake_quantize(w, QuantScheme(bits=bits, granularity="group", group_size=64, symmetric=bits != 2))
    return {"layer": layer, "weights": w.flatten().tolist(), "quantized": {k: v.flatten().tolist() for k, v in q.items()}}


def default_candidates() -> list[Candidate]:
    return [
        Candidate("fp32", "fp32", fp32),
        Candidate("PTQ", "PTQ RTN int8 (W8)", rtn("W8")),
        Candidate("PTQ", "PTQ RTN int4 g64 (W4G64)", rtn("W4G64")),
        Candidate("PTQ", "PTQ RTN int4 g32 asym", rtn("W4G32A"), profiles=("full",)),
        Candidate("Mixed", "bf16 weights", bf16_weights),
    ]
