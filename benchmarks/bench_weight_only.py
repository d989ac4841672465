"""Weight-only RTN on the default model: accuracy, size and speed against fp32, all in one run.

    flock /work/wt/bench.lock .venv/bin/python benchmarks/bench_weight_only.py [--windows 8] [--threads 2]

Writes benchmarks/results/weight_only.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import llmquant
from llmquant.bench import measure_speed, peak_rss_mb
from llmquant.report import format_table

CONFIGS = ["W8", "W4G32", "W4G32A", "W4G64", "W4G64A", "W4G128", "W4G128A"]


def folder_bytes(p: Path) -> tuple[int, int]:
    total = sum(f.stat().st_size for f in p.iterdir())
    return total, (p / "model.safetensors").stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (speed is reported with it)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/weight_only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref, tok = llmquant.load_model()
    tmp = Path(tempfile.mkdtemp())
    rows, raw = [], []

    def record(label, model, seconds_q, kernels):
        res = llmquant.evaluate(model, reference=ref, tokenizer=tok, windows=args.windows)
        sp = None if args.no_speed else measure_speed(model)
        d = tmp / label
        llmquant.save(model, tok, d)
        total, st = folder_bytes(d)
        shutil.rmtree(d)
        entry = {"label": label, "eval": res.to_dict(), "speed": sp and sp.to_dict(), "folder_bytes": total,
                 "safetensors_bytes": st, "quantize_seconds": seconds_q, "kernels": kernels}
        raw.append(entry)
        base = raw[0]
        row = {
            "config": label,
            "kernel": kernels,
            "ppl": res.perplexity,
            "KL": res.kl,
            "top-1": res.top1,
            "weights MB": st / 1e6,
            "x fp32": st / base["safetensors_bytes"],
            "bits/w (q. layers)": res.size["bits_per_weight_quantized"] or 32.0,
        }
        if sp:
            row["prefill tok/s"] = sp.prefill_tokens_per_s
            row["x"] = sp.prefill_tokens_per_s / base["speed"]["prefill_tokens_per_s"]
            row["decode tok/s"] = sp.decode_tokens_per_s
            row["x "] = sp.decode_tokens_per_s / base["speed"]["decode_tokens_per_s"]
        rows.append(row)
        print(format_table(rows[-1:]), flush=True)

    record("fp32", ref, 0.0, "torch fp32")
    for preset in args.configs.split(","):
        m, _ = llmquant.load_model()
        t = time.perf_counter()
        s = llmquant.quantize(m, preset, progress=False)
        record(f"rtn {preset} ({s.layers[0].scheme})", m, time.perf_counter() - t, ",".join(s.kernels))
        del m
    env = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "llmquant": llmquant.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "eval": f"{args.windows} x 512-token windows of the default text",
        "peak_rss_mb": peak_rss_mb(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "results": raw}, indent=1))
    md = format_table(rows)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    print(json.dumps(env))


if __name__ == "__main__":
    main()
