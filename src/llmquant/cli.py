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


def cmd_quantize(args) -> int:
    import llmquant
    from .report import format_table
    from .schemes import QuantConfig

    if getattr(args, "plan", None):
        return _quantize_with_plan(args)
    scheme = _scheme_from_args(args)
    cfg = QuantConfig(
        weight=scheme,
        method=args.method,
        targets=tuple(args.targets or ()),
        ignore=tuple(args.ignore) if args.ignore is not None else ("lm_head",),
    )
    _check_out(args.output, args.overwrite)
    model, tok = llmquant.load_model(args.model)
    summary = llmquant.quantize(model, cfg)
    llmquant.save(model, tok, args.output, overwrite=args.overwrite)
    rows = [
        {
            "layers": len(summary.layers),
            "scheme": scheme.name,
            "bits/w": summary.bits_per_weight,
            "fp32 MB": summary.float_bytes / 1e6,
            "packed MB": summary.packed_bytes / 1e6,
            "weight SQNR dB": summary.mean_sqnr_db,
            "kernel": ",".join(summary.kernels),
            "seconds": summary.seconds,
        }
    ]
    print(format_table(rows))
    print(f"saved to {args.output}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="llmquant", description="Quantize LLMs and measure what it costs.")
    p.add_argument("--version", action="version", version=f"llmquant {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model's weights and save it")
    q.add_argument("--model", help="local HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    q.add_argument("--method", default="rtn", choices=["rtn"], help="quantization algorithm")
    q.add_argument("--scheme", help="a preset: W8, W4G64, W4G128, W3G32, ... (instead of --bits etc.)")
    q.add_argument("--bits", type=int, help="2..8 (default 4)")
    q.add_argument("--group-size", type=int, help="values per scale; omit for per-channel with --bits 8")
    q.add_argument("--granularity", choices=["tensor", "channel", "group"])
    q.add_argument("--asym", action="store_true", help="asymmetric (zero point) instead of symmetric")
    q.add_argument("--targets", nargs="*", help="module names or re:regex to quantize (default: all Linear)")
    q.add_argument("--ignore", nargs="*", help="module names or re:regex to leave alone (default: lm_head)")
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

    d = sub.add_parser("demo", help="quantize the default model at a few schemes and compare")
    d.add_argument("--model")
    d.add_argument("--schemes", default="W8,W4G128,W4G64,W4G32A")
    d.add_argument("--windows", type=int, default=8)
    d.set_defaults(func=cmd_demo)
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
