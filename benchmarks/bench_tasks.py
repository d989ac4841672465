"""Does KL rank quantized models the way a task does? The default model at fp32 and through each strategy,
scored on the local multiple-choice task (llmquant_pydoc_cloze, through the lm-evaluation-harness adapter)
and by KL / perplexity / top-1 on the standard evaluation windows, in one run.

    python benchmarks/bench_tasks.py --out benchmarks/results/tasks.json

Configs: fp32; RTN W8 (per channel); RTN, GPTQ and AWQ at W4G64 (symmetric); RTN and GPTQ at W3G32. Each
is quantized from the same float model (64 x 512 calibration tokens for GPTQ/AWQ), evaluated on 8 x 512
windows (KL against fp32) and on the task's 100 items (4 choices each, accuracy and length-normalised
accuracy). The rank agreement (Spearman) of KL and task accuracy over the quantized configs is reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CONFIGS = [
    ("fp32", None),
    ("rtn W8", {"weight": "W8"}),
    ("rtn W4G64", {"weight": "W4G64"}),
    ("gptq W4G64", {"weight": "W4G64", "method": "gptq"}),
    ("awq W4G64", {"weight": "W4G64", "method": "awq"}),
    ("rtn W3G32", {"weight": "W3G32"}),
    ("gptq W3G32", {"weight": "W3G32", "method": "gptq"}),
    ("qat W4G64", {"weight": "W4G64", "method": "qat"}),  # params from --qat-minutes (see main)
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tasks.json"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--configs", nargs="*", help="only these configs (fp32 is always measured)")
    ap.add_argument("--qat-minutes", type=float, default=12.0,
                    help="QAT: 300 steps of 2 x 128 tokens (lr 5e-5, MSE init, KL distillation), at most this long")
    a = ap.parse_args()
    import logging

    import torch

    import llmquant
    from llmquant.eval import run_tasks
    from llmquant.data.text import token_windows
    from llmquant.eval.metrics import ReferenceLogits
    from llmquant.flows.mixed.sensitivity import spearman

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.manual_seed(0)
    base, tok = llmquant.load_model()
    ids = token_windows(tok, None, a.windows, 512)
    ref = ReferenceLogits(base, ids, progress=False)
    rows = []
    for name, cfg in CONFIGS:
        if cfg is not None and a.configs and name not in a.configs:
            continue
        t = time.perf_counter()
        m = base if cfg is None else copy.deepcopy(base)
        if cfg is not None:
            if cfg.get("method") == "qat":
                cfg = {**cfg, "method_params": llmquant.QATParams(steps=300, seq_len=128, batch=2, lr=5e-5,
                                                                  max_seconds=60 * a.qat_minutes)}
            llmquant.quantize(m, llmquant.QuantConfig(**cfg), progress=False)
        qs = time.perf_counter() - t
        ev = llmquant.evaluate(m, ref, windows=a.windows, progress=False)
        task = run_tasks(m, tok, ["llmquant_pydoc_cloze"])["llmquant_pydoc_cloze"]
        rows.append({"config": name, "kl": ev.kl, "ppl": ev.perplexity, "top1": ev.top1, **task,
                     "quantize_s": round(qs, 1)})
        print(json.dumps(rows[-1]), flush=True)
        if m is not base:
            del m
    q = [r for r in rows if r["config"] != "fp32"]
    acc_key = next(k for k in q[0] if k.startswith("acc") and "norm" not in k and "stderr" not in k)
    rho = spearman([-r["kl"] for r in q], [r[acc_key] for r in q]) if len(q) >= 3 else None
    res = {"rows": rows, "spearman_kl_vs_accuracy": rho,
           "accuracy_metric": acc_key, "windows": a.windows, "torch": torch.__version__}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if not a.configs else Path(a.out).with_name("tasks_" + "_".join(a.configs).replace(" ", "-") + ".json")
    out.write_text(json.dumps(res, indent=1))
    keys = [k for k in rows[0] if k not in ("config", "quantize_s")]
    print("| config | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['config']} | " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    if rho is not None:
        print(f"Spearman(-KL, {acc_key}) over the quantized configs: {rho:.3f}")


if __name__ == "__main__":
    main()
