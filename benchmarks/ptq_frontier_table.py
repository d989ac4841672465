"""Merge the "PTQ frontier: HQQ and AutoRound" runs of bench_ptq_weight.py into one table.

Each run wrote benchmarks/results/ptq_frontier_*.json (or .partial.json when it was stopped early); rows
are grouped by evaluation windows, each ratio against the fp32 row measured with the same windows.
Writes benchmarks/results/ptq_frontier.{json,md}.

    python benchmarks/ptq_frontier_table.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    runs = []
    for f in sorted(RESULTS.glob("ptq_frontier_*.json")):
        if f.name.endswith(".partial.json") and (RESULTS / f.name.replace(".partial", "")).exists():
            continue  # the finished run's file holds the same rows
        d = json.loads(f.read_text())
        rows, meta = (d["rows"], d["meta"]) if isinstance(d, dict) else (d, {"command": "(stopped early: partial)"})
        windows = meta.get("windows") or rows[0].get("windows") or 40  # the first partial file predates the field: 40
        runs.append({"file": f.name, "windows": windows, "meta": meta, "rows": rows})
    fp32 = {r["windows"]: row["perplexity"] for r in runs for row in r["rows"] if row["method"] == "fp32"}
    out = ["| eval windows | method | scheme | ppl | ppl / fp32 | KL | top-1 | bits/weight | quantize s (wall) | "
           "quantize s (CPU) | peak RSS MB | file |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: -r["windows"]):
        for row in r["rows"]:
            ref = fp32.get(r["windows"], float("nan"))
            bpw = row.get("bits_per_weight")
            out.append(f"| {r['windows']} | {row['method']} | {row.get('weight_scheme', row['scheme'])} | "
                       f"{row['perplexity']:.3f} | {row['perplexity'] / ref:.2f} | {row['kl']:.4f} | {row['top1']:.3f} | "
                       f"{'-' if bpw is None else f'{bpw:.2f}'} | {row['quantize_s']:.0f} | {row['quantize_cpu_s']:.0f} | "
                       f"{row['peak_rss_mb']:.0f} | {r['file']} |")
    md = "\n".join(out) + "\n"
    (RESULTS / "ptq_frontier.json").write_text(json.dumps(runs, indent=1))
    (RESULTS / "ptq_frontier.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
