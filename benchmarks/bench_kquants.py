"""k-quant GGUF files of the default model, every figure computed by llama.cpp itself (the prebuilt wheel
cyllama) in one run: llama.cpp's own Q4_K_M (its quantizer, from an F32 export of the same fp32 model)
against llmquant's files on the same mixture (``gguf:Q4_K_M``: llama.cpp's per-tensor types, hence the
same file size) made by RTN and by GPTQ (one calibrated pass, every linear onto its own type), for each
of llama.cpp's types named (mixtures Q6_K, Q4_K_M, Q3_K_M, Q2_K; one-type files such as Q4_0). KL(p_fp32 || p_file) over the predicted positions of
the standard evaluation windows; the fp32 reference is llmquant's own fp32 model (transformers).

``--planned``: also llmquant's own planner choosing each tensor's type (the GGUF candidates, head and
embedding included) under a budget of exactly the tensor bytes of llama.cpp's file for that mixture, from
Fisher sensitivity measured on calibration windows from the end of the default text (the evaluation
windows come from its start: the plan is judged on text it did not see); the plan is then made by each
method, as the mixture rows.

    PYTHONPATH=src python benchmarks/bench_kquants.py [--windows 8] [--calib 64] [--mixtures Q6_K,Q4_K_M,...] [--planned] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import llmquant
from llmquant.data import calibration_windows
from llmquant.data.text import token_windows
from llmquant.eval.llama_cpp import llama_cpp_logits, llama_cpp_quantize
from llmquant.flows.mixed import llama_cpp_bytes, plan_from_sensitivity
from llmquant.flows.mixed.llama_presets import MIXTURES
from llmquant.schemes import GGUF_CANDIDATES, Plan


def _kl_nll(ref_logp: list[torch.Tensor], ids: torch.Tensor, logits: list[np.ndarray]) -> tuple[float, float, float]:
    kl = nll = agree = 0.0
    n = 0
    for w, rl, lg in zip(ids, ref_logp, logits):
        logp = F.log_softmax(torch.from_numpy(lg[:-1]).double(), -1)
        kl += float(F.kl_div(logp, rl, log_target=True, reduction="sum"))
        nll += float(F.nll_loss(logp, w[1:], reduction="sum"))
        agree += float((rl.argmax(-1) == logp.argmax(-1)).sum())
        n += w.numel() - 1
    return kl / n, float(np.exp(nll / n)), agree / n


def _tensor_bytes(path: Path) -> int:
    """The tensor data of a GGUF file (what a plan's budget counts; the file adds the tokenizer and metadata)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib", type=int, default=64, help="GPTQ calibration windows (512 tokens each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--mixtures", default="Q6_K,Q4_K_M,Q3_K_M,Q2_K,Q4_0",
                    help="llama.cpp file types: its per-tensor mixtures, or one type for every linear (Q4_0 ...)")
    ap.add_argument("--methods", default="rtn,gptq", help="llmquant's methods onto the same types (rtn, gptq)")
    ap.add_argument("--name", default="kquants", help="results file name")
    ap.add_argument("--work", default="/tmp/llmquant-bench-kquants")
    ap.add_argument("--planned", action="store_true",
                    help="add rows planned by llmquant's planner at the tensor bytes of llama.cpp's file")
    ap.add_argument("--sens-windows", type=int, default=8, help="--planned: sensitivity windows (x --sens-seq tokens)")
    ap.add_argument("--sens-seq", type=int, default=512)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    model, tok = llmquant.load_model()
    ids = token_windows(tok, None, args.windows)
    with torch.no_grad():
        ref = [F.log_softmax(model(w[None]).logits[0, :-1].double(), -1) for w in ids]

    rows = []

    def measure(label: str, path: Path, notes: str = "") -> None:
        t0 = time.perf_counter()
        logits = [llama_cpp_logits(path, w.tolist(), threads=args.threads) for w in ids]
        kl, ppl, top1 = _kl_nll(ref, ids, logits)
        rows.append({"file": label, "mb": path.stat().st_size / 1e6, "kl": kl, "ppl": ppl, "top1": top1,
                     "llama_cpp_seconds": time.perf_counter() - t0, "notes": notes})
        print(json.dumps(rows[-1]), flush=True)

    # llama.cpp's own quantizer, from the same fp32 weights
    f32 = work / "f32.gguf"
    llmquant.export(model, tok, f32, float_type="F32", overwrite=True, progress=False)
    calib = None
    sens = None
    if args.planned:
        t0 = time.perf_counter()
        sens = llmquant.sensitivity(model, None, GGUF_CANDIDATES, include_head=True, windows=args.sens_windows,
                                    seq_len=args.sens_seq, progress=False)
        print(f"sensitivity: {len(sens.units)} tensors x {len(sens.candidates)} types, {time.perf_counter() - t0:.0f} s",
              flush=True)
    for mixture in args.mixtures.split(","):
        out = work / f"llamacpp-{mixture}.gguf"
        llama_cpp_quantize(f32, out, mixture, threads=args.threads)
        measure(f"llama.cpp {mixture} (llama_model_quantize)", out, f"tensor bytes {_tensor_bytes(out)}")
        jobs = [(method, mixture) for method in args.methods.split(",")]
        plan = None
        if sens is not None:
            budget = _tensor_bytes(out)
            if mixture in MIXTURES:
                print(f"llama_cpp_bytes(model, {mixture!r}) = {llama_cpp_bytes(model, mixture)}, the file: {budget}",
                      flush=True)
            plan = plan_from_sensitivity(sens, max_size=budget)
            print(f"plan at {budget} tensor bytes: {plan.info['formats']} predicted KL {plan.info['predicted_kl']:.4f}",
                  flush=True)
            jobs += [(method, "planned") for method in args.methods.split(",")]
        for method, what in jobs:
            m, _ = llmquant.load_model()
            if what == "planned":
                config = Plan(rules=plan.rules, info=plan.info, method=method)
            elif mixture in MIXTURES:  # llama.cpp's per-tensor types, every decoder linear made by `method`
                config = llmquant.llama_cpp_plan(m, mixture, method=method)
            else:  # one type for every linear (Q4_0, Q8_0 ...); the tied embedding/head as llama.cpp: Q8_0
                config = llmquant.QuantConfig(method=method, weight=f"gguf:{mixture}")
            if method != "rtn" and calib is None:
                calib = calibration_windows(tok, None, args.calib, 512)
            t0 = time.perf_counter()
            llmquant.quantize(m, config, calib=calib if method != "rtn" else None, progress=False)
            secs = time.perf_counter() - t0
            out = work / f"llmquant-{method}-{mixture}-{what}.gguf"
            rep = llmquant.export(m, tok, out, overwrite=True, progress=False)
            label = (f"llmquant {method.upper()} -> planned at {mixture}'s tensor bytes" if what == "planned"
                     else f"llmquant {method.upper()} -> gguf:{mixture}")
            measure(label, out, f"quantize {secs:.0f} s; tensor bytes {_tensor_bytes(out)}; types {rep.type_counts()}")
            del m

    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{args.name}.json").write_text(json.dumps({"windows": args.windows, "rows": rows}, indent=1))
    lines = ["| file | MB | KL in llama.cpp | ppl | top-1 | notes |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['file']} | {r['mb']:.1f} | {r['kl']:.4f} | {r['ppl']:.3f} | {r['top1']:.3f} | {r['notes']} |"
              for r in rows]
    (outdir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
