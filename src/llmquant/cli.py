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
