"""Batched greedy decode: tokens per second summed over the sequences of a batch, in the lean runtime.

    flock /tmp/llmquant-bench.lock python benchmarks/bench_batched_decode.py [--batches 1 2 4 8 16] [--threads 1 2] \
        [--compiled both] [--llama-cpp]

Serving several users at once runs their sequences as one batch: every decode step reads each weight once
for all of them, so on a memory-bound CPU the throughput grows with the batch until the matmuls become
compute-bound. Default model; configs RTN W8 (int8 per channel) and gguf:Q4_0, each with ``packed_avx2`` and
``packed_q8act``; ``--new`` greedy tokens after a 32-token prompt per sequence (distinct windows of the default
text, so sequences differ), EOS ignored; best of ``--rounds``, rows interleaved. Throughput = batch x (new - 1)
/ decode seconds (the first token comes from the prefill). Writes benchmarks/results/batched_decode.{json,md}.

``--llama-cpp`` adds llama.cpp (the cyllama wheel) on its own Q8_0 / Q4_0 files of the default model (made by its
quantizer from llmquant's F32 export, cached with ``bench_decode_llama_cpp.py``'s), decoding the same prompts
as one batch per step (one sequence id per prompt, one KV cache), interleaved with llmquant's rows in each
round; each llmquant row then shows its ratio to llama.cpp at the same format and batch.
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
from llmquant.resources import cache_dir
from llmquant.runtime import GenerationStats, LeanModel

OUT = Path("benchmarks/results/batched_decode")
#: llama.cpp's file type for each llmquant config (W8, int8 per channel, against Q8_0: the nearest it has)
LLAMA_CPP = {"W8": "Q8_0", "gguf:Q8_0": "Q8_0", "gguf:Q4_0": "Q4_0"}


def llama_cpp_files(fp32, tok, types) -> dict:
    """llama.cpp's files of the default model, from the cache bench_decode_llama_cpp.py keeps (made if missing)."""
    from llmquant.eval.llama_cpp import llama_cpp_quantize

    work = cache_dir() / "bench_decode_llama_cpp"
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "f32.gguf"
    if not f32.exists():
        llmquant.export(fp32, tok, f32, float_type="F32", progress=False)
    files = {}
    for ft in sorted(set(types)):
        files[ft] = work / f"{ft.lower()}.gguf"
        if not files[ft].exists():
            llama_cpp_quantize(f32, files[ft], ft, threads=2)
    return files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--configs", nargs="+", default=["W8", "gguf:Q4_0"])
    ap.add_argument("--kernels", nargs="+", default=["packed_avx2", "packed_q8act"])
    ap.add_argument("--compiled", choices=["on", "off", "both"], default="on",
                    help="the compiled decode step (one C++ call per token, batches below 16) on, off (the Python "
                         "step), or both side by side")
    ap.add_argument("--llama-cpp", action="store_true", help="llama.cpp's batched decode side by side")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT, help="results path without suffix (.json and .md written)")
    args = ap.parse_args()
    fp32, tok = llmquant.load_model()
    prompts = token_windows(tok, None, max(args.batches), 512)[:, :32]
    cpp_files = llama_cpp_files(fp32, tok, [LLAMA_CPP[c] for c in args.configs]) if args.llama_cpp else {}
    models = {}
    for c in args.configs:
        m = copy.deepcopy(fp32)
        llmquant.quantize(m, c, progress=False)
        models[c] = m
    del fp32
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.compiled]
    rows = []
    for threads in args.threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        best: dict = {}
        cpp = {}
        if cpp_files:
            from llmquant.eval.llama_cpp import LlamaCpp

            cpp = {ft: LlamaCpp(f, threads=threads) for ft, f in cpp_files.items()}
        for _ in range(args.rounds):
            for ft, engine in cpp.items():
                for b in args.batches:
                    _, tps = engine.batched_decode(prompts[:b].tolist(), args.new)
                    best[("llama.cpp " + ft, "llama.cpp", True, b)] = max(best.get(("llama.cpp " + ft, "llama.cpp", True, b), 0.0), tps)
            for c, m in models.items():
                for k in args.kernels:
                    set_kernel(m, k)
                    for on in modes:
                        lean = LeanModel(m, compiled=on)
                        for b in args.batches:
                            st = GenerationStats()
                            llmquant.generate(m, prompts[:b], args.new, use_eos=False, lean=lean, stats=st)
                            key = (c, k, on, b)
                            best[key] = max(best.get(key, 0.0), st.decode_tok_s)
                    set_kernel(m, None)
        for (c, k, on, b), tps in best.items():
            one = best[(c, k, on, args.batches[0])]
            row = {"threads": threads, "config": c, "kernel": k, "step": "compiled" if on else "python", "batch": b,
                   "decode tok/s (all sequences)": round(tps, 1), "per sequence": round(tps / b, 1),
                   f"x batch {args.batches[0]}": round(tps / one, 2)}
            if on and (c, k, False, b) in best:
                row["compiled / python"] = round(tps / best[(c, k, False, b)], 2)
            ref = ("llama.cpp " + LLAMA_CPP.get(c, ""), "llama.cpp", True, b)
            if k != "llama.cpp" and ref in best:
                row["x llama.cpp"] = round(tps / best[ref], 2)
            if k == "llama.cpp":
                row["step"] = "-"
            rows.append(row)
            print(rows[-1], flush=True)
        for engine in cpp.values():
            engine.close()
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": platform.processor() or platform.machine(), "new_tokens": args.new, "rounds": args.rounds,
            "compiled": args.compiled, "llama_cpp": bool(cpp_files)}
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    Path(f"{out}.md").write_text(format_table(rows) + "\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
