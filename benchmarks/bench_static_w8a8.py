"""Static W8A8 (int8 per-channel weights, one calibrated int8 scale per activation tensor) on the default model:
observers (min-max, percentile, MSE, histogram/KL) with and without SmoothQuant, against fp32 in the same run.

Protocol (DESIGN.md): evaluation on the first ``--windows`` 512-token windows of the default text; calibration
on ``--calib-samples`` x ``--seq-len`` tokens from the end of the text, disjoint from evaluation; KL is the mean
over predicted positions of KL(p_fp32 || p_quant). ``lm_head`` stays in float (as in the reference points).

One calibration pass per model state collects histograms (2048 bins per input tensor); each observer's rule
reads its range from the same histograms (``convert(model, observer=...)``), so the observers compare on
identical statistics. "quantize s" = the calibration pass(es) + SmoothQuant folding + convert, i.e. what one
``quantize_static`` run would take with that observer (the histogram pass costs the same for all observers).
Peak RSS is the process's high-water mark after each step (one process: it only grows).

    python benchmarks/bench_static_w8a8.py                 # 64 x 512 calibration tokens, 8 eval windows
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import llmquant
from llmquant import QuantConfig, QuantScheme
from llmquant.flows.calibrate import calibrate, convert, prepare, unprepare
from llmquant.flows.smooth import SmoothingStats, smooth, smoothing_pairs
from llmquant import data
from llmquant.data import calibration_windows, default_text, tokenize
from llmquant.models import context_length
from llmquant.report import format_table

OUT = Path(__file__).parent / "results"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.inference_mode()
def ref_logprobs(model, ids):
    return [F.log_softmax(model(w[None]).logits[0, :-1].float(), dim=-1) for w in ids]


@torch.inference_mode()
def score(model, ids, ref_lp):
    """Perplexity, KL(p_ref || p_model) and top-1 agreement, as llmquant.evaluate computes them."""
    nll = kl = agree = 0.0
    n = 0
    for w, rlp in zip(ids, ref_lp):
        lp = F.log_softmax(model(w[None]).logits[0, :-1].float(), dim=-1)
        tgt = w[1:]
        nll += float(F.nll_loss(lp, tgt, reduction="sum"))
        kl += float(F.kl_div(lp, rlp, log_target=True, reduction="sum"))
        agree += float((rlp.argmax(-1) == lp.argmax(-1)).sum())
        n += tgt.numel()
    return {"ppl": math.exp(nll / n), "kl": kl / n, "top1": agree / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--observers", default="minmax,percentile,mse,histogram")
    ap.add_argument("--alphas", default="0.8", help="SmoothQuant migration strengths to run ('search': per layer)")
    ap.add_argument("--search-observer", default="mse", help="activation rule used by the per-layer alpha search")
    ap.add_argument("--dynamic-fallback", default="re:.*down_proj",
                    help="also run the best SmoothQuant setting with these layers' activations per-token dynamic "
                         "(several sets separated by ';', '' to skip)")
    ap.add_argument("--plain-observers", default=None,
                    help="observers for the rows without SmoothQuant (default: --observers; '' skips them)")
    ap.add_argument("--no-dynamic", action="store_true", help="skip the per-token dynamic W8A8 row")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    observers = args.observers.split(",")
    alphas = [a if a == "search" else float(a) for a in args.alphas.split(",") if a]

    ref, tok = llmquant.load_model()
    fp32_mb = sum(p.numel() * p.element_size() for p in ref.parameters()) / 1e6
    ids = tokenize(tok, default_text())
    ev = data.windows(ids, args.windows, 512)
    wins = calibration_windows(tok, None, args.calib_samples, args.seq_len, context=context_length(ref))
    t = time.perf_counter()
    ref_lp = ref_logprobs(ref, ev)
    rows = [{"method": "fp32", "observer": "-", **score(ref, ev, ref_lp), "quantize s": 0.0,
             "peak RSS MB": rss_mb()}]
    print(f"fp32 eval {time.perf_counter() - t:.1f}s", file=sys.stderr)
    cols = ["method", "observer", "ppl", "ppl / fp32", "kl", "top1", "quantize s", "peak RSS MB"]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/bench_static_w8a8.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": llmquant.io.DEFAULT_MODEL_NAME, "fp32 params MB": round(fp32_mb, 1),
        "eval": f"first {ev.shape[0]} x 512-token windows of the default text",
        "calibration": f"{args.calib_samples} x {args.seq_len} tokens from the end of the default text",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }

    def write(final=False):
        for r in rows:
            r["ppl / fp32"] = r["ppl"] / rows[0]["ppl"]
        OUT.mkdir(parents=True, exist_ok=True)
        stem = OUT / f"static_w8a8{args.tag}"
        meta["complete"] = final
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        md = "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + format_table(rows, cols) + "\n"
        stem.with_suffix(".md").write_text(md)
        return md

    act = QuantScheme(bits=8, granularity="tensor", dynamic=False)
    hist_cfg = QuantConfig(weight="W8", activation=act, method="static", observer="histogram")

    def run_pass(model):
        t0 = time.perf_counter()
        prepare(model, hist_cfg)
        calibrate(model, wins)
        return time.perf_counter() - t0

    def evaluate_all(prepared, method, base_s, obs_list=None):
        best = None
        for obs in observers if obs_list is None else obs_list:
            m = copy.deepcopy(prepared)
            t0 = time.perf_counter()
            convert(m, observer=obs, progress=False)
            r = {"method": method, "observer": obs, **score(m, ev, ref_lp),
                 "quantize s": base_s + time.perf_counter() - t0, "peak RSS MB": rss_mb()}
            rows.append(r)
            print(format_table([r]), file=sys.stderr)
            write()
            if best is None or r["kl"] < best[0]["kl"]:
                best = (r, obs)
            del m
        return best

    # pass 1: the float model's activations (histograms for static scales + SmoothQuant's channel extremes)
    m0 = copy.deepcopy(ref)
    stats = SmoothingStats(m0, smoothing_pairs(m0), keep_samples=int("search" in alphas))
    pass1 = run_pass(m0)
    stats.remove()
    print(f"pass 1 {pass1:.1f}s", file=sys.stderr)
    plain = observers if args.plain_observers is None else [o for o in args.plain_observers.split(",") if o]
    evaluate_all(m0, "static W8A8", pass1, plain)
    del m0

    best_sq = None
    for alpha in alphas:
        m1 = copy.deepcopy(ref)
        t0 = time.perf_counter()
        smooth(m1, stats, alpha, observer=args.search_observer)
        if alpha == "search":
            chosen = list(stats.chosen_alphas.values())
            meta["searched alphas (per pair: counts)"] = {a: chosen.count(a) for a in sorted(set(chosen))}
        t_smooth = time.perf_counter() - t0
        pass2 = run_pass(m1)
        b = evaluate_all(m1, f"SmoothQuant a={alpha} + static W8A8", pass1 + t_smooth + pass2)
        if best_sq is None or b[0]["kl"] < best_sq[0]["kl"]:
            best_sq = (*b, alpha, m1)
        else:
            del m1

    for fallback in [f for f in args.dynamic_fallback.split(";") if f] if best_sq is not None else []:
        # the best SmoothQuant setting, with the fallback layers' activations quantized per token at run time
        r, obs, alpha, m1 = best_sq
        m = copy.deepcopy(m1)
        t0 = time.perf_counter()
        unprepare(m, (fallback,))
        convert(m, observer=obs, progress=False)
        dyn = QuantConfig(weight="W8", activation=QuantScheme(bits=8, granularity="token", dynamic=True),
                          targets=(fallback,))
        n_fb = len(llmquant.quantize(m, dyn, progress=False).layers)
        rows.append({"method": f"SmoothQuant a={alpha} + static W8A8, {n_fb} x {fallback[3:]} dynamic per-token",
                     "observer": obs, **score(m, ev, ref_lp),
                     "quantize s": r["quantize s"] + time.perf_counter() - t0, "peak RSS MB": rss_mb()})
        print(format_table(rows[-1:]), file=sys.stderr)
        write()
        del m

    # per-token dynamic W8A8 (no calibration) for reference
    if args.no_dynamic:
        print(write(final=True))
        return 0
    m = copy.deepcopy(ref)
    t0 = time.perf_counter()
    llmquant.quantize(m, QuantConfig(weight="W8", activation=QuantScheme(bits=8, granularity="token", dynamic=True)),
                      progress=False)
    rows.append({"method": "dynamic W8A8 (per-token, reference point)", "observer": "-", **score(m, ev, ref_lp),
                 "quantize s": time.perf_counter() - t0, "peak RSS MB": rss_mb()})

    print(write(final=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
