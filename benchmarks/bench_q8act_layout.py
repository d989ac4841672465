"""packed_q8act's int8 GEMM: the row layout against the tiled layout (AVX512-VNNI; for Q6_K's widened codes also
``tiled8``, the tiles at 8 bits instead of 6), and fbgemm's fp16-weight GEMM (what the fp32-numerics prefill
runs), on one linear of each shape, in one process.

    flock -x /tmp/llmquant-bench.lock python benchmarks/bench_q8act_layout.py [--threads 1 2]

Shapes: the default model's MLP (576 -> 1536) and a ~1B model's (2048 -> 5632), Q4_0, Q8_0 and Q6_K codes of
random weights (``--formats``); rows of x: 1 (decode), 4 (a small batch) and 512 (prefill). Best of 7 repetitions of a timed loop.
Results: benchmarks/results/q8act_layout.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from llmquant.algorithms import rtn_quantize
from llmquant.kernels import KERNELS, native
from llmquant.kernels.packed_q8act import q8gemm_args
from llmquant.modules import QuantLinear
from llmquant.report import format_table
from llmquant.schemes import resolve_scheme

OUT = Path("benchmarks/results/q8act_layout")
SHAPES = {"default model MLP up (576 -> 1536)": (1536, 576), "1B MLP up (2048 -> 5632)": (5632, 2048)}


def best(fn, reps: int = 7) -> float:
    fn()
    t = 1e9
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if time.perf_counter() - t0 > 0.05:
                break
        t = min(t, (time.perf_counter() - t0) / n)
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 512])
    ap.add_argument("--formats", nargs="+", default=["gguf:Q4_0", "gguf:Q8_0", "gguf:Q6_K"],
                    help="GGUF presets (gguf:Q6_K: groups of 16, codes widened to one byte)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    ext = native.load()
    if ext is None or ext.q8_best_isa() != 1:
        raise SystemExit("needs the compiled kernels on an AVX512-VNNI CPU (the tiled layout is VNNI-only)")
    rows_out = []
    torch.manual_seed(0)
    for shape_name, (n, k) in SHAPES.items():
        for fmt in args.formats:
            f = resolve_scheme(fmt)
            ql = QuantLinear.from_quantized(*rtn_quantize(torch.randn(n, k) * 0.02, f), f)
            args_of = {}
            # tiled8 differs from tiled only for codes widened from 2-6 bits (tiled at 6 bits by default)
            for layout in ("rows", "tiled") + (("tiled8",) if f.bits not in (4, 8) else ()):
                os.environ["LLMQUANT_Q8ACT_LAYOUT"] = layout
                args_of[layout] = q8gemm_args([KERNELS["packed_q8act"].prepare(ql, torch.device("cpu"), torch.float32)])
            fp16 = torch.ops.quantized.linear_prepack_fp16(ql.dequantize_weight(torch.float32), None)
            for th in args.threads:
                torch.set_num_threads(th)
                for m in args.rows:
                    x = torch.randn(m, k)
                    t = {lay: best(lambda a=a: ext.q8gemm(x, *a)) for lay, a in args_of.items()}
                    t["fbgemm fp16"] = best(lambda: torch.ops.quantized.linear_dynamic_fp16(x, fp16))
                    row = {"shape": shape_name, "format": fmt, "threads": th, "rows of x": m,
                           **{f"{k2} us": v * 1e6 for k2, v in t.items()},
                           "tiled x rows": t["rows"] / t["tiled"], "tiled x fbgemm fp16": t["fbgemm fp16"] / t["tiled"],
                           "tiled GOP/s": 2 * m * n * k / t["tiled"] / 1e9}
                    rows_out.append(row)
                    print(row, flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "rows": rows_out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = format_table(rows_out)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
