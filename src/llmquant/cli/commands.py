"""The other subcommands: eval, inspect, demo, compare, sensitivity, plan, qat, export, imatrix (generate and
chat: ``generation.py``)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from . import args as A
from .quantize import _check_out

log = logging.getLogger("llmquant")


def _sens_from_args(args, model, tok):
    import llmquant

    from ..schemes import GGUF_CANDIDATES

    cands = [c.strip() for c in args.candidates.split(",") if c.strip()]
    cands = [x for c in cands for x in (GGUF_CANDIDATES if c.lower() == "gguf" else (c,))]
    return llmquant.sensitivity(
        model, Path(args.text) if args.text else None, cands, method=args.method, tokenizer=tok,
        windows=args.windows, seq_len=args.seq_len, samples=args.samples, include_head=args.include_head,
        cache=not args.no_cache, quantizer=args.quantizer, params=_quantizer_params(args),
    )


def _quantizer_params(args) -> dict | None:
    """--quantizer-params: a JSON object of the quantizer's knobs (checked before the model loads)."""
    from ..errors import SchemeError

    raw = getattr(args, "quantizer_params", None)
    if raw is None:
        return None
    if args.quantizer == "rtn":
        raise SchemeError("--quantizer-params goes with --quantizer gptq, awq or qat")
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SchemeError(f"--quantizer-params is not valid JSON ({e.msg}); write it like '{{\"steps\": 40}}'") from None
    if not isinstance(d, dict):
        raise SchemeError(f"--quantizer-params must be a JSON object of the quantizer's knobs, got {raw!r}")
    from ..schemes.methods import resolve_method_params

    resolve_method_params(args.quantizer, d)  # unknown or bad knobs: one line, before the model loads
    return d


def _check_side_files(args) -> None:
    """--json / --chart files are written at the end of a long run: check their places first."""
    for f in (getattr(args, "json", None), getattr(args, "chart", None)):
        if isinstance(f, str):
            _check_out(f, True, kind="file")


def cmd_sensitivity(args) -> int:
    import llmquant
    from ..report import format_table, sensitivity_chart

    _check_side_files(args)
    _quantizer_params(args)
    model, tok = llmquant.load_model(args.model, stream=args.stream)
    sens = _sens_from_args(args, model, tok)
    if not llmquant.flows.distributed.is_writer():  # rank 0 of a distributed run reports
        return 0
    import math

    def worst(r):  # a GGUF type that cannot hold a layer's rows is inf (not measured): not "sensitive"
        return max([v for k, v in r.items() if k != "layer" and math.isfinite(v)] or [0.0])

    rows = sorted(sens.rows(), key=lambda r: -worst(r))
    print(format_table(rows[: args.top]))
    if any(not math.isfinite(v) for r in rows for k, v in r.items() if k != "layer"):
        print("inf: that GGUF type cannot hold the layer's rows (k-quants need widths that are multiples of 256)")
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
    from ..errors import BudgetError
    from ..flows.mixed import plan_from_sensitivity
    from ..report import format_table, plan_row, sensitivity_chart

    if (args.target_bits is None) == (args.max_size is None):
        raise BudgetError("give exactly one of --target-bits B or --max-size S (e.g. 60MB)")
    like = None  # --max-size gguf:Q4_K_M: the size of llama.cpp's own file of that mixture for this model
    if args.max_size is not None:
        from ..flows.mixed.llama_presets import MIXTURES
        from ..flows.mixed.solve import parse_size

        if args.max_size.lower().startswith("gguf:"):
            like = args.max_size[5:].upper()
            if like not in MIXTURES:
                raise BudgetError(f"--max-size {args.max_size}: not a llama.cpp mixture; known: "
                                  f"{', '.join('gguf:' + m for m in MIXTURES)}")
        else:
            parse_size(args.max_size)  # a size it cannot read is reported before the model loads
    _check_out(args.output, True, kind="file")
    _check_side_files(args)
    _quantizer_params(args)
    model, tok = llmquant.load_model(args.model, stream=args.stream)
    max_size = args.max_size
    if like is not None:
        from ..flows.mixed import llama_cpp_bytes

        max_size = llama_cpp_bytes(model, like)
        print(f"budget: {max_size / 1e6:.2f} MB, the tensor bytes of llama.cpp's {like} file of this model")
    sens = _sens_from_args(args, model, tok)
    if not llmquant.flows.distributed.is_writer():
        return 0
    plan = plan_from_sensitivity(sens, target_bits=args.target_bits, max_size=max_size, size=args.size)
    plan.save(args.output)
    print(format_table([plan_row(plan)]))
    print(f"wrote {args.output} ({len(plan.rules)} layers; edit it freely, then: llmquant quantize --plan {args.output} -o OUT)")
    if args.chart:
        print(f"wrote {sensitivity_chart(sens, args.chart, plan=plan)}")
    return 0


