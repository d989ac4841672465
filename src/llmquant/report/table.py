"""Plain-text / Markdown tables of results."""

from __future__ import annotations

from typing import Any, Sequence


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.3f}"
        return f"{v:.4f}"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A Markdown table (readable as plain text) of ``rows``; ``columns`` picks and orders the keys (default:
    every row's keys, in the order first seen; a row without one shows its cell empty)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def eval_row(label: str, result, extra: dict | None = None) -> dict:
    """One table row from an :class:`~llmquant.eval.EvalResult`."""
    size = result.size
    row = {
        "model": label,
        "ppl": result.perplexity,
        "KL": result.kl,
        "top-1": result.top1,
        "size MB": size["total_bytes"] / 1e6,
        "x fp32": size["ratio_to_fp32"],
        "bits/w (quantized)": size["bits_per_weight_quantized"] or None,
        "bits/w (model)": size["bits_per_weight_model"],
    }
    row.update(extra or {})
    return row
