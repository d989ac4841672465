"""RTN vs GPTQ vs AWQ vs HQQ vs AutoRound weight-only PTQ on the default model (SmolLM2-135M-Instruct), fp32 in the same run.

Calibration: ``--calib-samples`` x ``--seq-len`` tokens from the end of the default text (disjoint from the
evaluation windows at its start). Evaluation: the first ``--windows`` 512-token windows of the default text.
Each configuration runs in its own process, so its peak RSS (measured right after quantizing, before the
reference model is loaded for KL) is its own. Writes benchmarks/results/ptq_weight.{json,md}.

    flock /work/wt/bench.lock python benchmarks/bench_ptq_weight.py --windows 8
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMES = ["W4G64", "W4G128", "W3G32"]
METHODS = ["rtn", "gptq", "awq"]
PASS_OPTIONS = ("bf16", "onepass", "twopass")  # variant suffixes that set the calibration passes (CalibSpec), not the method


def _rss_mb() -> float:
    from llmquant.resources import peak_rss_mb

    return peak_rss_mb()  # MB (1e6 bytes), the one meter llmquant itself uses


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def weight_scheme(name: str):
    """A preset name, or one with an ``F`` suffix (``W4G64F``): asymmetric with float zero points and fp16
    scales and zeros, the grid the HQQ library stores."""
    from llmquant import QuantScheme
    from llmquant.schemes import resolve_scheme

    if name.upper().endswith("F"):
        s = resolve_scheme(name[:-1])
        return QuantScheme(bits=s.bits, symmetric=False, group_size=s.group_size, zero_point="float",
                           scale_dtype="float16")
    return resolve_scheme(name)


def frontier_config(method: str, args):
    """``(method, method_params)`` for the HQQ / AutoRound variants: ``hqq`` (its defaults: the unweighted
    guard), ``hqq-z`` (HQQ's zero point alone, no scale update), ``hqq-off`` / ``hqq-imse`` (no guard / the
    importance-weighted guard, calibrated), ``autoround`` (``--ar-steps`` / ``--ar-batch``), and ``awq-hqq`` /
    ``awq-autoround`` (compositions after AWQ's scales)."""
    from llmquant import AutoRoundParams, HQQParams

    base, *opts = method.split("-")
    if base == "hqq":
        guard = next((o for o in opts if o in ("off", "mse", "imse")), "mse")
        return base, HQQParams(optimize_scale="z" not in opts, guard=guard)
    last = opts[-1] if base == "awq" else base
    params = AutoRoundParams(steps=args.ar_steps, batch=args.ar_batch) if last == "autoround" else None
    return ([base, last], [None, params]) if last != base else (base, params)


def method_config(method: str):
    """``(method, method_params)`` for a variant name. ``gptq`` / ``rtn`` / ``awq``: the defaults;
    ``gptq-<opt>-<opt>...``: the paper's GPTQ (columns in order, min-max groups in the sweep, damp 0.01)
    plus each option: ``ao`` (act_order "full"), ``gao`` (act_order "group"), ``sg`` (static groups),
    ``mse`` / ``imse`` (the groups' range search), ``d05`` (damp 0.05), ``awq`` (AWQ's scales first);
    ``rtn-mse`` / ``rtn-imse``: RTN with that range search. ``bf16`` (any method): the calibration passes in
    bfloat16 (``CalibSpec(compute="bfloat16")``); ``onepass`` (any calibrated method): one float pass over the
    whole model gathers every layer's statistics, each layer seeing the float model's inputs
    (``CalibSpec(sequential=False)``) instead of layer by layer; ``twopass``: each layer in two passes (float
    statistics, then quantized outputs: ``CalibSpec(true_sequential=False)``) instead of one; all handled by
    :func:`run_one`."""
    base, *opts = [o for o in method.split("-") if o not in PASS_OPTIONS]
    if base == "rtn" and opts:
        from llmquant import RTNParams

        return base, RTNParams(observer=opts[0])
    if base != "gptq" or not opts:
        return base, None
    from llmquant import GPTQParams

    known = {"ao", "gao", "sg", "mse", "imse", "d05", "awq", "plain"}
    if set(opts) - known:
        raise SystemExit(f"unknown GPTQ options {sorted(set(opts) - known)}; known: {sorted(known)}")
    params = GPTQParams(act_order="full" if "ao" in opts else "group" if "gao" in opts else "off",
                        static_groups="sg" in opts, damp=0.05 if "d05" in opts else 0.01,
                        observer="imse" if "imse" in opts else "mse" if "mse" in opts else "minmax")
    if "awq" in opts:  # AWQ's scales folded in first, then GPTQ: a composition of two methods
        return ["awq", "gptq"], [None, params]
    return base, params


def run_one(method: str, scheme: str, args) -> dict:
    import torch

    import llmquant
    from llmquant import CalibSpec, QuantConfig
    from llmquant.schemes.methods import params_to_json

    torch.set_num_threads(args.threads)
    model, tok = llmquant.load_model()
    rss_loaded = _rss_mb()
    fp32_mb = sum(p.numel() * 4 for p in model.parameters()) / 1e6
    base, params = method_config(method)
    parts = method.split("-")
    core = "-".join(o for o in parts if o not in PASS_OPTIONS)
    if base in ("hqq", "autoround") or (base == "awq" and core.split("-")[-1] in ("hqq", "autoround")):
        base, params = frontier_config(core, args)
    bf16 = "bf16" in parts or args.compute == "bfloat16"
    compute = {"compute": "bfloat16"} if bf16 else {}  # (older llmquant has no compute field)
    if "onepass" in parts:
        compute["sequential"] = False
    if "twopass" in parts:
        compute["true_sequential"] = False
    cfg = QuantConfig(weight=weight_scheme(scheme), method=base, method_params=params,
                      calibration=CalibSpec(samples=args.calib_samples, seq_len=args.seq_len, **compute))
    t0, c0 = time.perf_counter(), _cpu_s()
    summary = llmquant.quantize(model, cfg, progress=False)
    seconds, cpu = time.perf_counter() - t0, _cpu_s() - c0
    peak = _rss_mb()
    ref, _ = llmquant.load_model()
    res = llmquant.evaluate(model, reference=ref, tokenizer=tok, windows=args.windows, progress=False)
    return {
        "method": method, "scheme": scheme, "perplexity": res.perplexity, "kl": res.kl, "top1": res.top1,
        "quantize_s": seconds, "quantize_cpu_s": cpu, "peak_rss_mb": peak, "rss_after_load_mb": rss_loaded, "fp32_model_mb": fp32_mb,
        "layer_errors": getattr(summary, "layer_errors", None), "bits_per_weight": summary.bits_per_weight,
        "weight_scheme": cfg.weight.name, "method_params": params_to_json(cfg.method_params),
        "phase_seconds": {k: round(v, 2) for k, v in getattr(summary, "phase_seconds", {}).items()},
    }


def run_fp32(args) -> dict:
    import torch

    import llmquant

    torch.set_num_threads(args.threads)
    model, tok = llmquant.load_model()
    res = llmquant.evaluate(model, tokenizer=tok, windows=args.windows, progress=False)
    return {"method": "fp32", "scheme": "-", "perplexity": res.perplexity, "kl": 0.0, "top1": 1.0,
            "quantize_s": 0.0, "quantize_cpu_s": 0.0, "peak_rss_mb": _rss_mb(), "eval_s": res.seconds}


def table(rows: list[dict], fp32_ppl: float) -> str:
    head = ("| method | scheme | perplexity | ppl / fp32 | KL | top-1 | quantize s (wall) | quantize s (CPU) | peak RSS MB |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['method']} | {r['scheme']} | {r['perplexity']:.3f} | {r['perplexity'] / fp32_ppl:.2f} | {r['kl']:.4f} | "
        f"{r['top1']:.3f} | {r['quantize_s']:.1f} | {r['quantize_cpu_s']:.1f} | {r['peak_rss_mb']:.0f} |\n"
        for r in rows
    )
    return head + body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compute", default="float32", help="calibration passes' arithmetic: float32 or bfloat16")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ar-steps", type=int, default=200, help="autoround: signed-gradient steps per layer")
    ap.add_argument("--ar-batch", type=int, default=None, help="autoround: calibration windows per step")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 row (when another run of the same "
                    "protocol has it)")
    ap.add_argument("--jobs", help="METHOD:SCHEME,... in this order (instead of --methods x --schemes)")
    ap.add_argument("--out", default="ptq_weight")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "SCHEME"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        m, s = args.one
        print(json.dumps(run_fp32(args) if m == "fp32" else run_one(m, s, args)))
        return 0
    RESULTS.mkdir(exist_ok=True)
    jobs = [] if args.no_fp32 else [("fp32", "-")]
    if args.jobs:  # an explicit order, e.g. when a run may be stopped before its end (rows are saved as they come)
        jobs += [tuple(j.split(":")) for j in args.jobs.split(",")]
    else:
        jobs += [(m, s) for s in args.schemes.split(",") for m in args.methods.split(",")]
    rows = []
    base = [sys.executable, __file__, "--windows", str(args.windows), "--calib-samples", str(args.calib_samples),
            "--seq-len", str(args.seq_len), "--threads", str(args.threads), "--compute", args.compute,
            "--ar-steps", str(args.ar_steps)]
    if args.ar_batch:
        base += ["--ar-batch", str(args.ar_batch)]
    for m, s in jobs:
        out = subprocess.run(base + ["--one", m, s], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{m} {s} failed")
        rows.append({**json.loads(out.stdout.strip().splitlines()[-1]), "windows": args.windows})
        r = rows[-1]
        (RESULTS / f"{args.out}.partial.json").write_text(json.dumps(rows, indent=1))
        print(f"{m:5s} {s:7s} ppl {r['perplexity']:.3f} KL {r['kl']:.4f} top1 {r['top1']:.3f} "
              f"{r['quantize_s']:.1f}s peak RSS {r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    fp32 = rows[0]["perplexity"] if not args.no_fp32 else float("nan")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "threads": args.threads,
        "windows": args.windows, "calibration": f"{args.calib_samples} x {args.seq_len} tokens from the end of the default text",
        "compute": args.compute,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = (f"{meta['date']}, `{meta['command']}`; eval {args.windows} x 512-token windows; calibration {meta['calibration']}; "
          f"torch threads {args.threads}.\n\n" + table(rows, fp32))
    (RESULTS / f"{args.out}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
