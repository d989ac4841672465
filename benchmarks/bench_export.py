"""GGUF export on the default model: KL vs fp32 of llmquant's Q4_0 / Q8_0-grid models, of the exported GGUF
files read back by another implementation (transformers' GGUF loader, which dequantizes with the gguf
package), and of llama.cpp's reference quantizer (``gguf.quants.quantize``, a port of ggml's
``quantize_row_*_ref``) applied to the same linears; plus the default Q4_1 file imported packed.

llama.cpp itself (llama-cpp-python) is not built here: see BENCHMARKS.md for why and what that leaves open.

    python benchmarks/bench_export.py [--windows 8] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import llmquant
from llmquant.io.ggml_blocks import ggml_type


def gguf_reference_quantize(model, type_name: str) -> None:
    """Replace every decoder linear's weight by llama.cpp's reference quantization (quantize + dequantize)."""
    from gguf import quants

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            w = mod.weight.detach().float().numpy()
            t = ggml_type(type_name)
            mod.weight.data = torch.from_numpy(quants.dequantize(quants.quantize(w, t), t).reshape(w.shape))


def q8_0_activation_hooks(model) -> list:
    """Round every linear's input as llama.cpp's CPU matmul does for Q4_0/Q8_0 weights (vec_dot_type Q8_0):
    blocks of 32 along K, d = max|x| / 127, q = round(x / d), x_hat = q * fp16(d). An emulation of llama.cpp's
    numerics (its F16 KV cache and summation order are not emulated), not llama.cpp itself."""

    def hook(_mod, args):
        x = args[0]
        k = x.shape[-1]
        xb = x.float().reshape(*x.shape[:-1], k // 32, 32)
        d = xb.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d > 0, xb / d, torch.zeros_like(xb))
        q = torch.sign(q) * torch.floor(q.abs() + 0.5)  # roundf: half away from zero
        return ((q * d.half().float()).reshape(x.shape).to(x.dtype),)

    return [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--work", default="/tmp/llmquant-bench-export")
    ap.add_argument("--emulate-llamacpp-activations", action="store_true",
                    help="only: evaluate the exported files (from a previous run in --work) with llama.cpp's Q8_0 "
                         "activation rounding emulated; writes export_gguf_emulated.*")
    ap.add_argument("--llmquant-act", action="store_true",
                    help="only: llmquant's own evaluation of RTN gguf:Q4_0 / gguf:Q8_0 with activation scheme "
                         "gguf:Q8_0-act (llama.cpp's activation rounding); writes export_gguf_act.*")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    import torch.nn.functional as F

    from llmquant import data
    from llmquant.data import default_text, tokenize

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ref, tok = llmquant.load_model()
    rows = []
    wins = data.windows(tokenize(tok, default_text()), args.windows)
    with torch.inference_mode():  # the reference's log-probs once (llmquant.evaluate recomputes them per model)
        ref_logp = [F.log_softmax(ref(w[None]).logits[0, :-1].float(), -1) for w in wins]

    def ev(label, model, **extra):
        """KL(p_fp32 || p_model) averaged over predicted positions, perplexity, top-1: llmquant.evaluate's
        definitions, with the reference computed once."""
        t0 = time.perf_counter()
        nll = kl = agree = n = 0.0
        with torch.inference_mode():
            for w, rl in zip(wins, ref_logp):
                lp = F.log_softmax(model(w[None]).logits[0, :-1].float(), -1)
                nll += float(F.nll_loss(lp, w[1:], reduction="sum"))
                kl += float(F.kl_div(lp, rl, log_target=True, reduction="sum"))
                agree += float((lp.argmax(-1) == rl.argmax(-1)).sum())
                n += w.numel() - 1
        r = argparse.Namespace(kl=kl / n, perplexity=float(np.exp(nll / n)), top1=agree / n)
        rows.append({"model": label, "kl": r.kl, "ppl": r.perplexity, "top1": r.top1, **extra})
        print(f"{label}: KL {r.kl:.4f} ppl {r.perplexity:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        return r

    base = ev("fp32 (default model, dequantized Q4_1 file)", ref)
    if args.llmquant_act:
        for preset in ("gguf:Q4_0", "gguf:Q8_0"):
            m, _ = llmquant.load_model()
            llmquant.quantize(m, llmquant.QuantConfig(weight=preset, activation="gguf:Q8_0-act"), progress=False)
            ev(f"llmquant RTN {preset} + activations gguf:Q8_0-act (llmquant's own evaluation)", m)
            del m
        _write(Path(args.out), "export_gguf_act", args, base, rows)
        return
    if args.emulate_llamacpp_activations:
        for gtype in ("Q4_0", "Q8_0"):
            path = work / f"rtn-{gtype}.gguf"
            hf = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=path.name, dtype=torch.float32).eval()
            ev(f"exported {path.name}, transformers loader (fp32 activations)", hf)
            hooks = q8_0_activation_hooks(hf)
            ev("  same with llama.cpp's Q8_0 activation rounding emulated", hf)
            for h in hooks:
                h.remove()
        _write(Path(args.out), "export_gguf_emulated", args, base, rows)
        return
    for preset, gtype in (("gguf:Q4_0", "Q4_0"), ("gguf:Q8_0", "Q8_0")):
        m, _ = llmquant.load_model()
        llmquant.quantize(m, preset, progress=False)
        own = ev(f"llmquant RTN {preset} (llmquant's own evaluation)", m)
        t0 = time.perf_counter()
        path = work / f"rtn-{gtype}.gguf"
        rep = llmquant.export(m, tok, path, overwrite=True, progress=False)
        secs = time.perf_counter() - t0
        del m
        hf = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=path.name, dtype=torch.float32).eval()
        back = ev(f"  exported {path.name} read by transformers' GGUF loader", hf, file_mb=rep.file_bytes / 1e6,
                  types=rep.type_counts(), exact=not rep.inexact, export_s=secs)
        rows[-1]["kl_ratio_to_llmquant"] = back.kl / own.kl
        del hf
        r, _ = llmquant.load_model()
        gguf_reference_quantize(r, gtype)
        ev(f"llama.cpp reference quantizer {gtype} (gguf.quants, same tensors)", r)
        del r
    t0 = time.perf_counter()
    packed, _ = llmquant.load_model(packed=True)
    load_s = time.perf_counter() - t0
    size = llmquant.model_size(packed)
    ev("default Q4_1 file imported packed (210 QuantLinear)", packed, load_s=load_s,
       packed_mb=size.quantized_bytes / 1e6, bits_per_weight=8 * size.quantized_bytes / size.quantized_params)

    _write(Path(args.out), "export_gguf", args, base, rows)


def _write(out: Path, stem: str, args, base, rows) -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"windows": args.windows, "seq_len": 512, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "fp32_ppl": base.perplexity}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    lines = ["| model | KL vs fp32 | ppl | top-1 | notes |", "|---|---|---|---|---|"]
    for r in rows:
        notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                          if k not in ("model", "kl", "ppl", "top1"))
        lines.append(f"| {r['model']} | {r['kl']:.4f} | {r['ppl']:.3f} | {r['top1']:.3f} | {notes} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
