"""How well do the sensitivity estimates rank (layer, format) pairs against the exact KL?

    python benchmarks/check_sensitivity_estimates.py [--blocks 0,15,29] [--windows 4] [--seq-len 128]

On the default model, the linears of the given decoder blocks, the default candidates: the exact per-layer
KL (``method="kl"``: the layer alone quantized, the model re-run from that block) against the diagonal
Fisher estimate (``"fisher"``, the default) and the Kronecker-factored one (``"kfac"``), all on the same
calibration windows from the end of the default text; then the same for GPTQ- and AWQ-made candidates
(``quantizer="gptq"`` / ``"awq"``: exact KL against ``kfac``). Reports Spearman rank agreement over the pairs, per
candidate, and the ratio of summed estimate to summed exact KL (a plan's predicted KL is such a sum).
No timing. Results: benchmarks/results/sensitivity_estimates.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch

import llmquant
from llmquant.flows.mixed import sensitivity
from llmquant.report import format_table

OUT = Path("benchmarks/results/sensitivity_estimates")


def compare(est, exact) -> dict:
    a = est.agreement(exact)
    ratios = {}
    for j, c in enumerate(exact.candidates):
        e = sum(r[j] for r in exact.damage if math.isfinite(r[j]))
        s = sum(r[j] for r in est.damage if math.isfinite(r[j]))
        ratios[c] = s / e if e > 0 else None
    return {"spearman": a["spearman"], "per_candidate": a["spearman_per_candidate"], "sum_ratio": ratios}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="0,15,29")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    model, _ = llmquant.load_model()
    blocks = [int(b) for b in args.blocks.split(",")]
    targets = [f"re:model\\.layers\\.{b}\\..*" for b in blocks]
    kw = dict(windows=args.windows, seq_len=args.seq_len, targets=targets, progress=False)
    t0 = time.perf_counter()
    res = {}
    pairs = ((("fisher", "rtn"), ("kl", "rtn")), (("kfac", "rtn"), ("kl", "rtn")),
             (("kfac", "gptq"), ("kl", "gptq")), (("kfac", "awq"), ("kl", "awq")))
    for method, quantizer in dict.fromkeys(x for pair in pairs for x in pair):
        s = sensitivity(model, None, method=method, quantizer=quantizer,
                        **({} if method == "kl" else {"samples": args.samples}), **kw)
        res[(method, quantizer)] = s
        logging.info("%s/%s: %.0f s", method, quantizer, s.seconds)
    rows = []
    for (m, q), ref in pairs:
        c = compare(res[(m, q)], res[ref])
        rows.append({"estimate": f"{m} ({q} candidates)", "vs": f"exact kl ({q} candidates)",
                     "pairs": len(res[ref].units) * len(res[ref].candidates), "spearman": c["spearman"],
                     **{f"sum ratio {k}": v for k, v in c["sum_ratio"].items()},
                     "seconds": res[(m, q)].seconds, "exact seconds": res[ref].seconds})
    # GPTQ's and AWQ's candidates against RTN's, measured exactly: how much damage each removes per format
    r = res[("kl", "rtn")]

    def finite_sum(s, j):
        return sum(x[j] for x in s.damage if math.isfinite(x[j]))

    gain = [{"candidate": c, **{f"{q} / rtn": finite_sum(res[("kl", q)], j) / finite_sum(r, j) for q in ("gptq", "awq")}}
            for j, c in enumerate(r.candidates) if finite_sum(r, j) > 0]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "blocks": blocks,
              "units": [u.name for u in r.units], "candidates": r.candidates,
              "tokens": r.tokens, "rows": rows, "over_rtn_exact": gain, "wall_s": time.perf_counter() - t0,
              "per_candidate": {row["estimate"]: compare(res[k], res[ref])["per_candidate"]
                                for row, (k, ref) in zip(rows, pairs)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = format_table(rows) + "\n\nexact KL of GPTQ / AWQ candidates over exact KL of RTN candidates, summed over the layers:\n\n"
    md += format_table(gain) + "\n"
    args.out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
