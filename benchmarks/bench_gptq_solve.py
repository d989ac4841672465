"""GPTQ's solve alone (no calibration pass): one decoder layer's linears with random weights and a Hessian
from random correlated inputs, the library's GPTQ defaults (act order "full", static groups, "imse").

    python benchmarks/bench_gptq_solve.py --shape default --threads 1 2   # SmolLM2-135M's layer, W4G64, best of 3
    python benchmarks/bench_gptq_solve.py --shape 8b --threads 2          # Llama-3-8B's layer, W4G128, once

Run it alone (under the bench lock); for a before/after, run it with the older source on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {  # name -> (scheme, [(linear group, rows, inputs)], repeats)
    "default": ("W4G64", [("q/k/v", 960, 576), ("o", 576, 576), ("gate/up", 3072, 576), ("down", 576, 1536)], 3),
    "8b": ("W4G128", [("q/k/v", 6144, 4096), ("o", 4096, 4096), ("gate/up", 28672, 4096), ("down", 4096, 14336)], 1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="default")
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    args = ap.parse_args()
    import llmquant
    from llmquant.algorithms.gptq import gptq_quantize
    from llmquant.schemes.scheme import PRESETS

    name, linears, repeats = SHAPES[args.shape]
    scheme = PRESETS[name]
    for threads in args.threads:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        best = {}
        for _ in range(repeats):
            for what, rows, cols in linears:
                x = torch.randn(4096, cols) * (torch.rand(cols) + 0.1)
                h = 2 * x.T @ x / 4096
                del x
                w = torch.randn(rows, cols) * 0.02
                t = time.perf_counter()
                gptq_quantize(w, h, scheme, act_order="full", static_groups=True, observer="imse")
                best[what] = min(best.get(what, float("inf")), time.perf_counter() - t)
                del w, h
        parts = ", ".join(f"{k} {v:.3f}" for k, v in best.items())
        print(f"{llmquant.__file__}: {args.shape} layer, {threads} thread(s): {sum(best.values()):.3f} s ({parts})")


if __name__ == "__main__":
    main()