def _add_sens_args(p) -> None:
    from ..schemes import DEFAULT_CANDIDATES

    p.add_argument("--model", help="local HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", help="calibration text, .txt or .jsonl (default: pydoc_data.topics, from its end)")
    p.add_argument("--candidates", default=",".join(DEFAULT_CANDIDATES),
                   help="comma-separated formats; 'gguf' stands for llama.cpp's types "
                        "(Q8_0, Q6_K, Q5_1, Q5_K, Q5_0, Q4_1, Q4_K, Q4_0, Q3_K, Q2_K)")
    p.add_argument("--method", choices=["fisher", "kfac", "kl"], default="fisher",
                   help="fisher: 2nd-order KL estimate (fast, default); kfac: the same in Kronecker-factored form, "
                        "weighing errors by the calibration inputs (needed for --quantizer gptq/awq); kl: measured KL "
                        "per layer and format (slow)")
    p.add_argument("--quantizer", choices=["rtn", "gptq", "awq", "qat"], default="rtn",
                   help="how each candidate is made when measured: rtn, or gptq / awq on the calibration windows, or "
                        "qat (one QAT run per integer format, on the text before the calibration windows) (with "
                        "--method kfac or kl); a plan from gptq / awq / qat candidates is applied by that method")
    p.add_argument("--quantizer-params", metavar="JSON",
                   help="the quantizer's knobs as a JSON object, e.g. '{\"steps\": 40}' for qat (QATParams; "
                        "GPTQParams / AWQParams for gptq / awq); carried into the plan")
    p.add_argument("--include-head", action="store_true", help="plan the output head and embeddings too")
    p.add_argument("--windows", type=A.positive_int, help="calibration windows (default 4)")
    p.add_argument("--seq-len", type=A.seq_len, default=128, help="tokens per calibration window")
    p.add_argument("--samples", type=A.positive_int, default=2, help="fisher/kfac: label draws per window")
    p.add_argument("--no-cache", action="store_true", help="measure again even if a cached result exists")
    p.add_argument("--stream", action="store_true", help="read one decoder layer at a time from the checkpoint "
                   "(models larger than memory; fisher, decoder-layer linears)")
    p.add_argument("--chart", help="write a per-layer sensitivity chart (PNG; needs matplotlib)")
    from . import _add_dist_args

    _add_dist_args(p)


def _reference_for(manifest_source: str | None, stream: bool = False):
    import llmquant

    if manifest_source in (None, "default"):
        return llmquant.load_model(None)[0]
    if Path(manifest_source).exists():
        return llmquant.load_model(manifest_source, stream=stream)[0]
    log.warning("base model %s not found; KL and top-1 are not computed", manifest_source)
    return None


def cmd_eval(args) -> int:
    import llmquant
    from ..errors import LLMQuantError
    from ..report import eval_row, format_table

    if bool(args.folder) == bool(args.model):
        raise LLMQuantError("give either a quantized folder or --model PATH to evaluate")
    model, tok = llmquant.load_model(args.folder or args.model)
    ref = None
    if not args.no_reference:
        if args.reference:
            ref = llmquant.load_model(args.reference, stream=args.stream_reference)[0]
        elif getattr(model, "llmquant_config", None) is not None or getattr(model, "llmquant_plan", None) is not None:
            ref = _reference_for(getattr(model, "llmquant_source", None), stream=args.stream_reference)
    text = Path(args.text) if args.text else None
    seq_len = args.seq_len
    if seq_len is None:  # the standard 512-token windows, unless the model's context is shorter
        from ..data import DEFAULT_SEQ_LEN
        from ..models import context_length

        ctx = min((c for c in (context_length(model), context_length(ref) if ref is not None else None) if c),
                  default=DEFAULT_SEQ_LEN)
        seq_len = min(DEFAULT_SEQ_LEN, ctx)
        if seq_len < DEFAULT_SEQ_LEN:
            log.warning("windows of %d tokens (the model's context) instead of %d", seq_len, DEFAULT_SEQ_LEN)
    res = llmquant.evaluate(model, reference=ref, text=text, tokenizer=tok, windows=args.windows, seq_len=seq_len)
    if not llmquant.flows.distributed.is_writer():  # rank 0 of a distributed run has the sums and reports
        return 0
    from . import eval_tasks

    name = "quantized" if ref is not None else "measured"
    figures = {name: {"perplexity": res.perplexity, "KL": res.kl, "top-1": res.top1}}
    task_rows = eval_tasks.run(args, model, tok, ref, figures, name) if args.tasks else []
    eval_tasks.record(args, figures)
    if args.json:
        print(json.dumps({**res.to_dict(), "tasks": task_rows}, indent=1))
    else:
        print(format_table([eval_row(args.folder or args.model, res)]))
        if task_rows:
            print()
            print(format_table(task_rows))
    return 0


