"""QAT vs RTN on the default model (SmolLM2-135M-Instruct), fp32 in the same run.

Each measurement runs in its own subprocess so that its peak RSS is its own. Training windows come
from the end of the default text (llmquant.data.windows), evaluation from its start (the first
``--windows`` 512-token windows), so they never overlap. Training is given a fixed time budget
(``--minutes`` per scheme, capped at ``--steps``).

    PYTHONPATH=src python benchmarks/bench_qat.py --schemes W3G32,W4G64,W2G32 --minutes 10
    PYTHONPATH=src python benchmarks/bench_qat.py --schemes W4G64 --lora-memory   # full vs LoRA peak RSS

Writes benchmarks/results/qat.json and qat.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _rss_mb() -> float:
    from llmquant.resources import peak_rss_mb

    return peak_rss_mb()  # MB (1e6 bytes), the one meter llmquant itself uses


def child(job: dict) -> dict:
    import torch
    import llmquant

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    ref, tok = llmquant.load_model()
    out = {"job": job["kind"], "scheme": job.get("scheme")}
    if job["kind"] == "fp32":
        res = llmquant.evaluate(ref, reference=ref, windows=job["windows"], progress=False)
    else:
        model, _ = llmquant.load_model()
        if job["kind"] == "rtn":
            t0 = time.perf_counter()
            llmquant.quantize(model, job["scheme"], progress=False)
            out["quantize_s"] = time.perf_counter() - t0
        else:  # qat
            if job.get("eval_init"):  # the starting point alone (0 steps), converted like the trained model
                init_model, _ = llmquant.load_model()
                llmquant.prepare_qat(init_model, job["scheme"], init=job["init"], progress=False)
                llmquant.convert_qat(init_model, progress=False)
                e0 = llmquant.evaluate(init_model, reference=ref, tokenizer=tok, windows=job["windows"], progress=False)
                out.update(init_kl=e0.kl, init_perplexity=e0.perplexity, init_top1=e0.top1)
                del init_model
            r = llmquant.train_qat(
                model, teacher=ref, config=job["scheme"], steps=job["steps"], lr=job["lr"], lr_qparams=job["lr_qparams"],
                warmup=job["warmup"], init=job["init"], seq_len=job["seq_len"],
                batch=job["batch"], grad_accum=job["grad_accum"], max_seconds=job["minutes"] * 60,
                lora_rank=job["lora_rank"], gradient_checkpointing=job["grad_ckpt"],
                learn_scales=not job["frozen_scales"], progress=False,
            )
            out.update(train_s=r.seconds, steps=r.steps, tokens=r.tokens, tokens_per_s=r.tokens_per_s,
                       trainable_params=r.trainable_params, first_loss=r.losses[0], last_loss=r.losses[-1],
                       losses=r.losses, train_peak_rss_mb=r.peak_rss_mb)
        if job.get("eval", True):
            res = llmquant.evaluate(model, reference=ref, tokenizer=tok, windows=job["windows"], progress=False)
        else:
            res = None
    if res is not None:
        out.update(kl=res.kl, perplexity=res.perplexity, top1=res.top1, eval_tokens=res.tokens,
                   size_mb=res.size["total_bytes"] / 1e6)
    out["peak_rss_mb"] = _rss_mb()
    return out


def run_job(job: dict) -> dict:
    env = dict(os.environ)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"job {job} failed:\n{p.stderr[-3000:]}")
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="W3G32,W4G64,W2G32")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per scheme")
    ap.add_argument("--steps", type=int, default=60, help="step cap (the time budget usually ends first)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lr-qparams", type=float, default=2e-4, help="learning rate of the LSQ step sizes / zeros")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--init", default="mse", help="rtn (min-max) or mse (least-squares clipping)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--frozen-scales", action="store_true")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job (1: the machine is shared)")
    ap.add_argument("--lora-memory", action="store_true", help="peak RSS of a few steps: full vs LoRA vs checkpointing")
    ap.add_argument("--lora-ranks", default="0,16", help="with --lora-memory: the ranks to measure (0: full)")
    ap.add_argument("--no-rtn", action="store_true")
    ap.add_argument("--reuse", help="a JSON written by an earlier run of this script whose fp32/rtn rows to reuse")
    ap.add_argument("--eval-init", default="", help="schemes whose QAT starting point (0 steps) is evaluated too")
    ap.add_argument("--out", default=str(HERE / "results" / "qat"))
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return
    base = dict(windows=args.windows, threads=args.threads, steps=args.steps, lr=args.lr, lr_qparams=args.lr_qparams,
                warmup=args.warmup, init=args.init, seq_len=args.seq_len,
                batch=args.batch, grad_accum=args.grad_accum, minutes=args.minutes, lora_rank=args.lora_rank,
                grad_ckpt=args.grad_ckpt, frozen_scales=args.frozen_scales)
    rows = []
    t0 = time.time()
    if args.lora_memory:
        for s in args.schemes.split(","):
            for rank, ck in [(int(r), c) for c in (False, True) for r in args.lora_ranks.split(",")]:
                job = dict(base, kind="qat", scheme=s, steps=args.steps, minutes=1e9, lora_rank=rank, grad_ckpt=ck, eval=False)
                r = run_job(job)
                r.update(lora_rank=rank, grad_ckpt=ck)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    else:
        old = json.loads(Path(args.reuse).read_text())["rows"] if args.reuse else []
        reused = {(r["job"], r["scheme"]): dict(r, reused_from=args.reuse) for r in old if r["job"] in ("fp32", "rtn")}
        rows.append(reused.get(("fp32", None)) or run_job(dict(base, kind="fp32")))
        print(json.dumps(rows[-1]), flush=True)
        write(args, rows, base, t0)
        for s in args.schemes.split(","):
            if ("rtn", s) in reused:
                rows.append(reused[("rtn", s)])
            elif not args.no_rtn:
                rows.append(run_job(dict(base, kind="rtn", scheme=s)))
                print(json.dumps(rows[-1]), flush=True)
            rows.append(run_job(dict(base, kind="qat", scheme=s, eval_init=s in args.eval_init.split(","))))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), flush=True)
            write(args, rows, base, t0)
    if args.lora_memory:
        write(args, rows, base, t0)


def write(args, rows, base, t0) -> None:
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:], "settings": base,
            "wall_s": time.time() - t0, "machine": f"{os.cpu_count()} CPUs (shared)"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    print(markdown(rows, meta), flush=True)


def markdown(rows: list[dict], meta: dict) -> str:
    fp = next((r for r in rows if r["job"] == "fp32"), None)
    rtn = {r["scheme"]: r for r in rows if r["job"] == "rtn"}
    lines = [f"{meta['date']}, `python benchmarks/bench_qat.py {' '.join(meta['argv'])}`", ""]
    if fp is None:  # memory table
        lines += ["| scheme | LoRA rank | grad ckpt | trainable params | tokens/s | peak RSS MB |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['scheme']} | {r['lora_rank']} | {r['grad_ckpt']} | {r['trainable_params'] / 1e6:.2f} M | "
                         f"{r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} |")
        return "\n".join(lines) + "\n"
    lines += ["| model | steps | train min | tokens/s | KL | KL / RTN | perplexity | ppl / fp32 | top-1 | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    rows = list(rows)
    for r in list(rows):
        if r["job"] == "qat" and "init_kl" in r:
            rows.insert(rows.index(r), {"job": f"{meta['settings'].get('init', '')}-init (0 steps)", "scheme": r["scheme"],
                                        "kl": r["init_kl"], "perplexity": r["init_perplexity"], "top1": r["init_top1"],
                                        "peak_rss_mb": float("nan")})
    for r in rows:
        name = "fp32" if r["job"] == "fp32" else f"{r['job']} {r['scheme']}"
        k_rtn = ""
        if r["job"] == "qat" and r["scheme"] in rtn:
            k_rtn = f"{r['kl'] / rtn[r['scheme']]['kl']:.2f}x"
        lines.append(
            f"| {name} | {r.get('steps', '')} | {r['train_s'] / 60:.1f} | {r['tokens_per_s']:.0f} | " if r["job"] == "qat"
            else f"| {name} | | | | "
        )
        lines[-1] += (f"{r['kl']:.4f} | {k_rtn} | {r['perplexity']:.2f} | {r['perplexity'] / fp['perplexity']:.2f}x | "
                      f"{r['top1']:.3f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
