"""Prefill speed of weight-only int8 / int4 models with and without ``llmquant.autocast("bf16")``.

    .venv/bin/python benchmarks/bench_autocast_prefill.py [--threads 2] [--windows 8]

Under bf16 autocast the ``packed_avx2`` kernel runs many-token inputs as a bf16 GEMM with the dequantized
weight rounded to bf16 once (see kernels/packed_cpu.py). fp32, with and without autocast, is measured in
the same run; KL is against fp32 without autocast on the first ``--windows`` 512-token windows.
Writes benchmarks/results/autocast_prefill.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

import llmquant
from llmquant.bench import measure_speed
from _results import write_speed_results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--prefill", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref, tok = llmquant.load_model(None)
    models = {"fp32": ref}
    for preset in ("W8", "W4G64"):
        m, _ = llmquant.load_model(None)
        llmquant.quantize(m, preset, progress=False)
        models[preset] = m
    # the reference log-probs are computed once, outside autocast: every KL is against plain fp32
    cached = llmquant.ReferenceLogits(ref, llmquant.data.token_windows(tok, None, args.windows, 512))
    rows = []
    for name, m in models.items():
        for ac in (False, True):
            ctx = (lambda: llmquant.autocast("bf16")) if ac else contextlib.nullcontext
            with ctx():
                sp = measure_speed(m, prefill_len=args.prefill, new_tokens=32, repeats=5)
                ev = llmquant.evaluate(m, reference=cached, tokenizer=tok, windows=args.windows, progress=False)
            rows.append({"model": name, "autocast bf16": ac, "prefill tok/s": sp.prefill_tokens_per_s,
                         "decode tok/s": sp.decode_tokens_per_s, "KL": ev.kl, "ppl": ev.perplexity})
            print(json.dumps(rows[-1]), flush=True)
    write_speed_results(rows, "autocast_prefill", {"threads": args.threads, "prefill": args.prefill, "windows": args.windows})


if __name__ == "__main__":
    main()