def cmd_inspect(args) -> int:
    from ..io import read_manifest
    from ..io.manifest_schema import check_weights_header
    from ..report import format_table

    man = read_manifest(args.folder)
    check_weights_header(args.folder, man)  # what load checks too, but the data's sha256
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
        from ..schemes import QuantScheme

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
    from ..errors import SchemeError
    from ..report import eval_row, format_table
    from ..schemes import resolve_scheme

    presets = [s.strip() for s in args.schemes.split(",") if s.strip()]
    if not presets:
        raise SchemeError("--schemes is empty; give a comma list of presets such as W8,W4G128")
    for preset in presets:  # an unknown name is reported before the model loads
        resolve_scheme(preset)
    ref, tok = llmquant.load_model(args.model)
    rows = [eval_row("fp32", llmquant.evaluate(ref, reference=ref, windows=args.windows))]
    for preset in presets:
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
    from ..report import compare, format_table
    from ..report.render import detail_rows, recommendations, vs_rows

    _check_out(args.output, True)  # a report folder: existing reports in it are replaced
    types = None
    if args.with_llama_cpp is not None:
        types = [t.strip().upper() for t in args.with_llama_cpp.split(",") if t.strip()] or True
    result = compare(args.model, profile=args.profile, strategies=args.strategies.split(","), out_dir=args.output,
                     threads=args.threads, llama_cpp=types)
    from ..flows import distributed

    if not distributed.is_writer():  # rank 0 of a distributed run reports
        return 0
    print(format_table(vs_rows(result["rows"])))
    print()
    print(format_table(detail_rows(result["rows"])))
    print()
    for line in recommendations(result["rows"]):
        print("- " + line)
    print(f"\nreport written to {args.output}/report.md, report.json, report.html")
    return 0




# ---- qat (issue 5) -------------------------------------------------------------------------------
QAT_FLAGS = {  # CLI flag (dest) -> QATParams field; flags left out keep QATParams' defaults
    "steps": "steps", "lr": "lr", "seq_len": "seq_len", "batch": "batch", "grad_accum": "grad_accum", "loss": "loss",
    "init": "init", "lora_rank": "lora_rank", "grad_checkpoint": "gradient_checkpointing", "text": "text",
}


