"""Reports of mixed-precision planning: the per-layer sensitivity chart (PNG) and plan summary rows."""

from __future__ import annotations

from pathlib import Path

from ..errors import LLMQuantError


def sensitivity_chart(sens, path, *, title: str | None = None, plan=None) -> Path:
    """A PNG of each layer's damage (log scale) under each candidate; with ``plan``, the chosen format of
    each layer is marked. Needs matplotlib (``pip install 'llmquant[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LLMQuantError("the sensitivity chart needs matplotlib: pip install 'llmquant[plot]' (or matplotlib)") from None
    n = len(sens.units)
    fig, ax = plt.subplots(figsize=(max(10, n * 0.06 + 4), 5.5), dpi=110)
    xs = list(range(n))
    floor = min([d for row in sens.damage for d in row if d > 0] or [1e-12])
    for j, c in enumerate(sens.candidates):
        ax.plot(xs, [max(r[j], floor) for r in sens.damage], marker=".", ms=3, lw=0.7, label=c)
    if plan is not None:
        chosen = dict(plan.rules)
        from ..schemes import format_name

        idx = {c: j for j, c in enumerate(sens.candidates)}
        px, py = [], []
        for i, u in enumerate(sens.units):
            f = chosen.get(u.name)
            if f is not None and format_name(f) in idx:
                px.append(i)
                py.append(max(sens.damage[i][idx[format_name(f)]], floor))
        ax.scatter(px, py, s=22, facecolors="none", edgecolors="black", lw=0.8, label="plan's choice", zorder=5)
    ax.set_yscale("log")
    ax.set_ylabel("damage: KL per token when this layer alone is quantized")
    blocks = {}
    for i, u in enumerate(sens.units):
        if u.block is not None:
            blocks.setdefault(u.block, i)
    ticks = sorted(blocks.items())[:: max(1, len(blocks) // 15)]
    ax.set_xticks([i for _, i in ticks] + [i for i, u in enumerate(sens.units) if u.block is None])
    ax.set_xticklabels([f"L{b}" for b, _ in ticks] + [u.name.split(".")[-1] for u in sens.units if u.block is None],
                       fontsize=7, rotation=90)
    ax.set_xlabel("layer (in model order; q k v o gate up down within each block)")
    ax.set_title(title or f"per-layer sensitivity ({sens.method}, {sens.tokens} calibration tokens, {sens.seconds:.0f}s)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(5, len(sens.candidates) + 1), loc="lower left")
    fig.tight_layout()
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plan_row(plan, extra: dict | None = None) -> dict:
    """One table row: achieved bits/weight and size of a plan the planner wrote, and its predicted KL."""
    info = plan.info
    row = {
        "budget": info.get("budget"),
        "bits/w (planned)": info.get("bits_per_weight"),
        "total MB": (info.get("total_bytes") or 0) / 1e6 or None,
        "predicted KL": info.get("predicted_kl"),
        "made by": plan.method,
        "formats": " ".join(f"{k}:{v}" for k, v in sorted((info.get("formats") or {}).items())),
    }
    row.update(extra or {})
    return row
