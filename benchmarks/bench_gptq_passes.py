"""Where GPTQ's time goes, and what the calibration-pass changes save, measured side by side in one process.

On the default model's first ``--layers`` decoder layers with ``--calib-samples`` x 512 calibration tokens
(batches of 4 windows, as the pipeline runs them): the statistics pass as it was before (full passes,
``isfinite`` masks on every input and output, full ``X^T X`` products) and as it is now (NaN/Inf from sums,
``X^T X`` as its upper block triangle, the tail after the last linear skipped where the output goes unused),
the same pass under bfloat16 autocast, the quantized pass that makes the next layer's inputs, and GPTQ's own
solve. The variants alternate ``--reps`` times and each keeps its fastest time, so a loaded machine slows
them alike. Writes benchmarks/results/gptq_passes.{json,md}.

    flock /tmp/llmquant-bench.lock python benchmarks/bench_gptq_passes.py --calib-samples 16 --layers 3
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@contextmanager
def old_statistics():
    """The statistics hook and output check as they were before (kept here only to measure them)."""
    from llmquant.flows import stats

    def add(self, x, name):
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x2).all():
            raise RuntimeError("NaN/Inf")
        self._xtx += (x2.T @ x2).to(self._xtx.dtype)  # the full product (the accumulator is float64 now)
        self._mirrored = True
        self.abs_sum += x2.abs().sum(0).to(self.abs_sum.dtype)
        self.n += x2.shape[0]

    saved = stats.InputStats._add
    stats.InputStats._add = add
    try:
        yield
    finally:
        stats.InputStats._add = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import llmquant
    from llmquant import data
    from llmquant.algorithms.gptq import gptq_quantize
    from llmquant.flows.passes import TailSkip, _run, record_layer_inputs
    from llmquant.flows.stats import StatsCollector
    from llmquant.schemes import PRESETS

    model, tok = llmquant.load_model()
    ids = data.calibration_windows(tok, None, args.calib_samples, 512)
    layers = model.model.layers
    with torch.no_grad():
        xs, kwargs = record_layer_inputs(model, layers, list(ids.split(4)), {"use_cache": False})
    err_batches = 4  # the pipeline keeps the float outputs of the first 16 windows for the layer error
    times: dict[str, float] = {}

    def timed(key, fn):
        t = time.perf_counter()
        out = fn()
        times[key] = min(times.get(key, float("inf")), time.perf_counter() - t)
        return out

    for i in range(args.layers):
        layer = layers[i]
        lin = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}

        def old_pass():
            col = StatsCollector(lin)
            with old_statistics(), col, torch.no_grad():
                for x, k in zip(xs, kwargs[i]):
                    y = _run(layer, x, k)
                    assert torch.isfinite(y).all()
            return col

        def new_pass(compute=None):
            col = StatsCollector(lin)
            amp = torch.autocast("cpu", dtype=torch.bfloat16) if compute else torch.autocast("cpu", enabled=False)
            with col, TailSkip(lin) as tail, amp, torch.no_grad():
                for j, (x, k) in enumerate(zip(xs, kwargs[i])):
                    if j >= err_batches:
                        tail.run(layer, x, k)
                    else:
                        y = tail.full(layer, x, k)
                        assert llmquant.schemes.primitives.all_finite(y)
            return col

        def quantized_pass():
            with torch.no_grad():
                return [_run(layer, x, k) for x, k in zip(xs, kwargs[i])]

        for _ in range(args.reps):
            timed(f"L{i} statistics pass, before", old_pass)
            col = timed(f"L{i} statistics pass, now", new_pass)
            timed(f"L{i} statistics pass, now, bfloat16", lambda: new_pass("bf16"))
        ref = old_pass()
        for n in col.stats:  # the same statistics either way
            a, b = ref.stats[n].xtx, col.stats[n].xtx
            assert ref.stats[n].n == col.stats[n].n and torch.allclose(a, b, rtol=1e-4, atol=1e-3 * float(a.abs().max()))

        def solve():
            for owner, names in col.groups().items():
                w = torch.cat([lin[n].weight.detach().float() for n in names])
                gptq_quantize(w, col.stats[owner].hessian, PRESETS["W4G64"])

        for _ in range(args.reps):
            timed(f"L{i} GPTQ solve (4 input groups)", solve)
            nxt = timed(f"L{i} quantized pass (float weights)", quantized_pass)
        xs[:] = nxt
    parts = sorted({k.split(" ", 1)[1] for k in times})
    total = {p: sum(v for k, v in times.items() if k.split(" ", 1)[1] == p) for p in parts}
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "calib_samples": args.calib_samples,
            "layers": args.layers, "reps": args.reps, "threads": args.threads}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gptq_passes.json").write_text(json.dumps({"meta": meta, "per_layer": times, "total": total}, indent=1))
    md = (f"{meta['date']}; {args.calib_samples} x 512 calibration tokens, first {args.layers} layers, fastest of "
          f"{args.reps}, torch threads {args.threads}.\n\n| part | seconds ({args.layers} layers) |\n|---|---|\n"
          + "".join(f"| {p} | {total[p]:.2f} |\n" for p in parts))
    (RESULTS / "gptq_passes.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
