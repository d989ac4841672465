"""Block-wise QAT (blockqat) against RTN and GPTQ on the default model: KL to the float model on the
standard evaluation windows, and the time each takes.

    flock LOCK python benchmarks/bench_blockqat.py [--scheme W3G32] [--samples 16] [--steps 40] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    import torch

    import llmquant

    p = argparse.ArgumentParser()
    p.add_argument("--scheme", default="W3G32")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lr-qparams", type=float, default=1e-4)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--methods", default="rtn,gptq,blockqat")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    ref, _ = llmquant.load_model()
    rows = []
    for method in a.methods.split(","):
        model, tok = llmquant.load_model()
        params = (llmquant.BlockQATParams(steps=a.steps, lr=a.lr, lr_qparams=a.lr_qparams)
                  if method == "blockqat" else None)
        cfg = llmquant.QuantConfig(weight=a.scheme, method=method, method_params=params,
                                   calibration=llmquant.CalibSpec(samples=a.samples, seq_len=512)
                                   if method != "rtn" else None)
        t = time.perf_counter()
        s = llmquant.quantize(model, cfg, progress=False)
        secs = time.perf_counter() - t
        ev = llmquant.evaluate(model, reference=ref, windows=a.windows, progress=False)
        row = {"method": method, "scheme": a.scheme, "calib_windows": a.samples if method != "rtn" else 0,
               "steps": a.steps if method == "blockqat" else None, "kl": ev.kl, "ppl": ev.perplexity,
               "top1": ev.top1, "seconds": secs, "peak_memory_mb": s.peak_memory_mb,
               "mean_layer_error": sum(s.layer_errors) / max(len(s.layer_errors), 1) if s.layer_errors else None}
        print(json.dumps(row), flush=True)
        rows.append(row)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
