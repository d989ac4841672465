"""Shared ending of the speed benchmarks: ratios against the first row (fp32, same run), JSON + Markdown."""

from __future__ import annotations

import json
from pathlib import Path

from llmquant.report import format_table


def write_speed_results(rows: list[dict], name: str, meta: dict) -> None:
    """Add ``prefill x fp32`` / ``decode x fp32`` against ``rows[0]``; write benchmarks/results/NAME.{json,md}."""
    base = rows[0]
    for r in rows:
        r["prefill x fp32"] = r["prefill tok/s"] / base["prefill tok/s"]
        r["decode x fp32"] = r["decode tok/s"] / base["decode tok/s"]
    out = Path("benchmarks/results") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    md = format_table(rows)
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
