"""Kernel candidates per format and shape: the measurements behind ``llmquant.kernels.PREFERENCE``.

    flock /work/wt/bench.lock .venv/bin/python benchmarks/bench_kernels.py [--threads 2]

For each shape of the default model (batch 1 decode and a 512-token prefill) times the float baseline
and every registered kernel that supports the format, plus PyTorch candidates that are not registered
because they lose (``torch._weight_int8pack_mm``). Writes benchmarks/results/kernels.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from llmquant.algorithms import rtn_quantize
from llmquant.kernels import KERNELS
from llmquant.modules import QuantLinear
from llmquant.report import format_table
from llmquant.schemes import PRESETS, QuantScheme

SHAPES = [(1, 576, 1536), (1, 1536, 576), (1, 576, 49152), (512, 576, 1536), (512, 1536, 576)]


def bench(f, min_time=0.3):
    for _ in range(3):
        f()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_time:
        f()
        n += 1
    return (time.perf_counter() - t0) / n * 1e3


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    formats = {
        "int8-ch (W8)": (PRESETS["W8"], None),
        "int4-g64 (W4G64)": (PRESETS["W4G64"], None),
        "W8A8 dyn/token": (PRESETS["W8"], QuantScheme(bits=8, granularity="token", dynamic=True)),
    }
    rows = []
    for m, k, n in SHAPES:
        lin = nn.Linear(k, n, bias=False)
        x = torch.randn(m, k)
        row = {"shape (M,K,N)": f"{m},{k},{n}", "fp32 ms": bench(lambda: lin(x))}
        row["bf16 ms"] = bench(lambda w=lin.weight.bfloat16(): torch.nn.functional.linear(x.bfloat16(), w))
        q8, s8, _ = rtn_quantize(lin.weight, PRESETS["W8"])
        if m <= 32:
            row["_weight_int8pack_mm ms"] = bench(
                lambda qq=q8.to(torch.int8), ss=s8.reshape(-1): torch._weight_int8pack_mm(x, qq, ss), 0.1
            )
        for fname, (ws, act) in formats.items():
            q, s, z = rtn_quantize(lin.weight, ws)
            ql = QuantLinear.from_quantized(q, s, z, ws, activation_scheme=act)
            for kname, kern in KERNELS.items():
                if kname == "reference" or not kern.supports(ql, x.device):
                    continue
                ql.kernel_override = kname
                ql.reset_kernel()
                row[f"{fname} {kname} ms"] = bench(lambda: ql(x))
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path("benchmarks/results/kernels")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=1))
    cols = sorted({c for r in rows for c in r}, key=lambda c: (c != "shape (M,K,N)", c))
    md = format_table(rows, cols)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
