"""The configurations ``llmquant compare`` tries, one builder per configuration.

A builder gets the comparison context and returns the model to measure and what it took: the steps a
user runs, the data it needed, notes (e.g. which kernel computes it).
"""

from __future__ import annotations

import functools

import torch

from ..data import calibration_windows
from ..flows import quantize, quantize_dynamic, train_qat
from ..flows.mixed import autocast as autocast_to, plan_mixed_precision, sensitivity, to_half
from ..models import context_length
from ..modules import QuantLinear
from ..schemes import CalibSpec, QuantConfig, QuantScheme, fake_quantize
from .runner import Candidate, Context


# Build seconds of the slow builders (default model, 2 threads; measured on the quick profile), for the
# progress bar's time-left estimate only.
def COST_GPTQ(p):
    return 3.5 * p.calib_samples


def COST_STATIC(p):
    return 1.2 * p.calib_samples


def COST_QAT(p):
    return 3.1 * p.qat_steps


def COST_MIXED(p):
    return 5 + 8 * p.sensitivity_samples


def _data(ctx: Context, what: str = "calibration") -> str:
    return f"{ctx.profile.calib_samples} x {ctx.profile.seq_len} tokens of {what} text"


def _calib(ctx: Context, model) -> torch.Tensor:
    """The profile's calibration windows (from the end of the default text), as ``llmquant.quantize`` makes them."""
    p = ctx.profile
    return calibration_windows(ctx.tokenizer, None, p.calib_samples, p.seq_len, context=context_length(model))


def _kernels(model) -> str:
    names = set()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            names.add(m.kernel.name)
    return ",".join(sorted(names)) or "torch float"


def fp32(ctx: Context):
    ctx.shared["weight_histogram"] = weight_histogram(ctx.reference)
    return ctx.reference, {"steps": [], "data": "none", "kernel": "torch fp32"}


def rtn(preset: str, autocast: bool = False):
    def build(ctx: Context):
        m = ctx.load()
        ctx.step(f"quantize (RTN {preset})")
        s = quantize(m, preset, progress=False)
        info = {"steps": ["quantize"], "data": "none", "kernel": ",".join(s.kernels),
                "notes": f"RTN {s.layers[0].scheme}, kernel {','.join(s.kernels)}"}
        if autocast:  # run under bf16 autocast: the quantized layers' prefill takes a bf16 GEMM
            info["steps"] = ["quantize", "run under llmquant.autocast('bf16')"]
            info["run_context"] = functools.partial(autocast_to, "bf16")
            info["notes"] += "; run under bf16 autocast (bf16 GEMM for many-token inputs, activations in bf16)"
        return m, info

    return build


def gptq(preset: str):
    def build(ctx: Context):
        m = ctx.load()
        cfg = QuantConfig(weight=preset, method="gptq",
                          calibration=CalibSpec(samples=ctx.profile.calib_samples, seq_len=ctx.profile.seq_len))
        ctx.step(f"calibrate + quantize layer by layer (GPTQ {preset}, {ctx.profile.calib_samples} windows)")
        s = quantize(m, cfg, calib=_calib(ctx, m), progress=False)
        return m, {"steps": ["calibrate (layer by layer)", "quantize"], "data": _data(ctx),
                   "kernel": ",".join(s.kernels), "notes": f"GPTQ {cfg.weight.name}, kernel {','.join(s.kernels)}"}

    return build


def static_smoothquant(ctx: Context):
    m = ctx.load()
    cfg = QuantConfig(method="smoothquant")  # its defaults: W8, per-tensor int8 activations, min-max, alpha 0.8
    ctx.step("smooth + calibrate + convert (static W8A8)")
    s = quantize(m, cfg, calib=_calib(ctx, m), progress=False)
    return m, {"steps": ["smooth (SmoothQuant a=0.8)", "prepare", "calibrate", "convert"], "data": _data(ctx),
               "kernel": ",".join(s.kernels), "notes": "static W8A8: per-tensor activation scales fixed by calibration"}


