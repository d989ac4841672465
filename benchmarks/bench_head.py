"""The embedding / output head format (QuantConfig.head) on the default model: KL, folder size and lean
decode speed with the tied pair left in fp32 and rounded to int8 (Q8_0 blocks, the default), per scheme.

    flock /tmp/llmquant-bench.lock python benchmarks/bench_head.py [--windows 8] [--threads 1]

Writes benchmarks/results/head.{json,md}. KL(fp32 || quantized) on the first ``--windows`` 512-token windows
of the default text; decode: 64 greedy tokens after a 32-token prompt, best of 3, lean runtime.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import llmquant
from llmquant.runtime import GenerationStats, LeanModel
from llmquant.schemes import QuantConfig

from llmquant.report import format_table


def folder_mb(model, tok) -> float:
    with tempfile.TemporaryDirectory() as d:
        llmquant.save(model, tok, Path(d) / "q")
        return sum(f.stat().st_size for f in (Path(d) / "q").iterdir()) / 1e6


def decode_tok_s(model, ids) -> float:
    lean, best = LeanModel(model), 0.0
    for _ in range(3):
        st = GenerationStats()
        llmquant.generate(model, ids, 64, use_eos=False, lean=lean, stats=st)
        best = max(best, st.decode_tok_s)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--schemes", default="W4G128,W4G64,gguf:Q4_0,W8")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ref, tok = llmquant.load_model()
    prompt = torch.randint(100, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    for scheme in a.schemes.split(","):
        for head in ("fp32", "auto"):
            m, _ = llmquant.load_model()
            s = llmquant.quantize(m, QuantConfig(weight=scheme, head=head), progress=False)
            r = llmquant.evaluate(m, reference=ref, tokenizer=tok, windows=a.windows, progress=False)
            rows.append({"scheme": scheme, "head": s.head.get("format", "fp32") + (" (tied)" if s.head.get("tied") else ""),
                         "kl": round(r.kl, 5), "ppl": round(r.perplexity, 3), "top1": round(r.top1, 4),
                         "folder_mb": round(folder_mb(m, tok), 1), "decode_tok_s": round(decode_tok_s(m, prompt), 1),
                         "threads": a.threads, "windows": a.windows})
            print(rows[-1], flush=True)
    out = Path("benchmarks/results/head")
    out.with_suffix(".json").write_text(json.dumps({"command": f"python benchmarks/bench_head.py --windows "
                                                    f"{a.windows} --threads {a.threads}", "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(format_table(rows) + "\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
