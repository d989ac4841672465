"""SmoothQuant + static W8A8 with the min-max observer from ONE calibration pass (for 64 x 512 tokens on a
busy 2-core machine), against fp32 in the same run.

Why one pass is exact for min-max: SmoothQuant divides input channel j of the consuming linears by s_j and
leaves every other linear's input unchanged (the float function is preserved). So the per-tensor range of a
smoothed input is ``(min_j lo_j / s_j, max_j hi_j / s_j)`` with ``lo_j, hi_j`` the per-channel extremes of
the unsmoothed input: one pass with per-channel min-max observers on every linear's input gives both the
SmoothQuant statistics and the static scales that a second pass over the smoothed model would measure
(up to float rounding). ``bench_static_w8a8.py`` does the two passes (and compares observers).

    python benchmarks/bench_static_w8a8_onepass.py --calib-samples 64
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import llmquant
from llmquant import QuantConfig, QuantScheme
from llmquant.flows.calibrate import INPUT_OBSERVER, calibrate, convert, prepare, unprepare
from llmquant.flows.smooth import SmoothingStats, smooth, smoothing_pairs
from llmquant import data
from llmquant.data import calibration_windows, default_text, tokenize
from llmquant.models import context_length
from llmquant.modules import select_linears
from llmquant.observers import MinMaxObserver
from llmquant.report import format_table

sys.path.insert(0, str(Path(__file__).parent))
from bench_static_w8a8 import OUT, ref_logprobs, rss_mb, score  # noqa: E402

T8 = QuantScheme(bits=8, granularity="tensor")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--dynamic-fallback", default="re:.*down_proj")
    ap.add_argument("--model", default=None, help="local model folder (default: the default model)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    ref, tok = llmquant.load_model(args.model)
    ev = data.windows(tokenize(tok, default_text()), args.windows, 512)
    wins = calibration_windows(tok, None, args.calib_samples, args.seq_len, context=context_length(ref))
    ref_lp = ref_logprobs(ref, ev)
    rows = [{"method": "fp32", **score(ref, ev, ref_lp), "quantize s": 0.0, "peak RSS MB": rss_mb()}]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/bench_static_w8a8_onepass.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "eval": f"first {ev.shape[0]} x 512-token windows of the default text",
        "calibration": f"{args.calib_samples} x {args.seq_len} tokens from the end of the default text, one pass",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    cols = ["method", "ppl", "ppl / fp32", "kl", "top1", "quantize s", "peak RSS MB"]

    def write(final=False):
        for r in rows:
            r["ppl / fp32"] = r["ppl"] / rows[0]["ppl"]
        OUT.mkdir(parents=True, exist_ok=True)
        stem = OUT / f"static_w8a8_onepass{args.tag}"
        meta["complete"] = final
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        md = "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + format_table(rows, cols) + "\n"
        stem.with_suffix(".md").write_text(md)
        return md

    # one pass: per-channel extremes of every selected linear's input
    t0 = time.perf_counter()
    m0 = copy.deepcopy(ref)
    chan = {}
    for name, lin in select_linears(m0):
        chan[name] = MinMaxObserver(T8, ch_axis=-1, label=name)
        lin.register_forward_pre_hook(chan[name].hook)
    stats = SmoothingStats(m0, smoothing_pairs(m0))
    calibrate(m0, wins)
    t_pass = time.perf_counter() - t0
    del m0

    cfg = QuantConfig(weight="W8", activation=T8, method="smoothquant", observer="minmax", smooth_alpha=args.alpha)
    t0 = time.perf_counter()
    m1 = copy.deepcopy(ref)
    factors = smooth(m1, stats, args.alpha)
    s_of = {t: factors[p.source] for p in stats.pairs for t in p.targets}
    prepare(m1, cfg)
    for name, lin in m1.named_modules():
        obs = getattr(lin, INPUT_OBSERVER, None)
        if obs is None:
            continue
        lo, hi = chan[name].range()
        s = s_of.get(name, torch.ones(()))
        obs.min_val, obs.max_val = (lo / s).min().reshape(1), (hi / s).max().reshape(1)
        obs.count, obs.out_shape = 1, (1, 1)
    t_fold = time.perf_counter() - t0
    variants = [("", None)] + ([(args.dynamic_fallback, args.dynamic_fallback)] if args.dynamic_fallback else [])
    for label, fb in variants:
        m = copy.deepcopy(m1)
        t0 = time.perf_counter()
        if fb:
            unprepare(m, (fb,))
        convert(m, progress=False)
        n_fb = 0
        if fb:
            dyn = QuantConfig(weight="W8", activation=QuantScheme(bits=8, granularity="token", dynamic=True), targets=(fb,))
            n_fb = len(llmquant.quantize(m, dyn, progress=False).layers)
        name = f"SmoothQuant a={args.alpha} + static W8A8 (min-max)" + (f", {n_fb} x {fb[3:]} dynamic per-token" if fb else "")
        rows.append({"method": name, **score(m, ev, ref_lp), "quantize s": t_pass + t_fold + time.perf_counter() - t0,
                     "peak RSS MB": rss_mb()})
        print(format_table(rows[-1:]), file=sys.stderr)
        write()
        del m
    print(write(final=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
