"""Command line: a thin layer over the Python API. Errors a user can cause print one line, exit 2."""

from __future__ import annotations

import logging
import sys

from . import args as A
from .quantize import cmd_quantize
from .commands import _add_sens_args, add_imatrix_parser, add_qat_parser, cmd_compare, cmd_demo, cmd_eval, cmd_export, cmd_inspect, cmd_plan, cmd_sensitivity
from .generation import _add_generation_args, cmd_chat, cmd_generate

log = logging.getLogger("llmquant")


def build_parser() -> A.Parser:
    from ..version import __version__

    p = A.Parser(prog="llmquant", description="Quantize LLMs and measure what it costs.")
    p.add_argument("--version", action="version", version=f"llmquant {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model's weights and save it")
    q.add_argument("--model", help="local HF folder or .gguf file (default: SmolLM2-135M-Instruct)")
    from ..flows import METHODS

    q.add_argument("--method", default="rtn", metavar="METHOD[,METHOD]",
                   help="one of " + ", ".join(m for m in METHODS if m != "plan") + "; or a comma list of layer-wise "
                        "methods that compose (awq,gptq). rtn (weights only); gptq/awq (weights only, calibrated); "
                        "static: W8A8 with calibrated per-tensor activation scales; smoothquant: SmoothQuant, then "
                        "static W8A8; dynamic: per-token int8 activations at run time; qat: distillation training; "
                        "hqq (weights only, no data); autoround (weights only, calibrated, 200 steps per layer)")
    q.add_argument("--calib", help="calibration text: .txt/.jsonl file, or 'default' (the default)")
    q.add_argument("--calib-samples", type=A.positive_int, help="calibration windows (default 64)")
    q.add_argument("--seq-len", type=A.seq_len, help="tokens per calibration window (default 512)")
    q.add_argument("--one-pass", action="store_true", help="calibrated methods: one float pass over the whole model "
                   "gathers every layer's statistics (each layer calibrated on the float model's inputs, not the "
                   "quantized layers' outputs): about half the passes; holds every layer's statistics at once")
    q.add_argument("--calib-compute", choices=["float32", "bfloat16"], help="calibrated methods: the calibration "
                   "passes' arithmetic (default float32; bfloat16: autocast, about 0.7x GPTQ's time on a CPU with "
                   "bfloat16 dot products, KL +2%% measured at W4G64)")
    q.add_argument("--two-pass", action="store_true", help="gptq / imse rtn / hqq: calibrate each decoder layer in "
                   "two passes (float statistics for all its linears, then the quantized outputs) instead of one "
                   "pass in which each linear sees the linears before it already quantized (less memory)")
    q.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing activation energy")
    q.add_argument("--imatrix", help="rtn: llama.cpp's importance matrix file (GGUF; `llmquant imatrix` or llama-imatrix) "
                   "weighting each group's scale search, as llama-quantize --imatrix")
    q.add_argument("--scheme", help="a preset: W8, W4G64, W4G128, W3G32, ... (instead of --bits etc.)")
    q.add_argument("--bits", type=int, help="2..8 (default 4; 8 bits: per channel, fewer: groups of 128)")
    q.add_argument("--group-size", type=int, help="values per scale; omit for per-channel with --bits 8")
    q.add_argument("--granularity", choices=["tensor", "channel", "group"])
    q.add_argument("--asym", action="store_true", help="asymmetric (zero point) instead of symmetric")
    q.add_argument("--targets", nargs="*", help="module names or re:regex to quantize (default: all Linear)")
    q.add_argument("--ignore", nargs="*", help="module names or re:regex to leave alone (default: lm_head)")
    q.add_argument("--head", help="format of the input embedding and output head: auto (default: weight-only "
                   "methods and plans int8 in blocks of 32, i.e. llama.cpp's Q8_0, a tied pair kept tied; W8A8 methods: as "
                   "loaded), fp32 (as loaded), bf16, fp16, or a scheme (W8, W4G64, gguf:Q6_K, ...)")
    q.add_argument("--observer", help="activation observer for static/smoothquant: minmax, moving_average, "
                   "percentile[:p], mse, histogram (default: mse for static, minmax for smoothquant)")
    q.add_argument("--alpha", help="SmoothQuant migration strength in [0, 1], or 'search' for a "
                   "per-layer choice by output error (default 0.8)")
    q.add_argument("--act-granularity", choices=["token", "tensor"],
                   help="dynamic: activation scale per token (default) or per tensor")
    q.add_argument("--act-asym", action="store_true", help="dynamic: asymmetric int8 activations")
    q.add_argument("--weight-bits", type=int, choices=[8, 4],
                   help="dynamic: int8 per-channel (default) or int4 g128 weights")
    q.add_argument("--weight-sym", action="store_true",
                   help="dynamic: symmetric weights (default: a zero point per output channel)")
    q.add_argument("--outlier-threshold", type=A.positive_float,
                   help="dynamic: LLM.int8() float path for input columns with |x| >= this (e.g. 6)")
    q.add_argument("--rotation", type=int,
                   help="dynamic: Hadamard block size (e.g. 64) rotating each Linear's input and weights")
    q.add_argument("--stream", action="store_true",
                   help="read each decoder layer from the model's safetensors or .gguf file when it is quantized "
                        "(models larger than memory; methods that run layer by layer)")
    q.add_argument("--recipe", help="reproduce a recipe: a folder written by llmquant (its manifest's config or "
                   "plan) or a QuantConfig JSON file")
    q.add_argument("--plan", help="a mixed-precision plan file (JSON) from `llmquant plan` or written by hand")
    q.add_argument("-o", "--output", required=True, help="output folder")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run writing the same -o from its "
                   "last finished layer (the same command otherwise; a run without it starts over)")
    q.add_argument("--shard-size", default="2GB", help="the most one safetensors file of the output holds "
                   "(default 2GB; the output is written layer by layer as it is quantized)")
    q.add_argument("--max-memory", help="a memory budget such as 8GB: refused up front when one layer and its work "
                   "do not fit; calibration activations spill to disk when all of them do not")
    _add_dist_args(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity, KL vs the unquantized model, top-1, size")
    e.add_argument("folder", nargs="?", help="a folder written by llmquant quantize")
    e.add_argument("--model", help="evaluate a float model instead (local folder or .gguf)")
    e.add_argument("--reference", help="reference model for KL (default: the quantized model's base)")
    e.add_argument("--no-reference", action="store_true", help="perplexity only")
    e.add_argument("--stream-reference", action="store_true",
                   help="run the float reference layer by layer from its safetensors (a model larger than memory)")
    e.add_argument("--text", help=".txt or .jsonl (text field) file (default: pydoc_data.topics)")
    e.add_argument("--windows", type=A.positive_int, default=8, help="number of 512-token windows (8 quick, 40 full)")
    e.add_argument("--seq-len", type=A.seq_len,
                   help="tokens per window (default 512, or the model's context where that is shorter)")
    e.add_argument("--json", action="store_true", help="print JSON")
    from .eval_tasks import add_task_args

    add_task_args(e)
    _add_dist_args(e)
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
    c.add_argument("--threads", type=A.threads, help="CPU threads for the whole run (torch.set_num_threads)")
    c.add_argument("--with-llama-cpp", nargs="?", const="", metavar="TYPES",
                   help="add llama.cpp's own quantizations of the model (Q8_0,Q6_K,Q4_K_M,Q3_K_M,Q2_K, or those "
                        "named), evaluated and timed inside llama.cpp (needs the prebuilt wheel cyllama)")
    _add_dist_args(c)
    c.set_defaults(func=cmd_compare)

    se = sub.add_parser("sensitivity", help="per-layer damage of each candidate format (mixed precision)")
    _add_sens_args(se)
    se.add_argument("--top", type=A.positive_int, default=20, help="rows to print (most sensitive first)")
    se.add_argument("--json", help="write the full result to this JSON file")
    se.set_defaults(func=cmd_sensitivity)

    pl = sub.add_parser("plan", help="solve a budget into a per-layer mixed-precision plan (JSON)")
    _add_sens_args(pl)
    pl.add_argument("--target-bits", type=A.positive_float, help="average bits per weight over the planned layers")
    pl.add_argument("--max-size", help="total stored model size, e.g. 60MB (1 MB = 1e6 bytes), or gguf:Q4_K_M "
                    "(the tensor bytes of llama.cpp's own file of that mixture for this model)")
    pl.add_argument("--size", choices=["auto", "folder", "gguf"], default="auto",
                    help="what the budget counts: an llmquant folder's bytes, or a GGUF file's tensor bytes "
                         "(auto: gguf when every candidate is a GGUF type, e.g. --candidates gguf)")
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
    g.add_argument("--prompt", action="append", type=A.nonempty("the prompt"),
                   help="the text to continue; repeat it to generate for several prompts as one batch")
    g.add_argument("--prompts-file",
                   help="a text file, one prompt per line (blank lines skipped), generated as one batch")
    g.add_argument("--no-stream", action="store_true", help="print the text at the end (always, for several prompts)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="chat on stdin with the model's chat template (/exit to quit)")
    _add_generation_args(c)
    c.add_argument("--system", help="system message")
    c.set_defaults(func=cmd_chat)

    d = sub.add_parser("demo", help="quantize the default model at a few schemes and compare")
    d.add_argument("--model")
    d.add_argument("--schemes", default="W8,W4G128,W4G64,W4G32A")
    d.add_argument("--windows", type=A.positive_int, default=8)
    d.set_defaults(func=cmd_demo)
    add_qat_parser(sub)
    add_imatrix_parser(sub)
    return p


def _add_dist_args(p) -> None:
    p.add_argument("--workers", type=A.positive_int, default=1,
                   help="run as this many processes on this machine (torch.distributed, gloo): the calibration "
                        "is split over them; the same as torchrun --standalone --nproc-per-node N -m llmquant ...")
    p.add_argument("--timeout", type=A.positive_float, default=600.0,
                   help="distributed runs: seconds a process waits for the others before the run stops (default 600)")


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    from ..errors import LLMQuantError

    try:
        args = build_parser().parse_args(argv)
    except LLMQuantError as e:  # a usage error (args.Parser)
        print(f"llmquant: error: {_one_line(e)}", file=sys.stderr)
        return 2
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from ..io.hf import quiet_transformers

    quiet_transformers()

    from ..flows import distributed

    if getattr(args, "workers", 1) > 1 and not distributed.launched():
        from .launch import launch

        return launch(list(sys.argv[1:] if argv is None else argv), args.workers, args.timeout)
    try:
        if distributed.launched():
            distributed.init(timeout=getattr(args, "timeout", None))
        return args.func(args)
    except LLMQuantError as e:
        print(f"llmquant: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmquant: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
