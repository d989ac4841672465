"""Render a comparison: the Vs table, one row per configuration, recommendations; Markdown and HTML."""

from __future__ import annotations

import base64
import html
import io
import math

from .table import format_table


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def baseline(rows) -> dict | None:
    return next((r for r in _ok(rows) if r["strategy"] == "fp32"), None)


def detail_rows(rows) -> list[dict]:
    base = baseline(rows)
    out = []
    for r in rows:
        if r.get("status") != "ok":
            out.append({"strategy": r["strategy"], "configuration": r["label"], "ppl": None, "KL": None,
                        "top-1": None, "bits/w": None, "size %": None, "prefill x": None, "decode x": None,
                        "build s": None, "CPU s": None, "build +MB": None, "status": "FAILED: " + r["error"][:80]})
            continue
        out.append({
            "strategy": r["strategy"],
            "configuration": r["label"],
            "ppl": r["perplexity"],
            "KL": r["kl"],
            "top-1": r["top1"],
            "bits/w": r["bits_per_weight"],
            "size %": 100 * r["size_bytes"] / base["size_bytes"] if base else None,
            "prefill x": r["prefill_tok_s"] / base["prefill_tok_s"] if base else None,
            "decode x": r["decode_tok_s"] / base["decode_tok_s"] if base else None,
            "build s": r["build_wall_s"],
            "CPU s": r["build_cpu_s"],
            "build +MB": r["build_rss_increase_mb"],
            "status": "ok",
        })
    return out


PICKS = {
    "accurate": ("its most accurate configuration (lowest KL)", lambda x: x["kl"] if x["kl"] is not None else math.inf),
    "smallest": ("its smallest configuration", lambda x: x["size_bytes"]),
}


def vs_rows(rows, pick: str = "accurate") -> list[dict]:
    """One row per strategy, for the configuration ``pick`` chooses ("accurate": lowest KL, "smallest")."""
    key = PICKS[pick][1]
    base = baseline(rows)
    out = []
    for strategy in dict.fromkeys(r["strategy"] for r in rows):
        if strategy == "fp32":
            continue
        mine = [r for r in rows if r["strategy"] == strategy]
        ok = _ok(mine)
        if not ok:
            out.append({"Strategy": strategy, "Accuracy": "failed: " + mine[0].get("error", "")[:60],
                        "Complexity": "-", "Performance": "-", "Resources": "-"})
            continue
        r = min(ok, key=key)
        dppl = 100 * (r["perplexity"] / base["perplexity"] - 1) if base else float("nan")
        size = 100 * (1 - r["size_bytes"] / base["size_bytes"]) if base else float("nan")
        pre = r["prefill_tok_s"] / base["prefill_tok_s"] if base else float("nan")
        dec = r["decode_tok_s"] / base["decode_tok_s"] if base else float("nan")
        out.append({
            "Strategy": f"{strategy} ({r['label']})",
            "Accuracy": f"ppl {r['perplexity']:.2f} ({dppl:+.1f}%), KL {r['kl']:.4f}, top-1 {100 * r['top1']:.1f}%",
            "Complexity": f"{len(r['steps'])} step{'s' if len(r['steps']) != 1 else ''} ({', '.join(r['steps'])}); data: {r['data']}; {r['build_wall_s']:.0f} s",
            "Performance": f"size -{size:.0f}%, prefill {pre:.2f}x, decode {dec:.2f}x",
            "Resources": f"+{r['build_rss_increase_mb'] / 1e3:.2f} GB peak memory while building, "
                         f"{r['build_cpu_s']:.0f} CPU-s",
        })
    return out


