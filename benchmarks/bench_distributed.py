"""One process vs two on this machine: GPTQ W4G64 and QAT W4G64 on the default model, through the CLI
(``--workers 2`` is the same as ``torchrun --standalone --nproc-per-node 2 -m llmquant ...``).

Configurations, in one run: 1 process x 1 thread, 1 process x 2 threads, 2 processes x 1 thread. Each
command is timed from start to exit (model loading and saving included) and, from its own output, the
quantization / training seconds. The outputs are then compared (tensor sha256) and evaluated (KL against
the float model on the standard 8 x 512-token windows), so "the results match" is checked, not assumed.

    flock /tmp/llmquant-bench.lock python benchmarks/bench_distributed.py --qat-steps 40
    flock /tmp/llmquant-bench.lock python benchmarks/bench_distributed.py --layer-costs 8   # one 8B-shaped layer
    flock /tmp/llmquant-bench.lock python benchmarks/bench_distributed.py --shard-memory --qat-steps 4

``--shard-memory``: QAT in one process, in two with DistributedDataParallel (each a whole copy) and in two
sharded with FSDP2 (``--shard``), the model either loaded whole by every process then sharded (as before
each rank read its own rows; the qat command's loader swapped for a whole load) or read by rows (what
``--shard`` does now): the largest process's peak resident memory (``/usr/bin/time``), the training
seconds, the last loss, and whether the saved tensors equal those of the run that loads whole; and rank
0's peak before the training loop (loading, preparing, sharding: the qat command's "load peak MB"). MB
are 1e6 bytes, as llmquant reports them (``/usr/bin/time``'s KiB converted).

Writes benchmarks/results/distributed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("2 processes x 1 thread", 2, 1)]


def _run(cmd: list[str], threads: int) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE.parent / "src")}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "llmquant", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return wall, r.stdout


def _tensors(folder: Path) -> dict:
    return {k: v["sha256"] for k, v in json.loads((folder / "llmquant.json").read_text())["tensors"].items()}


def _kl(folder: Path) -> float:
    _, out = _run(["eval", str(folder), "--windows", "8", "--json"], 2)
    return json.loads(out[out.index("{"):])["kl"]


def layer_costs(windows: int, threads: int) -> dict:
    """Seconds by phase of GPTQ W4G128 on one decoder layer of Llama-3-8B's shape (random weights, one
    layer built in memory), ``windows`` x 512 calibration tokens: what a distributed run splits (the float
    and quantized passes), deals out (the solves) and sends (X^T X sums, codes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import llmquant
    from llmquant import CalibSpec, QuantConfig

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    calib = torch.randint(0, 1024, (windows, 512), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    s = llmquant.quantize(model, QuantConfig(weight="W4G128", method="gptq", calibration=CalibSpec(samples=windows)),
                          calib=calib, progress=False)
    sums = [(4096 * 4096 * 3 + 14336 * 14336) * 8, (4096 + 14336) * 8]  # float64 X^T X and sum|X| per layer
    return {"windows": windows, "threads": threads, "seconds": time.perf_counter() - t0,
            "phases_s": s.phase_seconds, "stats_bytes_per_layer": sum(sums),
            "codes_bytes_per_layer": (4096 * (4096 + 1024 * 2 + 4096) + 3 * 4096 * 14336) * 2}  # int16 codes sent


# the sharded run as it was before each rank read only its own rows: every process loads the whole model,
# copies it as the teacher, then shards both (the qat command's loader swapped for a whole load)
WHOLE_THEN_SHARD = ("import sys, llmquant, llmquant.cli.commands as c; "
                    "c._load_for_qat = lambda args, plan: llmquant.load_model(args.model); "
                    "from llmquant.cli import main; sys.exit(main(sys.argv[1:]))")


def _ranks_timed(driver: list[str], argv: list[str], env: dict, world: int = 2) -> tuple[str, float, str]:
    """``world`` ranks of ``driver argv`` with torchrun's environment (as ``--workers`` sets it), each under
    ``/usr/bin/time``: (rank 0's stdout, the largest process's peak RSS in MB, the stderr of a failure)."""
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    procs = [subprocess.Popen(["/usr/bin/time", "-f", "MAXRSS_KB %M", *driver, *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                                   "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "RANK": str(r),
                                   "LOCAL_RANK": str(r)}) for r in range(world)]
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        return "", 0.0, "\n".join(e[-3000:] for _, e in outs)
    rss = max(int(e.rsplit("MAXRSS_KB ", 1)[1].split()[0]) for _, e in outs) * 1024 / 1e6  # KiB -> MB (1e6 B)
    return outs[0][0], rss, ""


def shard_memory(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="llmquant-shard-bench-"))
    base = ["qat", "--bits", "4", "--group-size", "64", "--steps", str(args.qat_steps), "--batch", "2"]
    rows = []
    for label, extra in (("1 process", []), ("2 processes, DDP (whole copies)", ["--workers", "2"]),
                         ("2 processes, FSDP2 (--shard), loaded whole then sharded", None),
                         ("2 processes, FSDP2 (--shard), each rank reads its rows", ["--workers", "2", "--shard"])):
        out = tmp / str(len(rows))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
        t0 = time.perf_counter()
        if extra is None:
            stdout, rss, err = _ranks_timed([sys.executable, "-c", WHOLE_THEN_SHARD], [*base, "--shard", "-o", str(out)], env)
        else:
            r = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB %M", sys.executable, "-m", "llmquant", *base, *extra,
                                "-o", str(out)], capture_output=True, text=True, env=env)
            stdout, err = r.stdout, r.stderr[-3000:] if r.returncode else ""
            rss = 0.0 if err else int(r.stderr.rsplit("MAXRSS_KB ", 1)[1].split()[0]) * 1024 / 1e6
        wall = time.perf_counter() - t0
        if err:
            raise SystemExit(f"{label} failed:\n{err}")
        table = [ln for ln in stdout.splitlines() if ln.startswith("|")]
        cols = dict(zip([h.strip() for h in table[0].strip("|").split("|")], [v.strip() for v in table[-1].strip("|").split("|")]))
        rows.append({"config": label, "wall_s": wall, "train_s": float(cols["minutes"]) * 60,
                     "last_loss": float(cols["last loss"]), "peak_rss_mb_largest_process": rss,
                     "train_loop_peak_mb_rank0": float(cols["train peak MB"]),
                     "load_peak_mb_rank0": float(cols["load peak MB"]), "tensors": _tensors(out)})
        print({k: v for k, v in rows[-1].items() if k != "tensors"}, flush=True)
    ref = rows[2]["tensors"]
    for r in rows:  # the saved tensors (sha256) of each run against the sharded run that loads whole
        r["tensors_identical_to_whole_then_sharded"] = r.pop("tensors") == ref
    lines = ["| QAT W4G64, default model | peak RSS MB before training (rank 0) | training loop peak RSS MB (rank 0) | "
             "largest process peak RSS MB (whole run) | train s | command wall s | last loss | "
             "saved tensors = loaded whole then sharded |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['load_peak_mb_rank0']:.0f} | {r['train_loop_peak_mb_rank0']:.0f} | "
              f"{r['peak_rss_mb_largest_process']:.0f} | "
              f"{r['train_s']:.1f} | {r['wall_s']:.1f} | {r['last_loss']:.5f} | "
              f"{'yes' if r['tensors_identical_to_whole_then_sharded'] else 'no'} |" for r in rows]
    Path(args.out + "_shard.json").write_text(json.dumps({"qat_steps": args.qat_steps, "rows": rows}, indent=1))
    Path(args.out + "_shard.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--qat-steps", type=int, default=100)
    ap.add_argument("--skip", default="", help="comma-separated: gptq, qat")
    ap.add_argument("--out", default=str(HERE / "results" / "distributed"))
    ap.add_argument("--layer-costs", type=int, metavar="WINDOWS",
                    help="only measure one Llama-3-8B-shaped layer's GPTQ phases with this many 512-token windows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shard-memory", action="store_true", help="QAT: 1 process, 2 with DDP, 2 sharded (FSDP2)")
    args = ap.parse_args()
    if args.shard_memory:
        shard_memory(args)
        return
    if args.layer_costs:
        res = layer_costs(args.layer_costs, args.threads)
        print(json.dumps(res, indent=1))
        Path(args.out + "_layer8b.json").write_text(json.dumps(res, indent=1))
        return
    tmp = Path(tempfile.mkdtemp(prefix="llmquant-dist-bench-"))
    jobs = {
        "gptq": ["quantize", "--method", "gptq", "--scheme", "W4G64", "--calib-samples", str(args.calib_samples),
                 "--seq-len", "512"],
        "qat": ["qat", "--bits", "4", "--group-size", "64", "--steps", str(args.qat_steps)],
    }
    rows = []
    for what, base in jobs.items():
        if what in args.skip.split(","):
            continue
        outs = []
        for label, procs, threads in CONFIGS:
            out = tmp / f"{what}-{procs}x{threads}"
            cmd = [*base, "-o", str(out)] + (["--workers", str(procs)] if procs > 1 else [])
            wall, stdout = _run(cmd, threads)
            table = [ln for ln in stdout.splitlines() if ln.startswith("|")]
            cols = dict(zip([h.strip() for h in table[0].strip("|").split("|")],
                            [v.strip() for v in table[-1].strip("|").split("|")]))
            secs = float(cols["seconds"]) if what == "gptq" else float(cols["minutes"]) * 60
            phases = [ln for ln in stdout.splitlines() if ln.startswith("seconds by phase: ")]
            phases = {k: float(v) for k, v in (p.rsplit(" ", 1) for p in phases[0][18:].split(", "))} if phases else {}
            outs.append(out)
            rows.append({"job": what, "config": label, "processes": procs, "threads": threads, "wall_s": wall,
                         "work_s": secs, "phases_s": phases})
            print(rows[-1], flush=True)
        ref = _tensors(outs[0])
        for out, row in zip(outs, rows[-len(outs):]):
            t = _tensors(out)
            row["tensors_identical_to_1x1"] = t == ref
            row["tensors_differing"] = sum(t[k] != ref[k] for k in ref)
            row["kl"] = _kl(out)
            print(row, flush=True)
        one = rows[-len(outs)]["work_s"]
        for row in rows[-len(outs):]:
            row["speedup_vs_1x1"] = one / row["work_s"]
            row["efficiency"] = row["speedup_vs_1x1"] / (row["processes"] * row["threads"])
    Path(args.out + ".json").write_text(json.dumps({"calib_samples": args.calib_samples, "qat_steps": args.qat_steps,
                                                    "cpus": os.cpu_count(), "rows": rows}, indent=1))
    lines = ["| job | configuration | command wall s | quantize / train s | speed-up vs 1x1 | efficiency | "
             "tensors = 1x1 | KL (8 x 512) | seconds by phase (rank 0) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "yes" if r["tensors_identical_to_1x1"] else f"no ({r['tensors_differing']} differ)"
        ph = ", ".join(f"{k} {v:.0f}" for k, v in r["phases_s"].items() if v >= 0.5)
        lines.append(f"| {r['job']} | {r['config']} | {r['wall_s']:.1f} | {r['work_s']:.1f} | {r['speedup_vs_1x1']:.2f}x "
                     f"| {r['efficiency']:.2f} | {same} | {r['kl']:.4f} | {ph} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