def cmd_qat(args) -> int:
    """Quantization-aware training: prepare, train with distillation, convert, save."""
    import llmquant
    from ..report import format_table
    from ..schemes import QATParams, QuantConfig, scheme_for

    if args.plan and (args.bits is not None or args.group_size is not None or args.asym):
        from ..errors import SchemeError

        raise SchemeError("--plan names each layer's format; leave out --bits/--group-size/--asym")
    scheme = scheme_for(args.bits, args.group_size, symmetric=not args.asym)
    given = {f: getattr(args, k) for k, f in QAT_FLAGS.items() if getattr(args, k) not in (None, False)}
    if args.frozen_scales:
        given["learn_scales"] = False
    if args.max_minutes:
        given["max_seconds"] = args.max_minutes * 60
    params = QATParams(**given)
    cfg = QuantConfig(weight=scheme, method="qat", method_params=params)
    plan = None
    if args.plan:  # the plan's formats, trained (read before the model is loaded: its errors come first)
        import dataclasses

        from ..schemes import resolve_plan

        plan = resolve_plan(args.plan)
        if plan.method == "qat" and plan.params is not None:  # a QAT plan keeps its knobs, unless flags say otherwise
            params = QATParams(**{**plan.params.to_dict(), **given})
        plan = dataclasses.replace(plan, method="qat", params=params)
    _check_out(args.output, args.overwrite)
    ckpt_dir = args.checkpoint_dir or f"{args.output.rstrip('/')}.qat-ckpt"
    _check_out(ckpt_dir, True)  # checkpoints are written during training, resumed from with --resume
    if args.resume:  # before the model is loaded and the training set up
        from ..flows.qat_checkpoint import load_checkpoint

        load_checkpoint(ckpt_dir)
    model, tok = _load_for_qat(args, plan)
    kw = {k: v for k, v in params.to_dict().items() if k not in ("text", "version")}
    extra = {} if args.checkpoint_every is None else {"checkpoint_every": args.checkpoint_every}
    train = dict(checkpoint_dir=ckpt_dir, resume=args.resume, shard=args.shard, **extra)
    if plan is not None:
        from ..flows.mixed import apply_plan

        summary = apply_plan(model, plan, train=train)
        res, s = summary.calibration["qat"], summary.to_dict()
    else:
        r = llmquant.train_qat(model, Path(params.text) if params.text else None, config=cfg, tokenizer=tok,
                               keep_whole=False, **train, **kw)  # sharded: only rank 0, the writer, gathers it
        res, s = r.to_dict(), r.summary
    if not llmquant.flows.distributed.is_writer():  # rank 0 of a distributed run writes and reports
        return 0
    llmquant.save(model, tok, args.output, overwrite=args.overwrite)
    losses = res["losses"]
    print(format_table([{
        "scheme": f"plan ({len(plan.rules)} rules)" if plan else scheme.name, "steps": res["steps"],
        "first loss": losses[0] if losses else float("nan"), "last loss": losses[-1] if losses else float("nan"),
        "minutes": res["seconds"] / 60, "tokens/s": res["tokens_per_s"], "load peak MB": res.get("setup_peak_rss_mb", 0.0),
        "train peak MB": res["peak_rss_mb"],
        "bits/w": s["bits_per_weight"], "packed MB": s["packed_bytes"] / 1e6,
    }]))
    print(f"saved to {args.output} (checkpoint: {ckpt_dir})")
    return 0


def _load_for_qat(args, plan):
    """The model for ``qat``: with --shard in a distributed run, no weight read now (each rank reads only its
    own rows once the model is sharded); a source that cannot be read that way, or a plan, loads whole."""
    import llmquant
    from ..errors import UnsupportedError

    if not (args.shard and llmquant.flows.distributed.active() is not None):
        return llmquant.load_model(args.model)
    if plan is not None:
        log.warning("--shard with --plan: each process loads the whole model before it is sharded")
        return llmquant.load_model(args.model)
    try:
        return llmquant.load_model(args.model, shard=True)
    except UnsupportedError as e:
        log.warning("%s; each process loads it whole before it is sharded", str(e).split("; load it whole")[0])
        return llmquant.load_model(args.model)


