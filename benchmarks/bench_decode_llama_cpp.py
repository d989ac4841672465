"""llmquant's lean runtime against llama.cpp (the cyllama wheel) on the default model, in one run.

    flock /tmp/llmquant-bench.lock python benchmarks/bench_decode_llama_cpp.py [--threads 1 2] [--rounds 3]
        [--configs fp32 W8 ...] [--kernels packed_avx2 packed_q8act] [--q8act-layouts tiled tiled8 rows]
        [--compiled both|on|off] [--no-quality] [--lock FILE]
        [--model DIR] [--prefill N] [--new N] [--reuse-quantized]

``--model DIR``: a local Hugging Face folder instead of the default model (e.g. the random-weight ~1B Llama of
``benchmarks/bench_streaming.py write DIR --shape 1b``); a folder without a tokenizer uses the default model's
(its vocabulary must match: the GGUF files then carry the default model's GGUF tokenizer). Its GGUF files are
cached apart from the default model's, keyed by the folder's path and weight files. The KL rows are skipped for
it (against a random-weight model they say nothing); greedy tokens against the reference path are still checked.

llama.cpp runs an F32 GGUF exported by llmquant and llama.cpp's own Q8_0, Q4_0 and Q4_K_M made from it with
its quantizer (``llama_cpp_quantize``). llmquant runs fp32, RTN W8 (int8 per channel, head Q8_0: the
default), gguf:Q8_0, gguf:Q4_0 and gguf:Q4_K_M (llama.cpp's mixture), each with ``packed_avx2`` (weight-only,
activations near-exact) and with ``packed_q8act`` (activations rounded to int8 per block of 32, as llama.cpp
does). Every row is measured ``--rounds`` times, rows interleaved within a round, best kept; per thread count
``OMP_NUM_THREADS`` and ``torch.set_num_threads`` are set (llama.cpp: its own thread count). Decode: 64 greedy
tokens after a 32-token prompt; prefill: 512 tokens. Ratios are against llama.cpp at the matching format, same
run. Each llmquant decode row runs with the lean runtime's compiled decode step (``--compiled on``: one C++ call
per token, :mod:`llmquant.runtime.compiled`) and/or without it (``off``: the Python step); with ``both`` (the
default) the on rows also give their ratio to the off row of the same config and kernel. Quality: KL(fp32 || config) on 2 windows of 512 tokens of the default text, weight-only and with the
int8 activation rounding packed_q8act applies (the gguf:Q8_0-act scheme on the linears it runs), and how many
of each timed run's greedy tokens equal those of the reference path (``dequant_cached``: dequantize, then
F.linear) with the same activation rounding, before the first difference.

Writes benchmarks/results/decode_llama_cpp.{json,md} (``--out``) after each thread count.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

import llmquant
from llmquant.data.text import token_windows
from llmquant.eval import ReferenceLogits
from llmquant.eval.llama_cpp import LlamaCpp, evaluate_llama_cpp, llama_cpp_quantize
from llmquant.kernels import KERNELS, native, packed_cpu, set_kernel
from types import SimpleNamespace
from llmquant.modules import QuantLinear
from llmquant.report import format_table
from llmquant.resources import cache_dir
from llmquant.runtime import GenerationStats, LeanModel
from llmquant.schemes import PRESETS

PROMPT, NEW, PREFILL = 32, 64, 512
OUT = Path("benchmarks/results/decode_llama_cpp")
# llmquant config -> the llama.cpp file of the same format
FORMATS = {"fp32": "F32", "W8": "Q8_0", "gguf:Q8_0": "Q8_0", "gguf:Q4_0": "Q4_0", "gguf:Q4_K_M": "Q4_K_M"}
ACT = PRESETS["gguf:Q8_0-act"]


def set_threads(n: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def q8act_modules(model) -> list:
    """The linears packed_q8act runs (the others fall through to the next kernel, unrounded)."""
    k = KERNELS["packed_q8act"]
    return [m for m in model.modules() if isinstance(m, QuantLinear) and m.activation_scheme is None
            and k.supports(m, torch.device("cpu"))]


class Emulated:
    """Within: the linears packed_q8act runs carry the gguf:Q8_0-act activation scheme (what it computes)."""

    def __init__(self, model):
        self.mods = q8act_modules(model)

    def __enter__(self):
        for m in self.mods:
            m.activation_scheme = ACT
            m.reset_kernel()

    def __exit__(self, *exc):
        for m in self.mods:
            m.activation_scheme = None
            m.reset_kernel()


def lean_run(model, kernel, prompt, prefill_ids, threads, compiled=True):
    """(decode tok/s, prefill tok/s, greedy tokens, kernels) of one measurement; a fresh LeanModel, so the
    kernels' prepared state (and prefill copies) belong to this row only. ``compiled``: the compiled decode
    step on or off."""
    kernel, _, spec = (kernel or "").partition("@")
    layout = spec
    # packed_q8act's layout, read when the LeanModel prepares the kernels
    env = {k: v for k, v in (("LLMQUANT_Q8ACT_LAYOUT", layout),) if v}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        set_kernel(model, kernel or None)
        lean = LeanModel(model, compiled=compiled)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    llmquant.generate(model, prefill_ids, 1, use_eos=False, lean=lean, threads=threads)  # warm-up, prefill copies
    sp = GenerationStats()
    llmquant.generate(model, prefill_ids, 1, use_eos=False, lean=lean, stats=sp, threads=threads)
    sd = GenerationStats()
    toks = llmquant.generate(model, prompt, NEW, use_eos=False, lean=lean, stats=sd, threads=threads)
    del lean
    gc.collect()
    return sd.decode_tok_s, sp.prefill_tok_s, toks, sd.kernels


@torch.inference_mode()
def reference_tokens(model, prompt, decode_rounded: bool):
    """Greedy tokens of the reference path (dequant_cached: dequantize once, then F.linear), with activations
    rounded as packed_q8act rounds them when asked: the decode steps, and the prompt pass too where that
    kernel runs it in int8 (AVX512-VNNI; else it hands it to packed_avx2's fp32 prefill). The reference kernel
    reads a module's activation scheme at each call."""
    from llmquant.kernels.packed_q8act import int8_prefill

    set_kernel(model, "dequant_cached")
    lean = LeanModel(model, compiled=False)
    cache = lean.new_cache(1, PROMPT + NEW)
    mods = q8act_modules(model) if decode_rounded else []
    def group(m):
        return m.scheme.group_size if m.scheme.granularity == "group" else m.in_features

    prompt_int8 = [m for m in mods if int8_prefill([SimpleNamespace(isa=-1, group_size=group(m))])]
    try:
        for m in prompt_int8:  # the linears whose prompt pass packed_q8act runs in int8
            m.activation_scheme = ACT
        out = [int(lean(prompt, cache)[0].argmax())]
        for m in mods:
            m.activation_scheme = ACT
        for _ in range(NEW - 1):
            out.append(int(lean(torch.tensor([[out[-1]]]), cache)[0].argmax()))
    finally:
        for m in mods:
            m.activation_scheme = None
    set_kernel(model, None)
    del lean
    gc.collect()
    return torch.tensor([out])


@torch.inference_mode()
def per_call_error(model, ids) -> float:
    """Every packed_q8act call of a prompt pass and one decode step of the weight-only model against float64
    on the same input (activations rounded by the gguf:Q8_0-act scheme, weights dequantized): the largest
    |error| / (|x_hat| @ |W|^T). Greedy tokens of whole runs cannot show this: an fp32 rounding difference
    upstream moves some activation across a rounding boundary of the int8 grid, and that code step (1/127 of
    its block's largest value) then propagates (the first differing call is exact on its own input)."""
    from llmquant.kernels import packed_q8act
    from llmquant.schemes import compute_qparams, dequantize, quantize_to_int

    ext, inner, worst = native.load(), packed_q8act._few_rows, [0.0]

    def checked(states, x2):
        y = inner(states, x2)
        s, z = compute_qparams(x2, ACT)
        xh = dequantize(quantize_to_int(x2, s, z, ACT), s, z, ACT).double()
        w = torch.cat([ext.dequant(st.codes, st.scale, st.offsets, st.bits, st.out_features, st.in_features,
                                   st.group_size) for st in states]).double()
        err = (y.double() - xh @ w.T).abs() / (xh.abs() @ w.abs().T).clamp(min=1e-30)
        worst[0] = max(worst[0], float(err.max()))
        return y

    packed_q8act._few_rows = checked
    try:
        set_kernel(model, "packed_q8act")
        lean = LeanModel(model, compiled=False)  # the decode step's calls through Python, where they are checked
        cache = lean.new_cache(1, PROMPT + 1)
        lean(ids[:, :PROMPT], cache)
        lean(ids[:, PROMPT:PROMPT + 1], cache)
    finally:
        packed_q8act._few_rows = inner
        set_kernel(model, None)
    return worst[0]


def first_diff(a, b) -> int:
    """Tokens equal before the first difference (NEW when all are equal)."""
    d = (a[0] != b[0]).nonzero()
    return int(d[0]) if len(d) else int(a.shape[1])


def model_key(folder: Path) -> str:
    """A cache folder name for a checkpoint: its name and a hash of its resolved path and weight files (name,
    size, modification time), so a rewritten checkpoint gets fresh GGUF files."""
    folder = folder.expanduser().resolve()
    h = hashlib.sha1(str(folder).encode())
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{folder.name}-{h.hexdigest()[:12]}"


def load(folder: Path | None):
    """(fp32 model, tokenizer, GGUF cache folder, tokenizer GGUF for the export or None)."""
    work = cache_dir() / "bench_decode_llama_cpp"
    if folder is None:
        fp32, tok = llmquant.load_model()
        return fp32, tok, work, None
    from llmquant.io.hf import default_model_file, gguf_tokenizer

    fp32, tok = llmquant.load_model(folder)
    tok_gguf = None
    if tok is None:  # a bare checkpoint: the default model's tokenizer, copied into the GGUF files as it is there
        tok_gguf = default_model_file()
        tok = gguf_tokenizer(tok_gguf)
        if len(tok) > fp32.config.vocab_size:
            raise SystemExit(f"{folder} has no tokenizer and {fp32.config.vocab_size} tokens: the default model's "
                             f"tokenizer ({len(tok)}) does not fit it")
        print(f"[setup] {folder} has no tokenizer: using the default model's", flush=True)
    return fp32, tok, work / model_key(folder), tok_gguf


def main() -> None:
    global PROMPT, NEW, PREFILL
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--configs", nargs="+", default=list(FORMATS))
    ap.add_argument("--compiled", choices=["both", "on", "off"], default="both",
                    help="llmquant decode with the compiled decode step, the Python step, or both")
    ap.add_argument("--kernels", nargs="+", choices=["packed_avx2", "packed_q8act"],
                    default=["packed_avx2", "packed_q8act"], help="the llmquant kernels measured (default both)")
    ap.add_argument("--q8act-layouts", nargs="+", default=[""],
                    choices=["", "tiled", "tiled8", "rows"],
                    help="packed_q8act rows, one per LLMQUANT_Q8ACT_LAYOUT value (default: one row, the default)")
    ap.add_argument("--lock", type=Path, help="take this exclusive flock (e.g. /tmp/llmquant-bench.lock) for the "
                    "timed rounds only, not for the setup")
    ap.add_argument("--no-quality", action="store_true", help="skip the KL evaluation (speed only)")
    ap.add_argument("--out", type=Path, default=OUT, help="results path without suffix (.json and .md written)")
    ap.add_argument("--model", type=Path, help="a local Hugging Face folder instead of the default model "
                    "(no KL rows: see the module doc)")
    ap.add_argument("--prefill", type=int, default=PREFILL, help="prefill length in tokens (at most 512)")
    ap.add_argument("--new", type=int, default=NEW, help="greedy tokens decoded after the prompt")
    ap.add_argument("--reuse-quantized", action="store_true", help="save each quantized model in the GGUF cache "
                    "folder (quantized-<config>) and load it in later runs with this flag instead of quantizing again "
                    "(delete the folder after a change to the quantizer)")
    args = ap.parse_args()
    if not 16 <= args.prefill <= 512 or args.new < 2:
        ap.error("--prefill takes 16..512 tokens, --new at least 2")
    PREFILL, NEW = args.prefill, args.new
    steps = {"both": [True, False], "on": [True], "off": [False]}[args.compiled]
    t_start = time.perf_counter()
    set_threads(max(args.threads))
    fp32, tok, work, tok_gguf = load(args.model)
    if args.model is not None and not args.no_quality:
        print("[setup] --model: KL rows skipped (a random-weight model's KL says nothing); greedy tokens "
              "against the reference path are still checked", flush=True)
        args.no_quality = True
    n_params = sum(p.numel() for p in fp32.parameters())
    work.mkdir(parents=True, exist_ok=True)
    files = {"F32": work / "f32.gguf"}
    if not files["F32"].exists():
        kw = {"tokenizer_gguf": tok_gguf} if tok_gguf is not None else {}
        llmquant.export(fp32, tok, files["F32"], float_type="F32", progress=False, **kw)
    for ft in sorted({FORMATS[c] for c in args.configs} - {"F32"}):
        files[ft] = work / f"{ft.lower()}.gguf"
        if not files[ft].exists():
            llama_cpp_quantize(files["F32"], files[ft], ft, threads=max(args.threads))
    print(f"[setup] GGUF files ready ({time.perf_counter() - t_start:.0f} s)", flush=True)

    models = {}
    for c in args.configs:
        if c == "fp32":
            models[c] = fp32
            continue
        saved = work / f"quantized-{c.replace(':', '_')}"
        if args.reuse_quantized and saved.exists():
            m = llmquant.load(saved)[0]  # bit-identical weights to the run that saved it
            print(f"[setup] {c}: reusing {saved}", flush=True)
        else:
            m = copy.deepcopy(fp32)
            llmquant.quantize(m, c, progress=False)
            if args.reuse_quantized:
                llmquant.save(m, None, saved, overwrite=True)
        models[c] = m
    print(f"[setup] quantized ({time.perf_counter() - t_start:.0f} s)", flush=True)
    if "fp32" not in args.configs and args.no_quality:  # the float model is not needed any more
        del fp32, m
        gc.collect()

    # quality: KL against fp32 on 2 windows of 512 tokens, weight-only and with packed_q8act's rounding
    ids = token_windows(tok, None, 2, 512)
    ref = ReferenceLogits(fp32, ids) if not args.no_quality else None
    quality = []
    for c, m in models.items():
        if c == "fp32" or args.no_quality:
            continue
        set_kernel(m, None)
        wo = llmquant.evaluate(m, ref, tokenizer=tok, windows=2, seq_len=512, progress=False)
        set_kernel(m, "packed_q8act")
        with Emulated(m):
            a8 = llmquant.evaluate(m, ref, tokenizer=tok, windows=2, seq_len=512, progress=False)
        set_kernel(m, None)
        n8, n = len(q8act_modules(m)), sum(isinstance(x, QuantLinear) for x in m.modules())
        quality.append({"config": f"llmquant {c}", "KL weight-only": round(wo.kl, 4), "top-1 weight-only": round(wo.top1, 4),
                        "KL int8 activations": round(a8.kl, 4), "top-1 int8 activations": round(a8.top1, 4),
                        "int8-activation linears": f"{n8}/{n}"})
        print("[quality]", quality[-1], flush=True)
    for ft in sorted({FORMATS[c] for c in args.configs}) if not args.no_quality else []:
        r = evaluate_llama_cpp(files[ft], ids, ref, threads=max(args.threads))
        quality.append({"config": f"llama.cpp {ft}", "KL weight-only": "", "top-1 weight-only": "",
                        "KL int8 activations": round(r.kl, 4), "top-1 int8 activations": round(r.top1, 4),
                        "int8-activation linears": "all" if ft != "F32" else "none"})
        print("[quality]", quality[-1], flush=True)
    if ref is not None:
        ref.close()
    print(f"[setup] quality done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    # greedy tokens of the reference path, to compare each timed run's with
    prompt = ids[:1, :PROMPT]  # text: greedy continuations of text have fewer near-ties than random ids
    prefill_ids = ids[1:2, :PREFILL]
    kernel_rows = []
    for c in args.configs:
        if c == "fp32":
            kernel_rows.append((c, None))
        else:
            kernel_rows += [(c, k) for k in args.kernels if k != "packed_q8act"]
            if "packed_q8act" in args.kernels:  # one row per tiled layout asked for ("" : the default)
                kernel_rows += [(c, "packed_q8act" + (f"@{lay}" if lay else "")) for lay in args.q8act_layouts]
    rows_spec = [(c, kernel, on) for c, kernel in kernel_rows for on in steps]
    ref_toks = {}
    for c, kernel in kernel_rows:
        if c == "fp32":
            ref_toks[(c, kernel)] = llmquant.generate(models[c], prompt, NEW, use_eos=False,
                                                      lean=LeanModel(models[c], compiled=False))
        else:
            ref_toks[(c, kernel)] = reference_tokens(models[c], prompt, decode_rounded=kernel.startswith("packed_q8act"))
    # the kernel on the model whose linears carry gguf:Q8_0-act (prompt pass rounded too) against the
    # reference kernel on that model
    exact_check = {}
    for c in args.configs:
        if c == "fp32":
            continue
        m = models[c]
        got = {}
        for kernel in ("packed_q8act", "dequant_cached"):
            set_kernel(m, kernel)
            with Emulated(m):
                got[kernel] = llmquant.generate(m, prompt, NEW, use_eos=False)
        set_kernel(m, None)
        exact_check[c] = first_diff(got["packed_q8act"], got["dequant_cached"])
        print(f"[check] {c}: packed_q8act = reference on the gguf:Q8_0-act model for {exact_check[c]}/{NEW} tokens",
              flush=True)
    call_err = {c: per_call_error(models[c], ids[:1]) for c in args.configs if c != "fp32"}
    print(f"[check] packed_q8act calls vs float64 on the same inputs, largest relative error: {call_err}", flush=True)
    print(f"[setup] references done ({time.perf_counter() - t_start:.0f} s)", flush=True)

    if args.lock is not None:  # the timed part alone: wait for the exclusive lock (setup ran beside others)
        import fcntl

        lock_fd = open(args.lock, "a")
        print(f"[setup] waiting for the exclusive lock {args.lock}", flush=True)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        print(f"[setup] lock held ({time.perf_counter() - t_start:.0f} s)", flush=True)
    llama = {ft: LlamaCpp(files[ft], threads=1) for ft in sorted({FORMATS[c] for c in args.configs})}
    rows = []
    for threads in args.threads:
        set_threads(threads)
        best: dict = {}
        for rnd in range(args.rounds):
            for ft, lc in llama.items():
                lc.threads = threads
                s = lc.speed(prefill_len=PREFILL, prompt_len=PROMPT, new_tokens=NEW, repeats=1)
                b = best.setdefault(("llama.cpp", ft), {"decode": 0.0, "prefill": 0.0})
                b["decode"] = max(b["decode"], s.decode_tokens_per_s)
                b["prefill"] = max(b["prefill"], s.prefill_tokens_per_s)
            for c, kernel, on in rows_spec:
                dec, pre, toks, used = lean_run(models[c], kernel, prompt, prefill_ids, threads, on)
                b = best.setdefault((c, kernel, on), {"decode": 0.0, "prefill": 0.0})
                b["decode"], b["prefill"] = max(b["decode"], dec), max(b["prefill"], pre)
                b["kernels"] = (",".join(used) or "float") + (f" ({kernel.partition('@')[2]})" if "@" in kernel else "")
                b["same tokens"] = min(b.get("same tokens", NEW), first_diff(toks, ref_toks[(c, kernel)]))
            print(f"[speed] threads {threads} round {rnd + 1}/{args.rounds} done "
                  f"({time.perf_counter() - t_start:.0f} s)", flush=True)
        for ft in llama:
            b = best[("llama.cpp", ft)]
            rows.append({"threads": threads, "engine": "llama.cpp", "format": ft, "kernel": "llama.cpp",
                         "compiled step": "", "decode tok/s": round(b["decode"], 1),
                         "prefill tok/s": round(b["prefill"], 1), "decode x llama.cpp": 1.0, "decode x step off": "",
                         "prefill x llama.cpp": 1.0, "greedy = reference": ""})
        for c, kernel, on in rows_spec:
            b, lc = best[(c, kernel, on)], best[("llama.cpp", FORMATS[c])]
            off = best.get((c, kernel, False)) if on else None
            rows.append({"threads": threads, "engine": "llmquant", "format": c, "kernel": b["kernels"],
                         "compiled step": "on" if on else "off",
                         "decode tok/s": round(b["decode"], 1), "prefill tok/s": round(b["prefill"], 1),
                         "decode x llama.cpp": round(b["decode"] / lc["decode"], 2),
                         "decode x step off": round(b["decode"] / off["decode"], 2) if off else "",
                         "prefill x llama.cpp": round(b["prefill"] / lc["prefill"], 2),
                         "greedy = reference": f"{b['same tokens']}/{NEW}"})
        meta = {"model": str(args.model) if args.model is not None else "default (SmolLM2-135M-Instruct)",
                "parameters": n_params,
                "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                "q8act isa": "AVX512-VNNI" if native.load().q8_best_isa() == 1 else "AVX2",
                "prompt": PROMPT, "new tokens": NEW, "prefill": PREFILL, "rounds": args.rounds,
                "configs": args.configs, "compiled": args.compiled,
                "prefill-copy budget MB": round(packed_cpu.PREFILL_CACHE_BYTES / 1e6),
                "threads done": args.threads[: args.threads.index(threads) + 1],
                "seconds": round(time.perf_counter() - t_start), "quality": quality,
                "greedy tokens equal before the first difference, packed_q8act vs dequant_cached, linears with "
                "gguf:Q8_0-act": exact_check,
                "packed_q8act calls vs float64 on the same input (prompt + 1 decode step), largest error / "
                "(|x_hat| @ |W|^T)": call_err}
        out = args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        md = format_table(rows) + "\n\nQuality (2 windows of 512 tokens, KL against fp32):\n\n" + (
            format_table(quality) if quality else "not measured" + (" (--model: random weights)" if args.model else ""))
        out.with_suffix(".md").write_text(md + "\n")
        print(md, flush=True)
    for lc in llama.values():
        lc.close()


if __name__ == "__main__":
    main()
