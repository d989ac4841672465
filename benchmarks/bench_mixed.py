"""Mixed precision on the default model (SmolLM2-135M-Instruct) and the default text.

One run, fp32 baseline included: uniform RTN schemes against mixed plans at the same bits/weight (the 210
decoder linears planned, embeddings and head left in fp32, as uniform quantize() does), mixed plans with the
embedding/head planned too at the total sizes of llama.cpp's Q4_K_M / Q3_K_M / Q2_K files, bf16/fp16 weight
storage and autocast. Accuracy: perplexity, KL vs fp32 and top-1 agreement on the first ``--windows`` 512-token
windows (the reference log-probs are computed once). Sensitivity is measured on calibration windows from the
end of the text (disjoint). ``--kl-blocks`` also measures exact per-layer KL on those blocks to report the
Fisher estimate's rank agreement with it.

    python benchmarks/bench_mixed.py                       # accuracy (no lock needed)
    flock /work/wt/bench.lock python benchmarks/bench_mixed.py --speed-only   # prefill/decode tokens/s
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import llmquant
from llmquant.flows.mixed import plan_from_sensitivity, sensitivity
from llmquant import data
from llmquant.data import default_text, tokenize
from llmquant.report import format_table

LLAMA_CPP = {"Q4_K_M": (105e6, 0.059), "Q3_K_M": (93.5e6, 0.125), "Q2_K": (88e6, 0.44)}
UNIFORM = ("W4G64", "W4G128", "W3G32", "W3G128")  # nominal 4.5, 4.25, 4.0, 3.25 bits/weight with fp32 scales


@torch.inference_mode()
def reference_logp(model, ids):
    return [F.log_softmax(model(w[None]).logits[0, :-1].float(), -1) for w in ids]


@torch.inference_mode()
def accuracy(model, ids, ref, ctx=None):
    nll = kl = agree = 0.0
    n = 0
    for w, r in zip(ids, ref):
        if ctx is not None:
            with ctx():
                logits = model(w[None]).logits
        else:
            logits = model(w[None]).logits
        logp = F.log_softmax(logits[0, :-1].float(), -1)
        nll += float(F.nll_loss(logp, w[1:], reduction="sum"))
        kl += float(F.kl_div(logp, r, log_target=True, reduction="sum"))
        agree += float((logp.argmax(-1) == r.argmax(-1)).sum())
        n += w.numel() - 1
    return {"ppl": math.exp(nll / n), "KL": kl / n, "top-1": agree / n}


@torch.inference_mode()
def speed(model, ctx=None, prefill_len=512, decode=32, reps=3):
    ids = (torch.arange(prefill_len)[None] * 7919) % 40000 + 100
    cm = ctx or torch.no_grad
    with cm():
        model(ids[:, :16])  # warm-up (kernels prepared)
        pre = []
        for _ in range(reps):
            t = time.perf_counter()
            model(ids, use_cache=False)
            pre.append(time.perf_counter() - t)
        dec = []
        for _ in range(reps):
            out = model(ids[:, :64], use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(decode):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            dec.append(time.perf_counter() - t)
    return {"prefill tok/s": prefill_len / statistics.median(pre), "decode tok/s": decode / statistics.median(dec)}


def build(kind, arg, sens_lin, sens_all):
    """(model, summary-or-None, plan-or-None, autocast ctx-or-None)."""
    model, _ = llmquant.load_model()
    if kind == "fp32":
        return model, None, None, None
    if kind == "uniform":
        return model, llmquant.quantize(model, arg, progress=False), None, None
    if kind == "half":
        return model, llmquant.to_half(model, arg), None, None
    if kind == "autocast":
        return model, None, None, (lambda: llmquant.autocast(arg))
    if kind == "half+autocast":
        llmquant.to_half(model, arg)
        return model, None, None, (lambda: llmquant.autocast(arg))
    if kind == "mixed-bits":
        plan = plan_from_sensitivity(sens_lin, target_bits=arg)
    elif kind == "mixed-size":
        plan = plan_from_sensitivity(sens_all, max_size=arg)
    else:
        raise ValueError(kind)
    return model, llmquant.quantize(model, plan, progress=False), plan, None


def uniform_bits(sens, scheme: str) -> float:
    """Exact bits/weight of a uniform scheme over the planned layers (groups of 128 on 576-wide rows are
    ragged, so W4G128 and W3G128 take a little more than their nominal 4.25 / 3.25)."""
    j = sens.candidates.index(scheme)
    return 8 * sum(r[j] for r in sens.nbytes) / sum(u.numel for u in sens.units)


def configs(sens_lin):
    out = [("fp32", "fp32", None)]
    for s in UNIFORM:
        b = uniform_bits(sens_lin, s)
        out += [(f"uniform {s} ({b:.3f} b/w)", "uniform", s), (f"mixed @ {b:.3f} b/w", "mixed-bits", b)]
    for name, (size, _) in LLAMA_CPP.items():
        out.append((f"mixed+head @ {size / 1e6:g} MB (vs {name})", "mixed-size", size))
    out += [("bf16 weights (norms fp32)", "half", "bf16"), ("fp16 weights (norms fp32)", "half", "fp16"),
            ("autocast bf16 (fp32 weights)", "autocast", "bf16"), ("autocast fp16 (fp32 weights)", "autocast", "fp16"),
            ("bf16 weights + autocast bf16", "half+autocast", "bf16")]
    return out


SPEED_LABELS = ("fp32", "uniform W4G64 (4.500 b/w)", "mixed @ 4.500 b/w", "mixed+head @ 88 MB (vs Q2_K)",
                "bf16 weights (norms fp32)", "autocast bf16 (fp32 weights)", "bf16 weights + autocast bf16")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--method", default="fisher", choices=["fisher", "kl"])
    ap.add_argument("--kl-blocks", default="0,15", help="blocks whose exact per-layer KL is measured for the agreement")
    ap.add_argument("--speed-only", action="store_true", help="only tokens/s (run under flock /work/wt/bench.lock)")
    ap.add_argument("--out", default="benchmarks/results/mixed")
    ap.add_argument("--only", help="comma-separated substrings: run only configs whose label has one (fp32 always runs)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ref, tok = llmquant.load_model()
    sens_all = sensitivity(ref, include_head=True, method=args.method, progress=False)
    sens_lin = sens_all.without([u.name for u in sens_all.units if u.block is None])
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "windows": args.windows,
              "sensitivity": {"method": sens_all.method, "units": len(sens_all.units), "candidates": sens_all.candidates,
                              "tokens": sens_all.tokens, "wall_s": sens_all.seconds, "cpu_s": sens_all.extra.get("cpu_seconds")}}
    if args.speed_only:
        rows = []
        for label, kind, arg in configs(sens_lin):
            if label not in SPEED_LABELS:
                continue
            model, _, _, ctx = build(kind, arg, sens_lin, sens_all)
            rows.append({"config": label, **speed(model, ctx)})
            logging.info("%s", rows[-1])
            del model
        base = rows[0]
        for r in rows:
            r["prefill x fp32"] = r["prefill tok/s"] / base["prefill tok/s"]
            r["decode x fp32"] = r["decode tok/s"] / base["decode tok/s"]
        result["speed"] = rows
        Path(f"{out}_speed.json").write_text(json.dumps(result, indent=1))
        Path(f"{out}_speed.md").write_text(format_table(rows) + "\n")
        print(format_table(rows))
        return
    ids = data.windows(tokenize(tok, default_text()), args.windows, 512)
    ref_logp = reference_logp(ref, ids)
    rows = []
    keep = [k.strip() for k in args.only.split(",")] if args.only else None
    for label, kind, arg in configs(sens_lin):
        if keep and label != "fp32" and not any(k in label for k in keep):
            continue
        model, summary, plan, ctx = build(kind, arg, sens_lin, sens_all)
        acc = accuracy(model, ids, ref_logp, ctx)
        size = llmquant.model_size(model)
        row = {"config": label, **acc, "size MB": size.total_bytes / 1e6,
               "bits/w (planned)": None if summary is None else summary.bits_per_weight,
               "predicted KL": None if plan is None else plan.info["predicted_kl"]}
        if plan is not None:
            row["formats"] = " ".join(f"{k}:{v}" for k, v in sorted(plan.info["formats"].items()))
        rows.append(row)
        logging.info("%s", row)
        del model
    by = {r["config"]: r for r in rows}
    targets = []
    for s in UNIFORM:
        b = uniform_bits(sens_lin, s)
        if f"uniform {s} ({b:.3f} b/w)" not in by or f"mixed @ {b:.3f} b/w" not in by:
            continue
        u, m = by[f"uniform {s} ({b:.3f} b/w)"], by[f"mixed @ {b:.3f} b/w"]
        targets.append({"target": f"mixed KL <= 0.7x uniform {s} at {b:.3f} b/w", "mixed KL": m["KL"], "uniform KL": u["KL"],
                        "ratio": m["KL"] / u["KL"], "met": m["KL"] <= 0.7 * u["KL"]})
    for name, (size, kl) in LLAMA_CPP.items():
        if f"mixed+head @ {size / 1e6:g} MB (vs {name})" not in by:
            continue
        m = by[f"mixed+head @ {size / 1e6:g} MB (vs {name})"]
        targets.append({"target": f"KL below llama.cpp {name} ({kl}) at {size / 1e6:g} MB", "mixed KL": m["KL"],
                        "size MB": m["size MB"], "llama.cpp KL": kl, "met": m["KL"] < kl and m["size MB"] <= size / 1e6})
    targets.append({"target": "sensitivity scan under 10 min on 2 cores", "wall_s": sens_all.seconds,
                    "cpu_s": sens_all.extra.get("cpu_seconds"), "met": sens_all.seconds < 600})
    if args.kl_blocks:
        blocks = [int(b) for b in args.kl_blocks.split(",")]
        pat = "re:model\\.layers\\.(" + "|".join(map(str, blocks)) + ")\\..*"
        exact = sensitivity(ref, method="kl", targets=(pat,), candidates=sens_all.candidates, windows=2, progress=False)
        result["agreement"] = {"blocks": blocks, "kl_scan_wall_s": exact.seconds,
                               "kl_scan_cpu_s": exact.extra.get("cpu_seconds"), **sens_all.agreement(exact)}
        result["exact_kl_rows"] = exact.rows()
    result["rows"], result["targets"] = rows, targets
    Path(f"{out}.json").write_text(json.dumps(result, indent=1))
    md = [format_table(rows), "", format_table(targets)]
    if "agreement" in result:
        md += ["", json.dumps(result["agreement"], indent=1)]
    Path(f"{out}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    try:
        from llmquant.report import sensitivity_chart

        sensitivity_chart(sens_all, f"{out}_sensitivity.png", plan=plan_from_sensitivity(sens_lin, target_bits=4.25))
    except llmquant.LLMQuantError as e:
        logging.warning("%s", e)


if __name__ == "__main__":
    main()
