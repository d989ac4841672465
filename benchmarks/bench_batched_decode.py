"""Batched greedy decode: tokens per second summed over the sequences of a batch, in the lean runtime.

    flock /tmp/llmquant-bench.lock python benchmarks/bench_batched_decode.py [--batches 1 2 4 8 16] [--threads 1 2]

Serving several users at once runs their sequences as one batch: every decode step reads each weight once
for all of them, so on a memory-bound CPU the throughput grows with the batch until the matmuls become
compute-bound. Default model; configs RTN W8 (int8 per channel) and gguf:Q4_0, each with ``packed_avx2`` and
``packed_q8act``; ``--new`` greedy tokens after a 32-token prompt per sequence (distinct windows of the default
text, so sequences differ), EOS ignored; best of ``--rounds``, rows interleaved. Throughput = batch x (new - 1)
/ decode seconds (the first token comes from the prefill). Writes benchmarks/results/batched_decode.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
from pathlib import Path

import torch

import llmquant
from llmquant.data.text import token_windows
from llmquant.kernels import set_kernel
from llmquant.report import format_table
from llmquant.runtime import GenerationStats, LeanModel

OUT = Path("benchmarks/results/batched_decode")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--configs", nargs="+", default=["W8", "gguf:Q4_0"])
    ap.add_argument("--kernels", nargs="+", default=["packed_avx2", "packed_q8act"])
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT, help="results path without suffix (.json and .md written)")
    args = ap.parse_args()
    fp32, tok = llmquant.load_model()
    prompts = token_windows(tok, None, max(args.batches), 512)[:, :32]
    models = {}
    for c in args.configs:
        m = copy.deepcopy(fp32)
        llmquant.quantize(m, c, progress=False)
        models[c] = m
    del fp32
    rows = []
    for threads in args.threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        best: dict = {}
        for _ in range(args.rounds):
            for c, m in models.items():
                for k in args.kernels:
                    set_kernel(m, k)
                    lean = LeanModel(m)
                    for b in args.batches:
                        st = GenerationStats()
                        llmquant.generate(m, prompts[:b], args.new, use_eos=False, lean=lean, stats=st)
                        key = (c, k, b)
                        best[key] = max(best.get(key, 0.0), st.decode_tok_s)
                    set_kernel(m, None)
        for (c, k, b), tps in best.items():
            one = best[(c, k, args.batches[0])]
            rows.append({"threads": threads, "config": c, "kernel": k, "batch": b, "decode tok/s (all sequences)": round(tps, 1),
                         "per sequence": round(tps / b, 1), f"x batch {args.batches[0]}": round(tps / one, 2)})
            print(rows[-1], flush=True)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": platform.processor() or platform.machine(), "new_tokens": args.new, "rounds": args.rounds}
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    Path(f"{out}.md").write_text(format_table(rows) + "\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