def recommendations(rows) -> list[str]:
    base = baseline(rows)
    ok = [r for r in _ok(rows) if r["strategy"] != "fp32"]
    if not base or not ok:
        return ["Not enough successful configurations to recommend anything."]
    recs = []
    within = [r for r in ok if r["perplexity"] <= 1.01 * base["perplexity"]]
    if within:
        r = min(within, key=lambda x: x["size_bytes"])
        recs.append(f"Smallest within 1% perplexity of fp32: {r['label']} ({r['strategy']}), "
                    f"{r['size_bytes'] / 1e6:.0f} MB ({100 * r['size_bytes'] / base['size_bytes']:.0f}% of fp32), "
                    f"ppl {r['perplexity']:.2f} vs {base['perplexity']:.2f}.")
    else:
        r = min(ok, key=lambda x: x["perplexity"])
        recs.append(f"No configuration stays within 1% perplexity of fp32; the closest is {r['label']} "
                    f"(ppl {r['perplexity']:.2f} vs {base['perplexity']:.2f}).")
    good = [r for r in ok if r["perplexity"] <= 1.05 * base["perplexity"]] or ok
    r = max(good, key=lambda x: x["decode_tok_s"])
    recs.append(f"Fastest decode within 5% perplexity: {r['label']} ({r['strategy']}), "
                f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x fp32 decode, "
                f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x prefill.")
    r = max(good, key=lambda x: x["prefill_tok_s"])
    recs.append(f"Fastest prefill within 5% perplexity: {r['label']} ({r['prefill_tok_s'] / base['prefill_tok_s']:.2f}x fp32).")
    r = min(good, key=lambda x: (len(x["steps"]), x["build_wall_s"]))
    recs.append(f"Least effort within 5% perplexity: {r['label']} ({r['strategy']}): {len(r['steps'])} step(s), "
                f"data: {r['data']}, {r['build_wall_s']:.0f} s.")
    return recs


def preamble(result: dict) -> list[str]:
    env, p = result["env"], result["profile"]
    base = baseline(result["rows"]) or {}
    drift = []
    if "prefill_tok_s_runs" in base:
        (p0, p1), (d0, d1) = base["prefill_tok_s_runs"], base["decode_tok_s_runs"]
        drift = [f"fp32 timed at the start and at the end of the run: prefill {p0:.0f} / {p1:.0f} tok/s, decode "
                 f"{d0:.1f} / {d1:.1f} tok/s; speed-ups are against the faster of the two."]
    return [
        f"Model: {result.get('model') or 'SmolLM2-135M-Instruct (default)'}; profile `{p['name']}`: "
        f"{p['eval_windows']} x {p.get('seq_len', 512)}-token evaluation windows, {p['calib_samples']} x "
        f"{p.get('seq_len', 512)} calibration tokens "
        f"(from the end of the text), QAT {p['qat_steps']} steps; speed: {p['prefill_len']}-token prefill, "
        f"{p['new_tokens']} greedy decode tokens, batch 1.",
        f"Machine: {env['cpu']}, {env['threads']} threads; torch {env['torch']}, transformers {env['transformers']}, "
        f"llmquant {env['llmquant']} ({env.get('commit')}), {env['date']}. fp32 measured in this same run.",
    ] + drift


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = ["# llmquant compare", ""] + preamble(result)
    for pick, (what, _) in PICKS.items():
        lines += ["", f"Each strategy by {what}:", "",
                  "| Strategy | Accuracy | Complexity | Performance | Resources |", "|---|---|---|---|---|"]
        for r in vs_rows(rows, pick):
            lines.append("| " + " | ".join(r[k] for k in ("Strategy", "Accuracy", "Complexity", "Performance", "Resources")) + " |")
    lines += ["", "## Every configuration", "", format_table(detail_rows(rows)), "",
              "`size %` and the speed-ups are against fp32 in this run; `build +MB` is how far the process's resident "
              "memory rose above its level before the build (quantizing, calibrating or training).",
              "", "## Recommendations", ""]
    lines += [f"- {s}" for s in recommendations(rows)]
    notes = [f"- {r['label']}: {r['notes']}" for r in _ok(rows) if r.get("notes")]
    if notes:
        lines += ["", "## Notes", ""] + notes
    failed = [r for r in rows if r.get("status") != "ok"]
    if failed:
        lines += ["", "## Failures", ""] + [f"- {r['label']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def plots(result: dict) -> list[tuple[str, str]]:
    """(title, base64 PNG) for each plot; empty when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = _ok(result["rows"])
    base = baseline(result["rows"])
    out = []
    if rows:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        markers = "osD^v<>pP*Xh"
        for ax, key, name in ((axes[0], "kl", "KL vs fp32 (fp32 drawn at 1e-5)"), (axes[1], "perplexity", "perplexity")):
            for i, r in enumerate(rows):
                ax.scatter(r["bits_per_weight"], max(r[key], 1e-5) if key == "kl" else r[key], s=36,
                           marker=markers[i % len(markers)], label=r["label"])
            ax.set_xlabel("bits per weight (whole model, embeddings included)")
            ax.set_ylabel(name)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        # a legend rather than point labels: configurations of one size sit on top of each other
        fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=7, frameon=False)
        fig.subplots_adjust(bottom=0.3)
        fig.suptitle("Size / accuracy frontier")
        out.append(("Bits per weight against KL and perplexity", _png(fig)))
        plt.close(fig)
    if rows and base:
        fig, ax = plt.subplots(figsize=(11, 4))
        labels = [r["label"] for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["prefill_tok_s"] / base["prefill_tok_s"] for r in rows], 0.4, label="prefill")
        ax.bar([x + 0.2 for x in xs], [r["decode_tok_s"] / base["decode_tok_s"] for r in rows], 0.4, label="decode")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("speed-up vs fp32")
        ax.legend()
        out.append(("Speed-up against fp32 (same run)", _png(fig)))
        plt.close(fig)
    sens = result.get("shared", {}).get("sensitivity")
    if sens:
        fig, ax = plt.subplots(figsize=(11, 4))
        names = list(sens)
        ax.bar(range(len(names)), [max(sens[n], 1e-7) for n in names])
        ax.set_yscale("log")
        ax.set_xlabel("layer (model order)")
        ax.set_ylabel(result["shared"].get("sensitivity_label", "damage"))
        out.append(("Per-layer sensitivity", _png(fig)))
        plt.close(fig)
    hist = result.get("shared", {}).get("weight_histogram")
    if hist:
        fig, axes = plt.subplots(1, len(hist["quantized"]), figsize=(12, 3), sharey=True)
        for ax, (bits, vals) in zip(axes, hist["quantized"].items()):
            ax.hist(hist["weights"], bins=200, alpha=0.4, label="float")
            ax.hist(vals, bins=200, alpha=0.8, label=f"{bits}")
            ax.set_title(f"{bits}", fontsize=9)
            ax.set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"What fewer bits do to the weights of {hist['layer']} (one row)")
        out.append(("Weight values at 16, 8, 4 and 2 bits", _png(fig)))
        plt.close(fig)
    return out


def html_report(result: dict) -> str:
    rows = result["rows"]
    esc = html.escape

    def table(rs):
        if not rs:
            return ""
        cols = list(rs[0])
        head = "".join(f"<th>{esc(c)}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{esc(_cell(r[c]))}</td>" for c in cols) + "</tr>" for r in rs
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    figs = "".join(
        f"<figure><figcaption>{esc(t)}</figcaption><img alt='{esc(t)}' src='data:image/png;base64,{b}'></figure>"
        for t, b in plots(result)
    ) or "<p>(plots need matplotlib: pip install matplotlib)</p>"
    header = "<br>".join(esc(line) for line in preamble(result))
    recs = "".join(f"<li>{esc(s)}</li>" for s in recommendations(rows))
    vs_tables = "".join(f"<p>Each strategy by {esc(what)}:</p>{table(vs_rows(rows, pick))}" for pick, (what, _) in PICKS.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llmquant compare</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; background: #fff; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
th {{ background: #f0f0f0; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>llmquant compare</h1>
<p>{header}</p>
<h2>Strategies</h2>{vs_tables}
<h2>Every configuration</h2>{table(detail_rows(rows))}
<h2>Recommendations</h2><ul>{recs}</ul>
<h2>Plots</h2>{figs}
</body></html>
"""


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
