"""Dynamic quantization on the default model, one run: accuracy and speed against fp32 measured alongside.

llmquant's dynamic rows use its defaults (int8 weights per output channel with a zero point, symmetric
activations) unless the row says otherwise. Rows: fp32; PyTorch's own ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)``
exactly as its docs show it (lm_head included, fbgemm's per-tensor 7-bit activations); llmquant dynamic
W8A8 per token (symmetric / asymmetric), per tensor, with LLM.int8() outliers, W4A8 (int4 g128, reference
path), per-token with a 64-wide Hadamard rotation (``rotation=64``), the W8 weight-only product (to separate weight from activation error) and static W8A8 per tensor with
min-max scales from 4 calibration windows (calibrated here, only to measure the cost of computing scales at
run time: same kernel as dynamic per tensor).

Accuracy (no lock): perplexity, KL(p_fp32 || p_q) and top-1 agreement on the first N 512-token windows of
the default text. Speed (run it under ``flock /work/wt/bench.lock``): prefill of
512 tokens and greedy decode of 32 tokens after a 32-token prompt, each model alternating with fp32 inside
every round so load changes hit both alike; the median over rounds of the times and of the ratio to fp32 are
reported. One quantized model is in memory at a time (the machine is shared).

    PYTHONPATH=src python benchmarks/bench_dynamic.py --skip-speed                          # accuracy
    PYTHONPATH=src flock /work/wt/bench.lock python benchmarks/bench_dynamic.py --skip-accuracy  # speed

Each run updates benchmarks/results/dynamic.json (rows merged by name) and rewrites dynamic.md.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import llmquant
from llmquant import kernels
from llmquant import data
from llmquant.data import default_text, tokenize
from llmquant.modules import QuantLinear, replace_module
from llmquant.algorithms import rtn_quantize
from llmquant.schemes import QuantScheme

OUT = Path(__file__).resolve().parent / "results"
W8_ASYM = QuantScheme(bits=8, granularity="channel", symmetric=False)


def torch_ao_dynamic(m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)


def static_w8a8(m, ids_calib):
    """Per-tensor symmetric static W8A8: input amax of each Linear (lm_head excluded) over calibration windows."""
    amax, hooks = {}, []
    lins = [(n, l) for n, l in m.named_modules() if isinstance(l, nn.Linear) and n != "lm_head"]
    for n, l in lins:
        hooks.append(l.register_forward_pre_hook(lambda mod, a, n=n: amax.__setitem__(n, max(amax.get(n, 0.0), float(a[0].abs().max())))))
    with torch.no_grad():
        for w in ids_calib:
            m(w.unsqueeze(0))
    for h in hooks:
        h.remove()
    act = QuantScheme(bits=8, granularity="tensor")
    for n, l in lins:
        q, s, z = rtn_quantize(l.weight, W8_ASYM)  # the weights of llmquant's dynamic default
        ql = QuantLinear.from_quantized(q, s, z, W8_ASYM, bias=l.bias, activation_scheme=act,
                                        input_scale=torch.tensor(amax[n] / 127.5))
        replace_module(m, n, ql)
    return m


def configs(ids_all):
    dyn = lambda **kw: (lambda m: (llmquant.quantize_dynamic(m, progress=False, **kw), m)[1])
    return {
        "fp32": lambda m: m,
        "torch.ao quantize_dynamic (docs)": torch_ao_dynamic,
        "W8 weight-only sym (fbgemm fp16)": lambda m: (llmquant.quantize(m, "W8", progress=False), m)[1],
        "W8 weight-only asym (fbgemm fp16)": lambda m: (llmquant.quantize(m, W8_ASYM, progress=False), m)[1],
        "W8A8 per-token sym": dyn(),
        "W8A8 per-token sym, symmetric weights": dyn(weight_symmetric=True),
        "W8A8 per-token asym": dyn(symmetric=False),
        "W8A8 per-tensor sym": dyn(act_granularity="tensor"),
        "W8A8 per-token + outliers (t=6)": dyn(outlier_threshold=6.0),
        "W4A8 g128 per-token (reference path)": dyn(weight_bits=4),
        "W8A8 per-token sym + rotation 64": dyn(rotation=64),
        "W8A8 per-token asym + rotation 64": dyn(symmetric=False, rotation=64),
        "W8A8 per-token + outliers (t=6) + rotation 64": dyn(outlier_threshold=6.0, rotation=64),
        "W8A8 per-token asym + outliers (t=6) + rotation 64": dyn(symmetric=False, outlier_threshold=6.0, rotation=64),
        "W8A8 per-token asym + outliers (t=3) + rotation 64": dyn(symmetric=False, outlier_threshold=3.0, rotation=64),
        "static W8A8 per-tensor (min-max, 4 calib windows)": lambda m: static_w8a8(m, data.windows(ids_all, 4, split="calib")),
        "W8A8 per-token sym [forced int8_int_mm]": lambda m: (dyn()(m), kernels.set_kernel(m, "int8_int_mm"), m)[2],
    }


@torch.inference_mode()
def reference_logps(ref, ids, cache: Path):
    """log p_fp32 of each window, computed once and kept on disk (8 x 100 MB) so that only one quantized
    model needs to be in memory at a time."""
    paths = []
    for i, w in enumerate(ids):
        p = cache / f"ref_{i}.pt"
        torch.save(F.log_softmax(ref(w.unsqueeze(0)).logits[0, :-1].float(), -1), p)
        paths.append(p)
    return paths


@torch.inference_mode()
def accuracy(m, ids, ref_paths):
    nll = kl = agree = 0.0
    n = 0
    for w, rp in zip(ids, ref_paths):
        x = w.unsqueeze(0)
        ref_logp = torch.load(rp)
        logp = F.log_softmax(m(x).logits[0, :-1].float(), -1)
        target = x[0, 1:]
        n += target.numel()
        nll += float(F.nll_loss(logp, target, reduction="sum"))
        kl += float(F.kl_div(logp, ref_logp, log_target=True, reduction="sum"))
        agree += float((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    return {"perplexity": math.exp(nll / n), "kl": kl / n, "top1": agree / n}


@torch.inference_mode()
def prefill_s(m, ids):
    t = time.perf_counter()
    m(ids)
    return time.perf_counter() - t


@torch.inference_mode()
def decode_s(m, prompt, steps):
    out = m(prompt, use_cache=True)
    pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = m(nxt, past_key_values=pkv, use_cache=True)
        pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t


def speed(ref, m, ids, rounds, steps=32):
    """Prefill and decode times of ``m`` and of fp32 ``ref``, alternating within each round."""
    prompt = ids[:, :32]
    for mm in (ref, m):  # warm up: kernels prepared, allocator settled
        prefill_s(mm, ids[:, :64])
        decode_s(mm, prompt, 2)
    t = {"pre": [], "pre_ref": [], "dec": [], "dec_ref": []}
    for _ in range(rounds):
        t["pre_ref"].append(prefill_s(ref, ids))
        t["pre"].append(prefill_s(m, ids))
        t["dec_ref"].append(decode_s(ref, prompt, steps))
        t["dec"].append(decode_s(m, prompt, steps))
    med = statistics.median
    return {
        "prefill_tok_s": ids.shape[1] / med(t["pre"]),
        "prefill_x_fp32": med([a / b for a, b in zip(t["pre_ref"], t["pre"])]),
        "decode_tok_s": steps / med(t["dec"]),
        "decode_x_fp32": med([a / b for a, b in zip(t["dec_ref"], t["dec"])]),
        "fp32_prefill_tok_s": ids.shape[1] / med(t["pre_ref"]),
        "fp32_decode_tok_s": steps / med(t["dec_ref"]),
        "times_s": t,
    }


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--only", nargs="*", help="row names to run (default: all)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    ref, tok = llmquant.load_model()
    ref.eval()
    ids_all = tokenize(tok, default_text())
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": "PYTHONPATH=src python benchmarks/bench_dynamic.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "rows": {},
        "kernels": {},
    }
    eval_ids = data.windows(ids_all, args.windows)
    speed_ids = data.windows(ids_all, 1)[:, :512]
    with tempfile.TemporaryDirectory() as tmp:
        ref_paths = None if args.skip_accuracy else reference_logps(ref, eval_ids, Path(tmp))
        for name, make in configs(ids_all).items():
            if args.only and name not in args.only:
                continue
            if args.skip_speed and "forced" in name:
                continue  # same numerics as the row it forces a kernel on
            print(f"{name} ...", file=sys.stderr, flush=True)
            m = make(copy.deepcopy(ref)).eval() if name != "fp32" else ref
            row = result["rows"].setdefault(name, {})
            if not args.skip_accuracy:
                row.update(accuracy(m, eval_ids, ref_paths))
            if not args.skip_speed:
                row.update(speed(ref, m, speed_ids, args.rounds))
            result["kernels"][name] = sorted({q.prepared_kernel.name for q in m.modules() if isinstance(q, QuantLinear) and q.prepared_kernel})
            print(f"  {row.get('kl')} {row.get('prefill_x_fp32')} {row.get('decode_x_fp32')}", file=sys.stderr, flush=True)
            del m
            gc.collect()
    if not args.skip_speed:
        d = result["rows"]
        dyn, st = d.get("W8A8 per-tensor sym"), d.get("static W8A8 per-tensor (min-max, 4 calib windows)")
        if dyn and st:  # run-time cost of computing activation scales: dynamic vs static per tensor, same kernel
            result["scale_overhead"] = {
                "prefill": st["prefill_x_fp32"] / dyn["prefill_x_fp32"] - 1,
                "decode": st["decode_x_fp32"] / dyn["decode_x_fp32"] - 1,
            }
    OUT.mkdir(parents=True, exist_ok=True)
    result = merge(OUT / "dynamic.json", result, "accuracy" if args.skip_speed else "speed" if args.skip_accuracy else "all")
    (OUT / "dynamic.json").write_text(json.dumps(result, indent=1))
    md = to_markdown(result)
    (OUT / "dynamic.md").write_text(md)
    print(md)


def merge(path: Path, new: dict, part: str) -> dict:
    """Fold ``new`` into the results already in ``path`` (rows by name), noting which command made which part."""
    old = json.loads(path.read_text()) if path.exists() else {}
    out = {**old, **{k: v for k, v in new.items() if k != "rows"}}
    cmds = out.setdefault("commands", [])
    if isinstance(cmds, dict):  # older layout
        cmds = out["commands"] = [{"part": k, **v} for k, v in cmds.items()]
    cmds.append({"part": part, "command": new["command"], "date": new["date"], "rows": list(new["rows"])})
    rows = old.get("rows", {})
    for k, v in new["rows"].items():
        rows.setdefault(k, {}).update(v)
    out["rows"] = rows
    out["kernels"] = {**old.get("kernels", {}), **{k: v for k, v in new["kernels"].items() if v}}
    return out


def to_markdown(r) -> str:
    lines = [f"torch {r['torch']}, {r['threads']} threads."]
    lines += [f"- {c['part']}, {c['date']}: `{c['command']}`" for c in r.get("commands", [])]
    lines += ["",
             "| model | ppl | KL | top-1 | prefill tok/s (512) | x fp32 | decode tok/s | x fp32 | kernels |",
             "|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, p: "-" if v is None else f"{v:.{p}f}"
    for k, v in r["rows"].items():
        lines.append(
            f"| {k} | {f(v.get('perplexity'), 2)} | {f(v.get('kl'), 5)} | {f(v.get('top1'), 3)} | "
            f"{f(v.get('prefill_tok_s'), 0)} | {f(v.get('prefill_x_fp32'), 2)} | {f(v.get('decode_tok_s'), 1)} | "
            f"{f(v.get('decode_x_fp32'), 2)} | {', '.join(r['kernels'].get(k, [])) or '-'} |"
        )
    if "scale_overhead" in r:
        o = r["scale_overhead"]
        lines += ["", "Run-time cost of computing activation scales (static per-tensor W8A8 vs dynamic per-tensor, same "
                  f"weights, same kernel): static is {100 * o['prefill']:+.1f}% faster in prefill, "
                  f"{100 * o['decode']:+.1f}% in decode (tokens/s, medians; noise on this shared machine is several %)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