def dynamic(weight_bits: int = 8, **kw):
    def build(ctx: Context):
        m = ctx.load()
        ctx.step("quantize (dynamic)")
        s = quantize_dynamic(m, weight_bits=weight_bits, progress=False, **kw)
        extra = ", ".join(f"{k}={v}" for k, v in kw.items())
        return m, {"steps": ["quantize"], "data": "none (activation scales computed per token at run time)",
                   "kernel": ",".join(s.kernels), "notes": f"dynamic W{weight_bits}A8 per token {extra}".strip()}

    return build


def qat(preset: str):
    def build(ctx: Context):
        m = ctx.load()
        steps = ctx.profile.qat_steps
        ctx.step(f"train {steps} QAT steps ({preset})")
        r = train_qat(m, None, config=preset, tokenizer=ctx.tokenizer, teacher=ctx.reference, steps=steps,
                               seq_len=min(128, ctx.profile.seq_len), batch=2, lr=5e-5, progress=False)
        return m, {"steps": ["prepare_qat", f"train ({steps} steps, distillation)", "convert"],
                   "data": f"{r.tokens} training tokens from the end of the text",
                   "kernel": _kernels(m),
                   "notes": f"QAT {preset}: {steps} steps x 2 x 128 tokens, KL distillation from fp32, "
                            f"{r.seconds:.0f} s training (a short budget)"}

    return build


def mixed_plan(target_bits: float):
    def build(ctx: Context):
        m = ctx.load()
        ctx.step(f"sensitivity ({ctx.profile.sensitivity_samples} windows)")
        sens = sensitivity(m, None, tokenizer=ctx.tokenizer, samples=ctx.profile.sensitivity_samples,
                                    seq_len=min(128, ctx.profile.seq_len), progress=False)
        names = [u.name for u in sens.units]
        col = next((i for i, c in enumerate(sens.candidates) if str(c).upper() == "W4G64"), 0)
        ctx.shared["sensitivity"] = {n: sens.damage[i][col] for i, n in enumerate(names)}
        ctx.shared["sensitivity_label"] = f"{sens.method} damage at {sens.candidates[col]}"
        ctx.step(f"plan {target_bits} bits/weight + quantize")
        plan = plan_mixed_precision(m, target_bits=target_bits, sensitivity_result=sens)
        s = quantize(m, plan, progress=False)
        return m, {"steps": ["sensitivity", f"plan ({target_bits} bits/weight)", "quantize"],
                   "data": f"{ctx.profile.sensitivity_samples} sensitivity windows", "kernel": ",".join(s.kernels),
                   "notes": f"mixed precision plan at {target_bits} bits/weight over the linears "
                            f"({sens.method} sensitivity, {sens.seconds:.0f} s)"}

    return build


def bf16_storage(ctx: Context):
    m = ctx.load()
    to_half(m, "bf16")
    return m, {"steps": ["cast"], "data": "none", "kernel": "torch bf16",
               "notes": "weights stored in bf16, norms in fp32"}


def bf16_autocast(ctx: Context):
    # The float model itself, run under torch.autocast: nothing is stored differently, so size is fp32's.
    return ctx.reference, {"steps": ["wrap the forward in llmquant.autocast('bf16')"], "data": "none",
                           "kernel": "torch bf16 autocast", "run_context": functools.partial(autocast_to, "bf16"),
                           "notes": "bf16 matmuls under torch.autocast; norms, softmax and the loss in fp32; "
                                    "weights stay fp32 (cast per call)"}


def weight_histogram(model, layer: str = "model.layers.0.mlp.down_proj") -> dict | None:
    """One row of one layer's weights, and the same values quantized at 16, 8, 4 and 2 bits."""
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


