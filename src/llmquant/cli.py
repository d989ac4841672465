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
        elif getattr(model, "llmquant_config", None) is not None:
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
