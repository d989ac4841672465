"""Command line: a thin layer over the Python API. Errors a user can cause print one line, exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("llmquant")


def _scheme_from_args(args):
    from .errors import SchemeError
    from .schemes import QuantScheme, resolve_scheme

    explicit = args.bits is not None or args.group_size is not None or args.asym or args.granularity
    if args.scheme:
        if explicit:
            raise SchemeError("give either --scheme PRESET or --bits/--group-size/--asym/--granularity, not both")
        return resolve_scheme(args.scheme)
    bits = 4 if args.bits is None else args.bits
    if args.group_size is not None:
        gran = args.granularity or "group"
        if gran != "group":
            raise SchemeError(f"--group-size goes with group granularity, not {gran!r}")
        return QuantScheme(bits=bits, symmetric=not args.asym, granularity="group", group_size=args.group_size)
    gran = args.granularity or ("channel" if args.bits == 8 else "group")
    return QuantScheme(
        bits=bits, symmetric=not args.asym, granularity=gran, group_size=128 if gran == "group" else None
    )


def _check_out(out: str, overwrite: bool) -> None:
    from .errors import OutputExistsError

    p = Path(out).expanduser()
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out!r} exists and is not empty; choose another -o or pass --overwrite")


def _calibrated_kwargs(args) -> dict:
    """method_params / calibration for calibrated methods (gptq, awq) from --act-order, --calib..."""
    from .schemes import CalibSpec, GPTQParams

    if args.method not in ("gptq", "awq"):
        return {}
    calib = CalibSpec(source=None if args.calib in (None, "default") else args.calib,
                      samples=args.calib_samples, seq_len=args.seq_len)
    params = GPTQParams(act_order=args.act_order) if args.method == "gptq" else None
    return {"method_params": params, "calibration": calib}


def _summary_row(summary, scheme_name: str) -> dict:
    """The one-row table ``quantize`` prints for a QuantSummary."""
    return {
        "layers": len(summary.layers),
        "scheme": scheme_name,
        "bits/w": summary.bits_per_weight,
        "fp32 MB": summary.float_bytes / 1e6,
        "packed MB": summary.packed_bytes / 1e6,
        "weight SQNR dB": summary.mean_sqnr_db,
        "kernel": ",".join(summary.kernels),
        "seconds": summary.seconds,
    }


def cmd_quantize(args) -> int:
    import llmquant
    from .report import format_table
    from .schemes import QuantConfig

    if args.method == "dynamic":
        return _quantize_dynamic(args)

    if getattr(args, "plan", None):
        return _quantize_with_plan(args)
    scheme = _scheme_from_args(args)
    cfg = QuantConfig(
        weight=scheme,
        method=args.method,
        targets=tuple(args.targets or ()),
        ignore=tuple(args.ignore) if args.ignore is not None else ("lm_head",),
        **_calibrated_kwargs(args),
    )
    _check_out(args.output, args.overwrite)
    model, tok = llmquant.load_model(args.model)
    if args.method in CALIBRATED_STATIC:
        scheme = _static_weight_scheme(args)
        cfg = _static_config(args, cfg.with_(weight=scheme))
        summary = llmquant.quantize_static(model, cfg, tok, _calib_text(args.calib), samples=args.calib_samples,
                                           seq_len=args.seq_len)
    else:
        summary = llmquant.quantize(model, cfg)
    llmquant.save(model, tok, args.output, overwrite=args.overwrite)
    print(format_table([_summary_row(summary, scheme.name)]))
    print(f"saved to {args.output}")
    return 0


# ---- calibrated static W8A8 (issue 3) -----------------------------------------------------------------
CALIBRATED_STATIC = ("static", "smoothquant")


def _static_weight_scheme(args):
    """int8 per channel unless the user named a weight scheme."""
    explicit = args.scheme or args.bits is not None or args.group_size is not None or args.asym or args.granularity
    return _scheme_from_args(args) if explicit else __import__("llmquant").PRESETS["W8"]


def _static_config(args, cfg):
    from .schemes import QuantScheme

    act = QuantScheme(bits=8, granularity="tensor", dynamic=False)
    alpha = None
    if args.method == "smoothquant":
        alpha = "search" if args.alpha == "search" else _float_alpha(args.alpha)
    # measured defaults (BENCHMARKS.md): MSE clipping without smoothing, min-max after SmoothQuant
    observer = args.observer or ("minmax" if args.method == "smoothquant" else "mse")
    return cfg.with_(activation=act, observer=observer, smooth_alpha=alpha)


def _float_alpha(v: str) -> float:
    from .errors import SchemeError

    try:
        return float(v)
    except ValueError:
        raise SchemeError(f"--alpha takes a number in [0, 1] or 'search', got {v!r}") from None


def _calib_text(calib: str | None):
    return None if calib in (None, "default") else Path(calib)


def _quantize_dynamic(args) -> int:
    """``quantize --method dynamic``: int8 activations quantized at run time (see llmquant.quantize_dynamic)."""
    import llmquant
    from .errors import SchemeError
    from .report import format_table

    if args.scheme or args.bits is not None or args.group_size is not None or args.granularity or args.asym:
        raise SchemeError(
            "--method dynamic takes --weight-bits 8|4, --act-granularity token|tensor, --act-asym, --weight-sym, "
            "--outlier-threshold and --rotation, not --scheme/--bits/--group-size/--granularity/--asym"
        )
    _check_out(args.output, args.overwrite)
    model, tok = llmquant.load_model(args.model)
    summary = llmquant.quantize_dynamic(
        model,
        targets=args.targets or None,
        act_granularity=args.act_granularity,
        symmetric=not args.act_asym,
        weight_bits=args.weight_bits,
        weight_symmetric=args.weight_sym,
        outlier_threshold=args.outlier_threshold,
        rotation=args.rotation,
        ignore=tuple(args.ignore) if args.ignore is not None else ("lm_head",),
    )
    llmquant.save(model, tok, args.output, overwrite=args.overwrite)
    print(format_table([_summary_row(summary, summary.layers[0].scheme if summary.layers else "-")]))

def _quantize_with_plan(args) -> int:
    import llmquant
    from .errors import SchemeError
    from .report import format_table
    from .schemes import Plan

    if args.scheme or args.bits is not None or args.group_size is not None or args.asym or args.granularity or args.targets or args.ignore is not None:
        raise SchemeError("--plan names each layer's format; leave out --scheme/--bits/--group-size/--asym/--granularity/--targets/--ignore")
    plan = Plan.load(args.plan)
    _check_out(args.output, args.overwrite)
    model, tok = llmquant.load_model(args.model)
    summary = llmquant.quantize(model, plan)
    llmquant.save(model, tok, args.output, overwrite=args.overwrite)
    size = llmquant.model_size(model)
    counts: dict[str, int] = {}
    for l in summary.layers:
        counts[l.scheme] = counts.get(l.scheme, 0) + 1
    print(format_table([{
        "layers": len(summary.layers),
        "formats": " ".join(f"{k}:{v}" for k, v in sorted(counts.items())),
        "bits/w (planned layers)": summary.bits_per_weight,
        "model MB": size.total_bytes / 1e6,
        "x fp32": size.ratio_to_fp32,
        "seconds": summary.seconds,
    }]))
    print(f"saved to {args.output}")
    return 0


def _sens_from_args(args, model, tok):
    import llmquant

    cands = [c.strip() for c in args.candidates.split(",") if c.strip()]
    return llmquant.sensitivity(
        model, Path(args.text) if args.text else None, cands, method=args.method, tokenizer=tok,
        windows=args.windows, seq_len=args.seq_len, samples=args.samples, include_head=args.include_head,
        cache=not args.no_cache,
    )


def cmd_sensitivity(args) -> int:
    import llmquant
    from .report import format_table, sensitivity_chart

    model, tok = llmquant.load_model(args.model)
    sens = _sens_from_args(args, model, tok)
    rows = sorted(sens.rows(), key=lambda r: -max(v for k, v in r.items() if k != "layer"))
    print(format_table(rows[: args.top]))
    print(f"{len(sens.units)} layers x {len(sens.candidates)} candidates, {sens.method}, {sens.tokens} calibration "
          f"tokens, {sens.seconds:.1f}s (cached results come back at once); damage = KL per token, this layer alone")
    if args.json:
        sens.save(args.json)
        print(f"wrote {args.json}")
    if args.chart:
        print(f"wrote {sensitivity_chart(sens, args.chart)}")
    return 0


def cmd_plan(args) -> int:
    import llmquant
    from .errors import BudgetError
    from .flows.mixed import plan_from_sensitivity
    from .report import format_table, plan_row, sensitivity_chart

    if (args.target_bits is None) == (args.max_size is None):
        raise BudgetError("give exactly one of --target-bits B or --max-size S (e.g. 60MB)")
    model, tok = llmquant.load_model(args.model)
    sens = _sens_from_args(args, model, tok)
    plan = plan_from_sensitivity(sens, target_bits=args.target_bits, max_size=args.max_size)
    plan.save(args.output)
    print(format_table([plan_row(plan)]))
    print(f"wrote {args.output} ({len(plan.rules)} layers; edit it freely, then: llmquant quantize --plan {args.output} -o OUT)")
    if args.chart:
        print(f"wrote {sensitivity_chart(sens, args.chart, plan=plan)}")
    return 0


def _add_sens_args(p) -> None:
    from .schemes import DEFAULT_CANDIDATES

    p.add_argument("--model", help="local HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", help="calibration text, .txt or .jsonl (default: pydoc_data.topics, from its end)")
    p.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES), help="comma-separated formats")
    p.add_argument("--method", choices=["fisher", "kl"], default="fisher",
                   help="fisher: 2nd-order KL estimate (fast, default); kl: measured KL per layer and format (slow)")
    p.add_argument("--include-head", action="store_true", help="plan the output head and embeddings too")
    p.add_argument("--windows", type=int, help="calibration windows (default 4)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window")
    p.add_argument("--samples", type=int, default=2, help="fisher: label draws per window")
    p.add_argument("--no-cache", action="store_true", help="measure again even if a cached result exists")
    p.add_argument("--chart", help="write a per-layer sensitivity chart (PNG; needs matplotlib)")


def _reference_for(manifest_source: str | None):
    import llmquant

    if manifest_source in (None, "default"):
        return llmquant.load_model(None)[0]
    if Path(manifest_source).exists():
        return llmquant.load_model(manifest_source)[0]
    log.warning("base model %s not found; KL and top-1 are not computed", manifest_source)
    return None


def cmd_eval(args) -> int:
    import llmquant
    from .errors import LLMQuantError
    from .report import eval_row, format_table

    if bool(args.folder) == bool(args.model):
        raise LLMQuantError("give either a quantized folder or --model PATH to evaluate")
    model, tok = llmquant.load_model(args.folder or args.model)
    ref = None
    if not args.no_reference:
        if args.reference:
            ref = llmquant.load_model(args.reference)[0]
        elif getattr(model, "llmquant_config", None) is not None or getattr(model, "llmquant_plan", None) is not None:
            ref = _reference_for(getattr(model, "llmquant_source", None))
    text = Path(args.text) if args.text else None
    res = llmquant.evaluate(model, reference=ref, text=text, tokenizer=tok, windows=args.windows, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(res.to_dict(), indent=1))
    else:
        print(format_table([eval_row(args.folder or args.model, res)]))
    return 0


def cmd_inspect(args) -> int:
    from .io import read_manifest
    from .report import format_table

    man = read_manifest(args.folder)
    if args.json:
        print(json.dumps(man, indent=1))
        return 0
    tensors = man["tensors"]
    rows = []
    for name, layer in man["quantized_layers"].items():
        nbytes = sum(
            int(_numel(tensors[f"{name}.{k}"]["shape"])) * _itemsize(tensors[f"{name}.{k}"]["dtype"])
            for k in ("qweight", "scale", "zero", "bias")
            if f"{name}.{k}" in tensors
        )
        from .schemes import QuantScheme

        s = QuantScheme.from_dict(layer["scheme"])
        rows.append(
            {
                "layer": name,
                "shape": f"{layer['out_features']}x{layer['in_features']}",
                "scheme": s.name,
                "bytes": nbytes,
                "bits/w": 8 * nbytes / (layer["out_features"] * layer["in_features"]),
            }
        )
    total = sum(_numel(t["shape"]) * _itemsize(t["dtype"]) for t in tensors.values())
    print(f"llmquant {man['llmquant_version']}  base: {man.get('base_model')}  model: {man.get('model_class')}")
    if rows:
        print(format_table(rows))
    print(f"{len(rows)} quantized layers; {len(tensors)} tensors, {total / 1e6:.2f} MB stored; aliases: {man.get('aliases') or 'none'}")
    return 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    import torch

    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()


def cmd_demo(args) -> int:
    """Quantize the default model at a few schemes and print the comparison table."""
    import llmquant
    from .report import eval_row, format_table

    ref, tok = llmquant.load_model(args.model)
    rows = [eval_row("fp32", llmquant.evaluate(ref, reference=ref, windows=args.windows))]
    for preset in args.schemes.split(","):
        model, _ = llmquant.load_model(args.model)
        summary = llmquant.quantize(model, preset)
        res = llmquant.evaluate(model, reference=ref, tokenizer=tok, windows=args.windows)
        rows.append(eval_row(f"rtn {preset}", res, {"kernel": ",".join(summary.kernels)}))
        print(format_table(rows[-1:]), file=sys.stderr)
    print(f"\nRTN weight-only quantization of {args.model or 'the default model'} "
          f"({args.windows} x 512-token windows of the default text; KL vs fp32):")
    print(format_table(rows))
    return 0


def cmd_compare(args) -> int:
    from .report import compare, format_table
    from .report.render import detail_rows, recommendations, vs_rows

    result = compare(args.model, profile=args.profile, strategies=args.strategies.split(","), out_dir=args.output)
    print(format_table(vs_rows(result["rows"])))
    print()
    print(format_table(detail_rows(result["rows"])))
    print()
    for line in recommendations(result["rows"]):
        print("- " + line)
    print(f"\nreport written to {args.output}/report.md, report.json, report.html")
    return 0




# ---- qat (issue 5) -------------------------------------------------------------------------------
def cmd_qat(args) -> int:
    """Quantization-aware training: prepare, train with distillation, convert, save."""
    import llmquant
    from .report import format_table
    from .schemes import QuantConfig, QuantScheme

    if args.bits is None:
        args.bits = 4
    scheme = QuantScheme(bits=args.bits, symmetric=not args.asym, granularity="group" if args.group_size else "channel",
                         group_size=args.group_size)
    cfg = QuantConfig(weight=scheme, method="qat")
    _check_out(args.output, args.overwrite)
    ckpt_dir = args.checkpoint_dir or f"{args.output.rstrip('/')}.qat-ckpt"
    model, tok = llmquant.load_model(args.model)
    res = llmquant.train_qat(
        model, Path(args.text) if args.text else None, config=cfg, tokenizer=tok, steps=args.steps, lr=args.lr,
        seq_len=args.seq_len, batch=args.batch, grad_accum=args.grad_accum, loss=args.loss,
        learn_scales=not args.frozen_scales, lora_rank=args.lora_rank, gradient_checkpointing=args.grad_checkpoint,
        checkpoint_dir=ckpt_dir, checkpoint_every=args.checkpoint_every, resume=args.resume, init=args.init,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
    )
    llmquant.save(model, tok, args.output, overwrite=args.overwrite)
    s = res.summary
    print(format_table([{
        "scheme": scheme.name, "steps": res.steps, "first loss": res.losses[0] if res.losses else float("nan"),
        "last loss": res.losses[-1] if res.losses else float("nan"), "minutes": res.seconds / 60,
        "tokens/s": res.tokens_per_s, "bits/w": s["bits_per_weight"], "packed MB": s["packed_bytes"] / 1e6,
    }]))
    print(f"saved to {args.output} (checkpoint: {ckpt_dir})")
    return 0


def add_qat_parser(sub) -> None:
    t = sub.add_parser("qat", help="quantization-aware training (distillation from the float model), then save")
    t.add_argument("--model", help="local HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    t.add_argument("--bits", type=int, help="2..8 (default 4)")
    t.add_argument("--group-size", type=int, help="values per scale (omit for one scale per output channel)")
    t.add_argument("--asym", action="store_true", help="asymmetric (learned zero points)")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps")
    t.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (weights and step sizes)")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    t.add_argument("--batch", type=int, default=4, help="windows per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    t.add_argument("--loss", choices=["kl", "ce"], default="kl", help="kl: distill the float model; ce: next token")
    t.add_argument("--frozen-scales", action="store_true", help="keep the initial step sizes (no LSQ)")
    t.add_argument("--init", choices=["mse", "rtn"], default="mse", help="initial step sizes: least-squares "
                   "clipping per group (mse) or min-max (rtn)")
    t.add_argument("--lora-rank", type=int, default=0, help=">0: frozen base weights + rank-r adapters")
    t.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing (less memory)")
    t.add_argument("--max-minutes", type=float, help="stop training after this many minutes")
    t.add_argument("--text", help=".txt or .jsonl training text (default: pydoc_data.topics; windows from its end)")
    t.add_argument("--checkpoint-dir", help="where checkpoints go (default: OUT.qat-ckpt)")
    t.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    t.add_argument("-o", "--output", required=True, help="output folder (loadable with llmquant.load)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    t.set_defaults(func=cmd_qat)


def cmd_export(args) -> int:
    import llmquant
    from .report import format_table

    model, tok = llmquant.load_model(args.folder, packed=args.packed)
    if args.format == "gguf":
        rep = llmquant.export(model, tok, args.output, format="gguf", overwrite=args.overwrite, requant=args.requant,
                              float_type=args.float_type, tokenizer_gguf=args.tokenizer_gguf,
                              tokenizer_pre=args.tokenizer_pre)
        print(format_table([{"type": t, "tensors": n} for t, n in sorted(rep.type_counts().items())]))
        if rep.inexact:
            print(format_table([{"tensor": t.name, "type": t.type, "SQNR dB": t.sqnr_db, "max |err|": t.max_abs_err}
                                for t in rep.inexact]))
            worst = min(t.sqnr_db for t in rep.inexact)
            print(f"{len(rep.inexact)} tensor(s) re-quantized, not exact (worst SQNR {worst:.1f} dB vs llmquant's values)")
        else:
            print("every tensor holds llmquant's values exactly")
        print(f"tokenizer: {rep.tokenizer_source}")
        print(f"wrote {args.output} ({rep.file_bytes / 1e6:.1f} MB)")
    else:
        if args.requant or args.float_type != "auto" or args.tokenizer_gguf or args.tokenizer_pre:
            from .errors import ExportError

            raise ExportError("--requant, --float-type and --tokenizer-* apply to --format gguf only")
        out = llmquant.export(model, tok, args.output, format="compressed-tensors", overwrite=args.overwrite)
        print(f"wrote {out} (compressed-tensors; load with transformers' from_pretrained or vLLM)")
    return 0


class _Streamer:
    """Prints generated text as it comes (decoding the whole reply each step, printing only what is new)."""

    def __init__(self, tok, out=None):
        self.tok, self.out, self.ids, self.shown = tok, out or sys.stdout, [], ""

    def __call__(self, step, tokens):
        self.ids.append(int(tokens[0]))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def _gen_kwargs(args) -> dict:
    # --temperature 0 means greedy, as in llama.cpp
    sample = args.temperature != 0 and (args.temperature is not None or args.top_k or args.top_p is not None)
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=bool(sample),
        temperature=1.0 if args.temperature is None or not sample else args.temperature,
        top_k=args.top_k or 0,
        top_p=1.0 if args.top_p is None else args.top_p,
        seed=args.seed,
        threads=args.threads,
    )


def _load_for_generation(args):
    import llmquant
    from .kernels import set_kernel

    model, tok = llmquant.load_model(args.model)
    if args.kernel:
        set_kernel(model, args.kernel)
    return model, tok


def _print_stats(st) -> None:
    print(
        f"[{st.prompt_tokens} prompt tokens: {st.prefill_tok_s:.1f} tok/s; {st.new_tokens} new: "
        f"{st.decode_tok_s:.1f} tok/s; threads {st.threads}; kernels {','.join(st.kernels) or 'float'}]",
        file=sys.stderr,
    )


def cmd_generate(args) -> int:
    import llmquant
    from .runtime import GenerationStats

    model, tok = _load_for_generation(args)
    st = GenerationStats()
    stream = None if args.no_stream else _Streamer(tok)
    ids = llmquant.generate(model, args.prompt, callback=stream, stats=st, **_gen_kwargs(args))
    if stream is None:
        print(tok.decode(ids[0], skip_special_tokens=True))
    else:
        stream.out.write("\n")
    if args.stats:
        _print_stats(st)
    return 0


def cmd_chat(args) -> int:
    import llmquant
    from .runtime import GenerationStats, chat_prompt

    model, tok = _load_for_generation(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    kw = _gen_kwargs(args)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        stream, st = _Streamer(tok), GenerationStats()
        llmquant.generate(model, chat_prompt(tok, messages), callback=stream, stats=st, **kw)
        print()
        messages.append({"role": "assistant", "content": stream.tok.decode(stream.ids, skip_special_tokens=True)})
        if args.stats:
            _print_stats(st)


def _add_generation_args(g) -> None:
    g.add_argument("--model", help="a folder saved by llmquant, a local HF folder or .gguf (default: SmolLM2-135M)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, help="sample at this temperature (default and 0: greedy)")
    g.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, help="sample from the smallest set with probability >= p")
    g.add_argument("--seed", type=int, help="random seed for sampling")
    g.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); reported with --stats")
    g.add_argument("--kernel", help="force one kernel (e.g. packed_avx2, fbgemm_fp16, reference)")
    g.add_argument("--stats", action="store_true", help="print tokens/s and threads to stderr")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="llmquant", description="Quantize LLMs and measure what it costs.")
    p.add_argument("--version", action="version", version=f"llmquant {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model's weights and save it")
    q.add_argument("--model", help="local HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    q.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq", "static", "smoothquant", "dynamic"],
                   help="rtn (weights only); gptq/awq (weights only, calibrated); static: W8A8 with calibrated "
                        "per-tensor activation scales; smoothquant: SmoothQuant, then static W8A8; dynamic: per-token int8 activations at run time")
    q.add_argument("--calib", default="default", help="calibration text: .txt/.jsonl file, or 'default'")
    q.add_argument("--calib-samples", type=int, default=64, help="calibration windows")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    q.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing activation energy")
    q.add_argument("--scheme", help="a preset: W8, W4G64, W4G128, W3G32, ... (instead of --bits etc.)")
    q.add_argument("--bits", type=int, help="2..8 (default 4)")
    q.add_argument("--group-size", type=int, help="values per scale; omit for per-channel with --bits 8")
    q.add_argument("--granularity", choices=["tensor", "channel", "group"])
    q.add_argument("--asym", action="store_true", help="asymmetric (zero point) instead of symmetric")
    q.add_argument("--targets", nargs="*", help="module names or re:regex to quantize (default: all Linear)")
    q.add_argument("--ignore", nargs="*", help="module names or re:regex to leave alone (default: lm_head)")
    q.add_argument("--observer", help="activation observer for static/smoothquant: minmax, moving_average, "
                   "percentile[:p], mse, histogram (default: mse for static, minmax for smoothquant)")
    q.add_argument("--alpha", default="0.8", help="SmoothQuant migration strength in [0, 1], or 'search' for a "
                   "per-layer choice by output error (default 0.8)")
    q.add_argument("--act-granularity", choices=["token", "tensor"], default="token",
                   help="dynamic: activation scale per token (default) or per tensor")
    q.add_argument("--act-asym", action="store_true", help="dynamic: asymmetric int8 activations")
    q.add_argument("--weight-bits", type=int, choices=[8, 4], default=8,
                   help="dynamic: int8 per-channel (default) or int4 g128 weights")
    q.add_argument("--weight-sym", action="store_true",
                   help="dynamic: symmetric weights (default: a zero point per output channel)")
    q.add_argument("--outlier-threshold", type=float,
                   help="dynamic: LLM.int8() float path for input columns with |x| >= this (e.g. 6)")
    q.add_argument("--rotation", type=int,
                   help="dynamic: Hadamard block size (e.g. 64) rotating each Linear's input and weights")

    q.add_argument("--plan", help="a mixed-precision plan file (JSON) from `llmquant plan` or written by hand")
    q.add_argument("-o", "--output", required=True, help="output folder")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, KL vs the unquantized model, top-1, size")
    e.add_argument("folder", nargs="?", help="a folder written by llmquant quantize")
    e.add_argument("--model", help="evaluate a float model instead (local folder or .gguf)")
    e.add_argument("--reference", help="reference model for KL (default: the quantized model's base)")
    e.add_argument("--no-reference", action="store_true", help="perplexity only")
    e.add_argument("--text", help=".txt or .jsonl (text field) file (default: pydoc_data.topics)")
    e.add_argument("--windows", type=int, default=8, help="number of 512-token windows (8 quick, 40 full)")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="per-layer schemes and sizes of a saved folder")
    i.add_argument("folder")
    i.add_argument("--json", action="store_true", help="print the manifest")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("compare", help="PTQ, QAT, dynamic and mixed precision side by side; writes a report")
    c.add_argument("--model", help="local HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    c.add_argument("--profile", default="quick", choices=["quick", "full"])
    c.add_argument("--strategies", default="ptq,qat,dynamic,mixed")
    c.add_argument("-o", "--output", default="runs/compare", help="report folder")
    c.set_defaults(func=cmd_compare)

    se = sub.add_parser("sensitivity", help="per-layer damage of each candidate format (mixed precision)")
    _add_sens_args(se)
    se.add_argument("--top", type=int, default=20, help="rows to print (most sensitive first)")
    se.add_argument("--json", help="write the full result to this JSON file")
    se.set_defaults(func=cmd_sensitivity)

    pl = sub.add_parser("plan", help="solve a budget into a per-layer mixed-precision plan (JSON)")
    _add_sens_args(pl)
    pl.add_argument("--target-bits", type=float, help="average bits per weight over the planned layers")
    pl.add_argument("--max-size", help="total stored model size, e.g. 60MB (1 MB = 1e6 bytes)")
    pl.add_argument("-o", "--output", required=True, help="plan file to write")
    pl.set_defaults(func=cmd_plan)

    x = sub.add_parser("export", help="write a model for llama.cpp (GGUF) or transformers/vLLM (compressed-tensors)")
    x.add_argument("folder", nargs="?", help="folder written by llmquant quantize (or a model path; default model if omitted)")
    x.add_argument("--format", required=True, choices=["gguf", "compressed-tensors"])
    x.add_argument("-o", "--output", required=True, help="output .gguf file or compressed-tensors folder")
    x.add_argument("--requant", help="gguf: re-quantize layers with no exact block type to Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/F16 (error reported)")
    x.add_argument("--float-type", default="auto", help="gguf: type of float 2-D tensors (auto = smallest exact; F32, F16, BF16, Q8_0)")
    x.add_argument("--tokenizer-gguf", help="gguf: copy the tokenizer of this GGUF file")
    x.add_argument("--tokenizer-pre", help="gguf: llama.cpp pre-tokenizer name for a converted HF tokenizer (default: default)")
    x.add_argument("--packed", action="store_true", help="the input is a .gguf: load its quantized linears packed")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="generate text with the lean runtime (streamed)")
    _add_generation_args(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--no-stream", action="store_true", help="print the text at the end")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat on stdin with the model's chat template (/exit to quit)")
    _add_generation_args(c)
    c.add_argument("--system", help="system message")
    c.set_defaults(func=cmd_chat)

    d = sub.add_parser("demo", help="quantize the default model at a few schemes and compare")
    d.add_argument("--model")
    d.add_argument("--schemes", default="W8,W4G128,W4G64,W4G32A")
    d.add_argument("--windows", type=int, default=8)
    d.set_defaults(func=cmd_demo)
    add_qat_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    from .errors import LLMQuantError

    try:
        return args.func(args)
    except LLMQuantError as e:
        print(f"llmquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
