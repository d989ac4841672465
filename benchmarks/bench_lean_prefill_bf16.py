"""The lean runtime's ``prefill_bf16`` option: prompt forward under bf16 autocast, decode in fp32.

    .venv/bin/python benchmarks/bench_lean_prefill_bf16.py [--threads 2]

Prompt: the first 512 tokens of the default text; 64 greedy new tokens; best of 3 per row. Also reports
whether the greedy tokens equal those of the same model without the option. Writes
benchmarks/results/lean_prefill_bf16.{json,md}.
"""

from __future__ import annotations

import argparse
import json

import torch

import llmquant
from _results import write_speed_results
from llmquant.runtime import GenerationStats, LeanModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref, tok = llmquant.load_model(None)
    ids = llmquant.data.token_windows(tok, None, 1, 512)[:1]
    rows = []
    for name in ("fp32", "W8", "W4G64"):
        m = ref
        if name != "fp32":
            m, _ = llmquant.load_model(None)
            llmquant.quantize(m, name, progress=False)
        lean = LeanModel(m)
        base_tokens = None
        for bf16 in (False, True):
            best = None
            for _ in range(3):
                st = GenerationStats()
                out = llmquant.generate(m, ids, args.new_tokens, use_eos=False, lean=lean, stats=st, prefill_bf16=bf16)
                if best is None or st.prefill_s < best.prefill_s:
                    best = st
            if not bf16:
                base_tokens = out
            same = int((out == base_tokens).long().cumprod(-1).sum())  # leading tokens equal to the fp32-prefill run
            rows.append({"model": name, "prefill_bf16": bf16, "prefill tok/s": best.prefill_tok_s,
                         "decode tok/s": best.decode_tok_s, "same leading tokens": f"{same}/{out.shape[1]}"})
            print(json.dumps(rows[-1]), flush=True)
    write_speed_results(rows, "lean_prefill_bf16", {"threads": args.threads})


if __name__ == "__main__":
    main()
