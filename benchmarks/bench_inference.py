"""CPU inference speed and accuracy of llmquant's paths against transformers, in one process and one run.

    flock /work/wt/bench.lock python benchmarks/bench_inference.py --threads 2

Paths: transformers fp32 eager (``model.generate``, the baseline every ratio is relative to); llmquant's lean
runtime (``llmquant.generate``) on the fp32 model, on a bf16 copy, on int8 (W8, per channel), on int4 (W4G32,
the Q4_0 grid, and gguf:Q4_1) weight-only, and on W8A8 with dynamic per-token activations; quantized paths
quantize every linear including ``lm_head`` (a fifth of the weights; the embedding stays float): int8 paths
at int8, int4 paths with an int8 ``lm_head`` (int4 there costs KL ~0.5 on this model; llama.cpp likewise keeps
its output matrix at 6-8 bits). Per path: decode tokens/s (batch 1, greedy, a 32-token prompt, 64 new tokens, best of ``--repeats``
runs, the first token excluded), prefill tokens/s (one 512-token prompt), the process RSS after the path
ran and the growth of the peak RSS, the kernels used, and the KL divergence from the fp32 model on the
first 8 evaluation windows (512 tokens) of the default text computed through the same lean runtime, next to
the KL of the same packed weights through the reference kernel (dequantize, ``F.linear``).

llama.cpp is not run here (building llama-cpp-python takes ~30 minutes on this shared 2-core machine); the
figures the issue measured on this machine are printed as a labelled reference, not as results of this run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import llmquant
from llmquant import data
from llmquant.data import default_text, tokenize
from llmquant.kernels import set_kernel
from llmquant.runtime import GenerationStats, LeanModel
from llmquant.schemes import QuantConfig, QuantScheme

# Measured in issue 7 on this machine (2 threads, same model, batch 1, greedy, 32-token prompt, 64 new
# tokens; prefill on 512): NOT measured by this script.
LLAMA_CPP_ISSUE = {
    "F32": {"decode": 24.2, "prefill": 261},
    "Q8_0": {"decode": 55.3, "prefill": 189},
    "Q4_0": {"decode": 62.0, "prefill": 246},
    "Q4_K_M": {"decode": 55.4, "prefill": 164},
}
ISSUE_TRANSFORMERS_FP32 = {"decode": 19.2, "prefill": 551}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


@torch.inference_mode()
def hf_speed(model, prompt, new_tokens, prefill_ids, repeats):
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    best_dec = best_pre = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
        t2 = time.perf_counter()
        best_dec = min(best_dec, (t2 - t1) - (t1 - t0))
        t3 = time.perf_counter()
        model(prefill_ids, use_cache=False, logits_to_keep=1)
        best_pre = min(best_pre, time.perf_counter() - t3)
    return (new_tokens - 1) / best_dec, prefill_ids.shape[1] / best_pre


def lean_speed(model, prompt, new_tokens, prefill_ids, repeats):
    lean = LeanModel(model)
    llmquant.generate(model, prompt, 4, use_eos=False, lean=lean)  # warm-up (kernel preparation)
    dec, pre, st = 0.0, 0.0, GenerationStats()
    for _ in range(repeats):
        st = GenerationStats()
        llmquant.generate(model, prompt, new_tokens, use_eos=False, lean=lean, stats=st)
        dec = max(dec, st.decode_tok_s)
        sp = GenerationStats()
        llmquant.generate(model, prefill_ids, 1, use_eos=False, lean=lean, stats=sp)
        pre = max(pre, sp.prefill_tok_s)
    return dec, pre, st.kernels


@torch.inference_mode()
def kl_vs(ref_logp: list[torch.Tensor], logits_fn, windows: torch.Tensor) -> float:
    total, n = 0.0, 0
    for w, rl in zip(windows, ref_logp):
        lp = F.log_softmax(logits_fn(w.unsqueeze(0)).float()[0], -1)
        total += float(F.kl_div(lp, rl, log_target=True, reduction="sum"))
        n += rl.shape[0]
    return total / n


def lean_logits(model):
    lean = LeanModel(model)

    def fn(ids):
        cache = lean.new_cache(ids.shape[0], ids.shape[1])
        return lean(ids, cache, all_logits=True)

    return fn


def hf_logits(model):
    return lambda ids: model(ids).logits


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--paths", default="fp32,bf16,int8,int4,int4_q41,w8a8")
    ap.add_argument("--out", default="benchmarks/results/inference")
    ap.add_argument("--no-kl", action="store_true", help="speed only (for a timing run under the lock)")
    ap.add_argument("--no-speed", action="store_true", help="accuracy only (KL; needs no lock)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base, tok = llmquant.load_model()
    ids = tokenize(tok, default_text())
    prompt = ids[: args.prompt_len].unsqueeze(0)
    prefill_ids = ids[1000 : 1000 + args.prefill_len].unsqueeze(0)
    windows = data.windows(ids, args.windows)
    with torch.inference_mode():
        ref_logp = [] if args.no_kl else [F.log_softmax(base(w.unsqueeze(0)).logits.float()[0], -1) for w in windows]
    rows = []

    def record(name, model, numerics, speed, kl_fast, kl_ref, rss_before, peak_before):
        gc.collect()
        row = {
            "path": name,
            "numerics": numerics,
            "decode_tok_s": speed[0],
            "prefill_tok_s": speed[1],
            "kernels": ",".join(speed[2]) if len(speed) > 2 else "transformers",
            "kl_vs_fp32": kl_fast,
            "kl_reference_kernel": kl_ref,
            "rss_mb": rss_mb(),
            "rss_growth_mb": rss_mb() - rss_before,
            "peak_growth_mb": peak_mb() - peak_before,
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    r0, p0 = rss_mb(), peak_mb()
    dec, pre = (float("nan"),) * 2 if args.no_speed else hf_speed(base, prompt, args.new_tokens, prefill_ids, args.repeats)
    record("transformers fp32 eager", base, "fp32", (dec, pre), 0.0, None, r0, p0)

    w8 = QuantScheme(bits=8, granularity="channel")
    act = QuantScheme(bits=8, granularity="token", dynamic=True)
    specs = {
        "fp32": ("llmquant fp32", None, None),
        "bf16": ("llmquant bf16", "bf16", None),
        "int8": ("llmquant int8 (W8 per channel)", QuantConfig(weight=w8, ignore=()), None),
        "int4": ("llmquant int4 (W4G32, Q4_0 grid)", QuantConfig(weight="W4G32"), QuantConfig(weight=w8, targets=("lm_head",), ignore=())),
        "int4_q41": ("llmquant int4 (gguf:Q4_1 grid)", QuantConfig(weight="gguf:Q4_1"), QuantConfig(weight=w8, targets=("lm_head",), ignore=())),
        "w8a8": ("llmquant W8A8 dynamic per token", QuantConfig(weight=w8, activation=act, ignore=()), None),
    }
    for key in args.paths.split(","):
        name, cfg, head_cfg = specs[key]
        gc.collect()
        r0, p0 = rss_mb(), peak_mb()
        if cfg is None:
            model = base
        elif cfg == "bf16":
            model = copy.deepcopy(base).to(torch.bfloat16)
        else:
            model = copy.deepcopy(base)
            llmquant.quantize(model, cfg, progress=False)
            if head_cfg is not None:  # int4 bodies keep an int8 lm_head (llama.cpp keeps its output at 6-8 bits)
                llmquant.quantize(model, head_cfg, progress=False)
        speed = (float("nan"), float("nan"), []) if args.no_speed else lean_speed(model, prompt, args.new_tokens, prefill_ids, args.repeats)
        kl_fast = float("nan") if args.no_kl else kl_vs(ref_logp, lean_logits(model), windows)
        kl_ref = None
        if cfg not in (None, "bf16") and not args.no_kl:
            set_kernel(model, "reference")
            kl_ref = kl_vs(ref_logp, hf_logits(model), windows)
            set_kernel(model, None)
        numerics = {None: "fp32", "bf16": "bf16 weights and activations"}.get(cfg) if not isinstance(cfg, QuantConfig) else cfg.weight.name + (" + int8 act/token" if cfg.activation else " weight-only")
        record(name, model, numerics, speed, kl_fast, kl_ref, r0, p0)
        if model is not base:
            del model
        gc.collect()

    base_dec, base_pre = rows[0]["decode_tok_s"], rows[0]["prefill_tok_s"]
    for r in rows:
        r["decode_x_fp32"] = r["decode_tok_s"] / base_dec
        r["prefill_x_fp32"] = r["prefill_tok_s"] / base_pre
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "flock /work/wt/bench.lock python benchmarks/bench_inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_at_end": os.getloadavg(),
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "prefill_len": args.prefill_len,
        "repeats": args.repeats,
        "eval_windows": int(windows.shape[0]),
        "llama_cpp_issue_figures_not_measured_here": LLAMA_CPP_ISSUE,
        "transformers_fp32_issue_figures": ISSUE_TRANSFORMERS_FP32,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [
        f"{meta['date']}, {meta['threads']} threads, torch {meta['torch']} ({meta['cpu_capability']}), load average at end "
        f"{meta['load_average_at_end'][0]:.1f}; batch 1, greedy, {args.prompt_len}-token prompt, {args.new_tokens} new tokens "
        f"(best of {args.repeats}); prefill {args.prefill_len} tokens; KL on {meta['eval_windows']} x 512-token windows.",
        "",
        "| path | numerics | decode tok/s | x fp32 | prefill tok/s | x fp32 | KL vs fp32 | KL, reference kernel | RSS MB | kernels |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        klr = "" if r["kl_reference_kernel"] is None else f"{r['kl_reference_kernel']:.5f}"
        md.append(
            f"| {r['path']} | {r['numerics']} | {r['decode_tok_s']:.1f} | {r['decode_x_fp32']:.2f} | {r['prefill_tok_s']:.0f} | "
            f"{r['prefill_x_fp32']:.2f} | {r['kl_vs_fp32']:.5f} | {klr} | {r['rss_mb']:.0f} | {r['kernels']} |"
        )
    md += ["", "llama.cpp (llama-cpp-python 0.3.36, AVX2 build), **measured in the issue on this machine, not in this run**:", "",
           "| llama.cpp type | decode tok/s | x issue's transformers fp32 (19.2) | prefill tok/s |", "|---|---|---|---|"]
    for k, v in LLAMA_CPP_ISSUE.items():
        md.append(f"| {k} | {v['decode']} | {v['decode'] / ISSUE_TRANSFORMERS_FP32['decode']:.2f} | {v['prefill']} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
