"""Do mixed-precision plans transfer to text their sensitivity never saw?

    python benchmarks/bench_plan_transfer.py [--windows 8] [--kl]    # no timing: run beside others with nice

A plan is solved from per-layer sensitivity measured on some calibration text; a user then runs the model on
other text. This measures, on the default model, the KL(fp32 || plan) of plans whose sensitivity came from
different texts and amounts of text, on four evaluation texts, against uniform RTN at the same bits/weight:

evaluation texts (the first ``--windows`` x 512 tokens of each):
  ``pydoc``     the default text (the standard evaluation windows: the language-reference topics
                "assert" .. "compound")
  ``pydoc-B``   held out by topic: the default text's built-in-types and library topics ("types*",
                "string-methods", "formatstrings", "debugger", "bltin-*", "specialattrs"), a text no
                sensitivity source below contains except the in-domain one
  ``licenses``  Debian's license texts (GPL-3 first; legal English, nothing like Python documentation)
  ``vim``       Vim's user manual (usr_*.txt: an editor's technical prose)

sensitivity sources (calibration windows from the *end* of each text, never overlapping its evaluation
windows): the default protocol (the end of the default text, 4 x 128 tokens), the same with 16 x 256 tokens,
the language-reference topics only ("pydoc-A", disjoint from pydoc-B), each other domain in-domain, and a
mix (the damages averaged over pydoc-A, licenses and vim: each layer's damage weighted equally per text).
``--kl`` adds the exact-KL measure (method="kl") on the default protocol's windows for comparison with the
Fisher estimate from the same windows. ``--qat STEPS --qat-candidates`` adds plans for QAT at uniform W4G64's
bits/weight measured by kfac over ``--qat-formats`` on RTN candidates and on QAT-made candidates
(``sensitivity(..., quantizer="qat")``: one QAT run of STEPS per integer format, trained on the text before the
16 x 256 measurement windows), each applied by QAT with STEPS, against uniform W4G64 QAT with STEPS. Results: benchmarks/results/plan_transfer.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import logging
import time
from pathlib import Path

import torch

import llmquant
from llmquant.data import default_text, tokenize, windows as cut_windows
from llmquant.flows.mixed import plan_from_sensitivity, sensitivity
from llmquant.flows.mixed.sensitivity import Sensitivity
from llmquant.report import format_table

from bench_mixed import accuracy, reference_logp  # the same KL against a reference computed once

OUT = Path("benchmarks/results/plan_transfer")
HELD_OUT = ("types", "string-methods", "formatstrings", "debugger", "bltin-", "specialattrs")
LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-2.1", "GPL-2")
UNIFORM = ("W4G64", "W4G128")


def texts() -> dict[str, str]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held = [k for k in keys if k.startswith(HELD_OUT)]
    lic = Path("/usr/share/common-licenses")
    vim = sorted(glob.glob("/usr/share/vim/vim*/doc/usr_*.txt"))
    out = {
        "pydoc": default_text(),
        "pydoc-A": "\n\n".join(topics[k] for k in keys if k not in held),
        "pydoc-B": "\n\n".join(topics[k] for k in held),
    }
    if all((lic / n).is_file() for n in LICENSES):
        out["licenses"] = "\n\n".join((lic / n).read_text() for n in LICENSES)
    if vim:
        out["vim"] = "\n\n".join(Path(p).read_text(errors="replace") for p in vim)
    return out


def averaged(parts: list[Sensitivity]) -> Sensitivity:
    """One sensitivity whose damages are the mean of ``parts`` (same model, units and candidates)."""
    base = parts[0]
    damage = [[sum(p.damage[i][j] for p in parts) / len(parts) for j in range(len(base.candidates))]
              for i in range(len(base.units))]
    return Sensitivity(candidates=list(base.candidates), units=list(base.units), damage=damage, nbytes=base.nbytes,
                       method=base.method, seconds=sum(p.seconds for p in parts), tokens=sum(p.tokens for p in parts),
                       fixed_bytes=base.fixed_bytes, fp32_bytes=base.fp32_bytes, key="+".join(p.key for p in parts))


def uniform_bits(sens, scheme: str) -> float:
    j = sens.candidates.index(scheme)
    return 8 * sum(r[j] for r in sens.nbytes) / sum(u.numel for u in sens.units)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens per text")
    ap.add_argument("--large", default="16x256", help="the larger calibration amount, windows x tokens")
    ap.add_argument("--kl", action="store_true", help="also plan from the exact-KL measure (slow: ~40x Fisher)")
    ap.add_argument("--budgets", default=",".join(UNIFORM), help="uniform schemes whose bits/weight the plans get")
    ap.add_argument("--gptq", action="store_true", help="also GPTQ rows: uniform W4G64 and plans applied by GPTQ")
    ap.add_argument("--gptq-calib", type=int, default=16, help="GPTQ / AWQ calibration windows of 512 tokens")
    ap.add_argument("--awq", action="store_true", help="also AWQ rows: uniform W4G64 and plans applied by AWQ")
    ap.add_argument("--qat", type=int, default=0, metavar="STEPS",
                    help="also QAT rows with this many steps: uniform W4G64 and the default plan, trained")
    ap.add_argument("--qat-candidates", action="store_true",
                    help="with --qat: also plans measured by kfac on --qat-formats, once on RTN candidates and once on "
                         "QAT-made candidates (one QAT run per integer format, the same steps), each applied by QAT")
    ap.add_argument("--qat-formats", default="bf16,W8,W4G64,W4G128,W3G64",
                    help="the candidate formats of the --qat-candidates plans")
    ap.add_argument("--no-rtn-plans", action="store_true",
                    help="skip the RTN plan rows (their sensitivities are still measured, or read from the cache)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t_start = time.perf_counter()
    fp32, tok = llmquant.load_model()
    txt = texts()
    ids = {k: tokenize(tok, v) for k, v in txt.items()}
    evals = [k for k in ("pydoc", "pydoc-B", "licenses", "vim") if k in txt]
    ev = {k: cut_windows(ids[k], args.windows, 512) for k in evals}
    refs = {k: reference_logp(fp32, ev[k]) for k in evals}
    lw, ls = (int(x) for x in args.large.split("x"))

    def sens(key, n, seq, method="fisher", quantizer="rtn", candidates=None, params=None):
        # calibration from the end of the text; checked disjoint from its evaluation windows
        cal = cut_windows(ids[key], n, seq, split="calib")
        if key in ev:
            first = ids[key].numel() - n * seq
            assert first >= ev[key].numel(), f"{key}: calibration overlaps evaluation"
        more = {} if candidates is None else {"candidates": candidates}
        s = sensitivity(fp32, ids[key], method=method, windows=n, seq_len=seq, progress=False, quantizer=quantizer,
                        params=params, **more)
        assert s.tokens == cal.shape[0] * (cal.shape[1] - 1)
        logging.info("sensitivity %s %dx%d %s %s: %.0f s", key, n, seq, method, quantizer, s.seconds)
        return s

    L = f"{lw}x{ls}"
    sources = {"fisher, pydoc end 4x128 (the default)": sens("pydoc", 4, 128),
               f"fisher, pydoc end {L}": sens("pydoc", lw, ls),
               f"kfac, pydoc end {L}": sens("pydoc", lw, ls, "kfac"),
               f"kfac, pydoc-A {L}": sens("pydoc-A", lw, ls, "kfac")}
    for k in ("pydoc-B", "licenses", "vim"):
        if k in txt:
            sources[f"kfac, {k} {L} (in-domain for {k})"] = sens(k, lw, ls, "kfac")
    mix = [s for k, s in sources.items() if k.startswith(("kfac, pydoc-A", "kfac, licenses", "kfac, vim"))]
    if len(mix) > 1:
        sources[f"kfac, mix of pydoc-A, licenses, vim (damages averaged)"] = averaged(mix)
    if args.kl:
        sources["kl (exact), pydoc end 4x128"] = sens("pydoc", 4, 128, method="kl")
    ref_key = "fisher, pydoc end 4x128 (the default)"
    agreement = {k: s.agreement(sources[ref_key])["spearman"] for k, s in sources.items()}
    if args.kl:
        exact = sources["kl (exact), pydoc end 4x128"]
        agreement_kl = {k: s.agreement(exact)["spearman"] for k, s in sources.items()}
    gptq_sens = sens("pydoc", lw, ls, "kfac", "gptq") if args.gptq else None
    awq_sens = sens("pydoc", lw, ls, "kfac", "awq") if args.awq else None

    base = next(iter(sources.values()))
    rows = []

    calib = cut_windows(ids["pydoc"], args.gptq_calib, 512, split="calib")

    def run(label, what, predicted=None, formats=None, method="RTN"):
        m = copy.deepcopy(fp32)
        t0 = time.perf_counter()
        needs = getattr(what, "calibrated", False) or getattr(what, "method", None) in ("gptq", "awq")
        llmquant.quantize(m, what, calib=calib if needs else None, progress=False)
        quantize_s = time.perf_counter() - t0
        row = {"config": label, "method": method, "uniform": label.startswith("uniform")}
        for k in evals:
            row[f"KL {k}"] = accuracy(m, ev[k], refs[k])["KL"]
        row["predicted KL"] = predicted
        row["formats"] = formats
        row["quantize s"] = quantize_s
        rows.append(row)
        logging.info("%s", row)
        del m

    for u in args.budgets.split(","):
        b = uniform_bits(base, u)
        run(f"uniform {u} ({b:.3f} b/w)", u)
        for label, s in sources.items() if not args.no_rtn_plans else ():
            plan = plan_from_sensitivity(s, target_bits=b)
            run(f"plan @ {b:.3f} b/w from {label}", plan, plan.info["predicted_kl"],
                " ".join(f"{k}:{v}" for k, v in sorted(plan.info["formats"].items())))
    from llmquant.schemes import AWQParams, GPTQParams, Plan, QuantConfig, resolve_scheme

    if args.qat:
        from llmquant.schemes import QATParams

        b = uniform_bits(base, "W4G64")
        knobs = QATParams(steps=args.qat)
        run(f"uniform W4G64 QAT, {args.qat} steps ({b:.3f} b/w)",
            QuantConfig(method="qat", weight=resolve_scheme("W4G64"), method_params=knobs), method="QAT")
        plan = plan_from_sensitivity(base, target_bits=b, method="qat")
        plan = Plan(rules=plan.rules, method="qat", params=knobs, info=plan.info)
        run(f"QAT plan @ {b:.3f} b/w from the default fisher plan, {args.qat} steps", plan, plan.info["predicted_kl"],
            " ".join(f"{k}:{v}" for k, v in sorted(plan.info["formats"].items())), method="QAT")
        if args.qat_candidates:
            fm = args.qat_formats.split(",")
            made = {"RTN": sens("pydoc", lw, ls, "kfac", candidates=fm),
                    "QAT": sens("pydoc", lw, ls, "kfac", "qat", candidates=fm, params=knobs)}
            qat_sens = {k: {"seconds": s.seconds, "tokens": s.tokens, "candidates": s.candidates,
                            **({"qat": s.extra["qat"]} if "qat" in s.extra else {})} for k, s in made.items()}
            for k, s in made.items():
                plan = plan_from_sensitivity(s, target_bits=b, method="qat")
                plan = Plan(rules=plan.rules, method="qat", params=knobs, info=plan.info)
                run(f"QAT plan @ {b:.3f} b/w from kfac of {k} candidates ({','.join(fm)}), pydoc end {L}, "
                    f"{args.qat} steps", plan, plan.info["predicted_kl"],
                    " ".join(f"{k}:{v}" for k, v in sorted(plan.info["formats"].items())), method="QAT")
    for name, made, knobs in (("GPTQ", gptq_sens, GPTQParams()), ("AWQ", awq_sens, AWQParams())):
        if made is None:
            continue
        b = uniform_bits(base, "W4G64")
        run(f"uniform W4G64 {name} ({b:.3f} b/w)",
            QuantConfig(method=name.lower(), weight=resolve_scheme("W4G64"), method_params=knobs), method=name)
        for label, s in ((f"kfac, pydoc end {L}", sources[f"kfac, pydoc end {L}"]),
                         (f"kfac of {name} candidates, pydoc end {L}", made)):
            plan = plan_from_sensitivity(s, target_bits=b, method=name.lower())
            run(f"{name} plan @ {b:.3f} b/w from {label}", plan, plan.info["predicted_kl"],
                " ".join(f"{k}:{v}" for k, v in sorted(plan.info["formats"].items())), method=name)
    # ratio to the uniform row of the same budget (and method), per evaluation text
    for r in rows:
        if "plan" in r["config"]:
            b = r["config"].split("@ ")[1].split(" ")[0]
            u = next(x for x in rows if x["uniform"] and f"({b} b/w)" in x["config"] and x["method"] == r["method"])
            for k in evals:
                r[f"x uniform {k}"] = r[f"KL {k}"] / u[f"KL {k}"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "windows": args.windows, "eval_texts": evals,
              "eval_tokens": {k: int(ids[k].numel()) for k in evals},
              "sources": {k: {"tokens": s.tokens, "seconds": s.seconds, "method": s.method,
                              "spearman_vs_default": agreement[k],
                              **({"spearman_vs_exact_kl": agreement_kl[k]} if args.kl else {})}
                          for k, s in sources.items()},
              "rows": rows, "wall_s": time.perf_counter() - t_start}
    if args.qat and args.qat_candidates:
        result["qat_candidates_sensitivity"] = qat_sens
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    cols = (["config"] + [f"KL {k}" for k in evals] + [f"x uniform {k}" for k in evals]
            + ["predicted KL", "quantize s", "formats"])
    md = format_table([{c: r.get(c) for c in cols} for r in rows])
    src = format_table([{"source": k, **v} for k, v in result["sources"].items()])
    args.out.with_suffix(".md").write_text(md + "\n\n" + src + "\n")
    print(md)
    print(src)


if __name__ == "__main__":
    main()