def add_qat_parser(sub) -> None:
    t = sub.add_parser("qat", help="quantization-aware training (distillation from the float model), then save")
    t.add_argument("--model", help="local HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    t.add_argument("--bits", type=int, help="2..8 (default 4; 8 bits: per channel, fewer: groups of 128)")
    t.add_argument("--group-size", type=int, help="values per scale (default: 128 below 8 bits)")
    t.add_argument("--asym", action="store_true", help="asymmetric (learned zero points)")
    t.add_argument("--plan", help="a mixed-precision plan (JSON, from `llmquant plan`): train each layer in the "
                   "plan's format for it instead of one scheme (a plan measured on QAT candidates keeps its QAT "
                   "knobs; flags given here override them)")
    t.add_argument("--steps", type=A.positive_int, help="optimizer steps (default 100)")
    t.add_argument("--lr", type=A.positive_float, help="AdamW learning rate, weights and step sizes (default 5e-5)")
    t.add_argument("--seq-len", type=A.seq_len, help="tokens per training window (default 256)")
    t.add_argument("--batch", type=A.positive_int, help="windows per micro-batch (default 4)")
    t.add_argument("--grad-accum", type=A.positive_int, help="micro-batches per step (default 1)")
    t.add_argument("--loss", choices=["kl", "ce"], help="kl: distill the float model (default); ce: next token")
    t.add_argument("--frozen-scales", action="store_true", help="keep the initial step sizes (no LSQ)")
    t.add_argument("--init", choices=["mse", "rtn"], help="initial step sizes: least-squares "
                   "clipping per group (mse, default) or min-max (rtn)")
    t.add_argument("--lora-rank", type=A.count, help=">0: frozen base weights + rank-r adapters")
    t.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing (less memory)")
    t.add_argument("--max-minutes", type=A.positive_float, help="stop training after this many minutes")
    t.add_argument("--text", help=".txt or .jsonl training text (default: pydoc_data.topics; windows from its end)")
    t.add_argument("--checkpoint-dir", help="where checkpoints go (default: OUT.qat-ckpt)")
    t.add_argument("--checkpoint-every", type=A.positive_int, help="steps between checkpoints (default 50)")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    t.add_argument("--shard", action="store_true", help="with torchrun / --workers: shard the model, gradients and "
                   "optimizer state over the processes (FSDP2) instead of a whole copy in each (DDP); each process "
                   "reads only its own rows of the weights (a safetensors folder or a .gguf file)")
    t.add_argument("-o", "--output", required=True, help="output folder (loadable with llmquant.load)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    from . import _add_dist_args

    _add_dist_args(t)
    t.set_defaults(func=cmd_qat)


def cmd_export(args) -> int:
    import llmquant
    from ..report import format_table

    if args.format != "gguf" and (args.requant or args.float_type != "auto" or args.tokenizer_gguf or args.tokenizer_pre):
        from ..errors import ExportError

        raise ExportError("--requant, --float-type and --tokenizer-* apply to --format gguf only")
    _check_out(args.output, args.overwrite, kind="file" if args.format == "gguf" else "folder")
    if args.tokenizer_gguf:  # read only at the end of the export: check it first
        from ..errors import ExportError
        from ..io.gguf_check import check_gguf

        if not Path(args.tokenizer_gguf).expanduser().is_file():
            raise ExportError(f"tokenizer GGUF {args.tokenizer_gguf!r} does not exist")
        check_gguf(args.tokenizer_gguf)
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
        out = llmquant.export(model, tok, args.output, format="compressed-tensors", overwrite=args.overwrite)
        print(f"wrote {out} (compressed-tensors; load with transformers' from_pretrained or vLLM)")
    return 0


def cmd_imatrix(args) -> int:
    """llama.cpp's importance matrix of a model on calibration text (for ``llama-quantize --imatrix``)."""
    import llmquant
    from ..data import calibration_windows
    from ..io.imatrix import imatrix_from_calibration, write_imatrix
    from ..models import context_length

    if Path(args.output).exists() and not args.overwrite:
        from ..errors import OutputExistsError

        raise OutputExistsError(f"{args.output!r} exists; choose another -o or pass --overwrite")
    src = None if args.calib in (None, "default") else Path(args.calib)
    if src is not None and not src.is_file():  # before the model loads
        from ..errors import TextError

        raise TextError(f"calibration text {str(src)!r} does not exist")
    model, tok = llmquant.load_model(args.model)
    ctx = context_length(model)
    seq_len = args.seq_len or min(512, ctx or 512)  # the standard windows, or the model's whole context
    windows = calibration_windows(tok, src, args.calib_samples, seq_len, context=ctx)
    im = imatrix_from_calibration(model, windows, dataset=str(src) if src else "llmquant default text")
    write_imatrix(im, args.output, overwrite=args.overwrite)
    print(f"wrote {args.output}: {len(im.sums)} weights, {windows.shape[0]} x {windows.shape[1]} tokens")
    return 0


def add_imatrix_parser(sub) -> None:
    m = sub.add_parser("imatrix", help="llama.cpp's importance matrix (GGUF) of a model on calibration text")
    m.add_argument("--model", help="local HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    m.add_argument("--calib", help="calibration text: .txt/.jsonl file, or 'default' (the default)")
    m.add_argument("--calib-samples", type=A.positive_int, default=64, help="calibration windows (default 64)")
    m.add_argument("--seq-len", type=A.seq_len, help="tokens per window (default 512, or the model's context if shorter)")
    m.add_argument("-o", "--output", required=True, help="the imatrix file to write (.gguf)")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=cmd_imatrix)
