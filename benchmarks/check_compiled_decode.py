"""The compiled decode step against the Python step on the default model (numerics, no timing).

    python benchmarks/check_compiled_decode.py [--configs fp32 W8 gguf:Q4_0] [--threads 1] [--model DIR]
        [--new 64] [--out PATH]

``--model DIR``: a local Hugging Face folder instead of the default model (a folder without a tokenizer, such
as the random-weight checkpoint of ``benchmarks/bench_streaming.py write DIR --shape 1b``, is prompted with the
default model's tokenizer); the step must then also say it runs every linear natively ("python linears" column).

Per config and kernel: greedy tokens (64 after a 32-token prompt of the default text) of the lean runtime with
the compiled step and without it, tokens equal before the first difference; and, teacher-forced on the Python
path's tokens, the largest |logit difference| per step relative to the largest logit, and whether each step's
argmax agrees. Weight-only kernels (fp32, packed_avx2) should give identical tokens; packed_q8act may part
after some tokens (int8 activation rounding amplifies fp32-order differences), its per-step logits still agree.
Writes benchmarks/results/compiled_decode_check.{json,md} (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import llmquant
from llmquant.data.text import token_windows
from llmquant.kernels import set_kernel
from llmquant.report import format_table
from llmquant.runtime import LeanModel

PROMPT, NEW = 32, 64
OUT = Path("benchmarks/results/compiled_decode_check")


@torch.inference_mode()
def forced_logits(model, ids: torch.Tensor, compiled: bool) -> torch.Tensor:
    """Logits of each decode step fed ``ids[:, PROMPT:]`` one token at a time, (steps, vocab)."""
    lean = LeanModel(model, compiled=compiled)
    cache = lean.new_cache(1, ids.shape[1])
    lean(ids[:, :PROMPT], cache)
    return torch.cat([lean(ids[:, i:i + 1], cache) for i in range(PROMPT, ids.shape[1])], 1)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["fp32", "W8", "gguf:Q4_0"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path, help="a local Hugging Face folder instead of the default model")
    ap.add_argument("--new", type=int, default=NEW, help="greedy tokens after the 32-token prompt")
    ap.add_argument("--out", type=Path, default=OUT, help="results path without suffix (.json and .md written)")
    args = ap.parse_args()
    new = args.new
    torch.set_num_threads(args.threads)
    fp32, tok = llmquant.load_model(args.model)
    if tok is None:  # a bare checkpoint: prompt it with the default model's tokenizer
        from llmquant.io.hf import default_model_file, gguf_tokenizer

        tok = gguf_tokenizer(default_model_file())
    prompt = token_windows(tok, None, 1, 512)[:1, :PROMPT]
    cfg = fp32.config
    shape = {"hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
             "kv heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
             "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
             "layers": cfg.num_hidden_layers}
    print(f"[shape] {shape}", flush=True)
    rows = []
    for c in args.configs:
        m = fp32 if c == "fp32" else copy.deepcopy(fp32)
        if c != "fp32":
            llmquant.quantize(m, c, progress=False)
        for kernel in [None] if c == "fp32" else ["packed_avx2", "packed_q8act"]:
            set_kernel(m, kernel)
            leans = {on: LeanModel(m, compiled=on) for on in (True, False)}
            toks = {on: llmquant.generate(m, prompt, new, use_eos=False, lean=lean) for on, lean in leans.items()}
            step = leans[True].compiled_step()
            assert step is not None, "the compiled step was not built for this model"
            del leans
            d = (toks[True][0] != toks[False][0]).nonzero()
            same = int(d[0]) if len(d) else new
            ids = torch.cat([prompt, toks[False]], 1)[:, :-1]
            on, off = forced_logits(m, ids, True), forced_logits(m, ids, False)
            rel = ((on - off).abs().amax(-1) / off.abs().amax(-1))
            rows.append({"config": c, "kernel": kernel or "float", "greedy tokens equal": f"{same}/{new}",
                         "python linears": "yes" if step.needs_python else "none",
                         "largest |logit diff| / max|logit|": f"{float(rel.max()):.2e}",
                         "median": f"{float(rel.median()):.2e}",
                         "argmax equal (teacher-forced)": f"{int((on.argmax(-1) == off.argmax(-1)).sum())}/{len(rel)}"})
            print(rows[-1], flush=True)
        set_kernel(m, None)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"model": str(args.model or "default"), "shape": shape,
                                                    "threads": args.threads, "prompt": PROMPT, "new": new,
                                                    "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(format_table(rows) + "\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