#: llama.cpp's own files ``compare --with-llama-cpp`` adds, made by its quantizer from the same float model
LLAMA_CPP_TYPES = ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K")


def llama_cpp_file(file_type: str):
    """llama.cpp's own quantization of the reference model (an F32 GGUF export, then ``llama_model_quantize``
    through the prebuilt wheel), evaluated and timed inside llama.cpp."""

    def build(ctx: Context):
        import tempfile
        from pathlib import Path

        from ..eval.llama_cpp import llama_cpp_quantize
        from ..io.gguf_export import export_gguf

        if "llama_cpp" not in ctx.scratch:
            ctx.scratch["llama_cpp"] = tempfile.mkdtemp(prefix="llmquant-compare-gguf-")
        folder = Path(ctx.scratch["llama_cpp"])
        src = folder / "f32.gguf"
        if not src.exists():
            ctx.step("export F32 GGUF")
            export_gguf(ctx.reference, ctx.tokenizer, src, float_type="F32", progress=False)
        out = folder / f"{file_type}.gguf"
        ctx.step(f"llama-quantize {file_type}")
        llama_cpp_quantize(src, out, file_type, threads=torch.get_num_threads())
        size = out.stat().st_size
        params = sum(p.numel() for p in ctx.reference.parameters())
        return None, {"llama_cpp": str(out), "steps": ["export F32 GGUF", f"llama-quantize {file_type}"], "data": "none",
                      "kernel": "llama.cpp", "size_bytes": size, "bits_per_weight": 8 * size / params,
                      "notes": f"llama.cpp's own {file_type} (its quantizer, file size), run in llama.cpp"}

    return build


def llama_cpp_candidates(types=LLAMA_CPP_TYPES) -> list[Candidate]:
    return [Candidate("llama.cpp", f"llama.cpp {t}", llama_cpp_file(t)) for t in types]


def default_candidates() -> list[Candidate]:
    """Every configuration; ``profiles`` says which profiles run it, ``cost`` estimates its build time
    for the progress bar's time-left estimate."""
    return [
        Candidate("fp32", "fp32", fp32),
        Candidate("PTQ", "PTQ RTN int8 (W8)", rtn("W8")),
        Candidate("PTQ", "PTQ RTN int8 + bf16 autocast", rtn("W8", autocast=True)),
        Candidate("PTQ", "PTQ RTN int4 g64 (W4G64)", rtn("W4G64")),
        Candidate("PTQ", "PTQ RTN int4 g32 asym", rtn("W4G32A"), profiles=("full",)),
        Candidate("PTQ", "PTQ GPTQ int4 g64", gptq("W4G64"), cost=COST_GPTQ),
        Candidate("PTQ", "PTQ GPTQ int3 g32", gptq("W3G32"), profiles=("full",), cost=COST_GPTQ),
        Candidate("PTQ", "PTQ static W8A8 + SmoothQuant", static_smoothquant, cost=COST_STATIC),
        Candidate("Dynamic", "Dynamic W8A8 (per token)", dynamic(8)),
        Candidate("Dynamic", "Dynamic W8A8 + LLM.int8 outliers", dynamic(8, outlier_threshold=6.0), profiles=("full",)),
        Candidate("Dynamic", "Dynamic W4A8 (g128)", dynamic(4), profiles=("full",)),
        Candidate("QAT", "QAT int4 g64", qat("W4G64"), cost=COST_QAT),
        Candidate("QAT", "QAT int3 g32", qat("W3G32"), profiles=("full",), cost=COST_QAT),
        Candidate("Mixed", "Mixed plan 4.5 bits/w", mixed_plan(4.5), cost=COST_MIXED),
        Candidate("Mixed", "Mixed plan 3.5 bits/w", mixed_plan(3.5), profiles=("full",), cost=COST_MIXED),
        Candidate("Mixed", "bf16 weights", bf16_storage),
        Candidate("Mixed", "bf16 autocast", bf16_autocast),
    ]
