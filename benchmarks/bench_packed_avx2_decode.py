"""One decode call (one row of x) of the default ``packed_avx2`` kernel (or ``--kernel``) on a ~1B model's MLP shape
(2048 -> 5632, or ``--shape``), the weights out of cache: 12 such matrices (random weights) are called in turn,
each read from memory.

    flock -x /tmp/llmquant-bench.lock python benchmarks/bench_packed_avx2_decode.py --threads 1 --configs gguf:Q4_0 W8

Prints microseconds per call (best of 5 passes of 4 rounds over the 12 matrices). To compare two versions of the
kernel, run it on each (the extension is rebuilt for each source), alternating, in one locked session.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

import llmquant
from llmquant.kernels import set_kernel
from llmquant.schemes import QuantConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", nargs="+", default=["gguf:Q4_0", "W8", "W4G64", "gguf:Q4_K"])
    ap.add_argument("--matrices", type=int, default=12)
    ap.add_argument("--kernel", default="packed_avx2", help="the kernel (packed_q8act: int8 activations)")
    ap.add_argument("--shape", default="2048x5632", help="in x out features (default: a ~1B model's MLP up)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for cfg in args.configs:
        k, n = (int(v) for v in args.shape.split("x"))
        m = nn.ModuleList([nn.Linear(k, n, bias=False) for _ in range(args.matrices)])
        llmquant.quantize(m, QuantConfig(weight=cfg), progress=False)
        set_kernel(m, args.kernel)
        x = torch.randn(1, k)
        with torch.inference_mode():
            for lin in m:
                lin(x)
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(4):
                    for lin in m:
                        lin(x)
                best = min(best, (time.perf_counter() - t) / (4 * len(m)))
        mb = k * n * {"W8": 1.0}.get(cfg, 0.5) / 1e6
        print(f"{cfg} {args.kernel} {args.shape}: {best * 1e6:.0f} us per call ({args.threads} thread(s), "
              f"{args.matrices} matrices in turn; codes alone {mb / best / 1e3:.1f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
