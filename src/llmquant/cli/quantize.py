"""`llmquant quantize`: the arguments become one QuantConfig (or a plan), passed to ``llmquant.quantize``.

Every default lives in the config (``llmquant.schemes.methods.METHOD_DEFAULTS``, ``scheme_for``,
``CalibSpec``, the params dataclasses): an argument left out is left out of the config.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("llmquant")

DYNAMIC_FLAGS = ("act_granularity", "act_asym", "weight_bits", "weight_sym", "outlier_threshold", "rotation")


def _scheme_from_args(args):
    """The weight scheme the arguments name, or None when they name none (the method's default)."""
    from ..errors import SchemeError
    from ..schemes import resolve_scheme, scheme_for

    explicit = args.bits is not None or args.group_size is not None or args.asym or args.granularity
    if args.scheme:
        if explicit:
            raise SchemeError("give either --scheme PRESET or --bits/--group-size/--asym/--granularity, not both")
        return resolve_scheme(args.scheme)
    if not explicit:
        return None
    return scheme_for(args.bits, args.group_size, symmetric=not args.asym, granularity=args.granularity)


def _check_out(out: str, overwrite: bool, kind: str = "folder") -> None:
    """Refuse an output location the save would fail on, before any work (see io.paths)."""
    from ..io.paths import check_output_location

    check_output_location(out, overwrite, kind=kind)


def _float_alpha(v: str | None):
    from ..errors import SchemeError

    if v is None or v == "search":
        return v
    try:
        return float(v)
    except ValueError:
        raise SchemeError(f"--alpha takes a number in [0, 1] or 'search', got {v!r}") from None


def _methods(args) -> list[str]:
    return [m.strip() for m in args.method.split(",") if m.strip()]


def config_from_args(args):
    """The QuantConfig the ``quantize`` arguments describe (nothing filled in here: the config's defaults
    apply to what was left out)."""
    from ..errors import SchemeError
    from ..schemes import CalibSpec, GPTQParams, QuantConfig
    from ..schemes.methods import dynamic_schemes
    from ..flows import needs_calibration

    methods = _methods(args)
    method = methods[0] if len(methods) == 1 else methods
    weight, activation = _scheme_from_args(args), None
    given_dyn = [f for f in DYNAMIC_FLAGS if getattr(args, f) not in (None, False)]
    if "dynamic" in methods:
        if weight is not None:
            raise SchemeError(
                "--method dynamic takes --weight-bits 8|4, --act-granularity token|tensor, --act-asym, --weight-sym, "
                "--outlier-threshold and --rotation, not --scheme/--bits/--group-size/--granularity/--asym")
        if given_dyn:
            weight, activation = dynamic_schemes(
                args.weight_bits or 8, args.act_granularity or "token", not args.act_asym, 128,
                args.outlier_threshold, args.weight_sym, args.rotation)
    elif given_dyn:
        flags = ", ".join("--" + f.replace("_", "-") for f in given_dyn)
        raise SchemeError(f"{flags} apply to --method dynamic only")
    if args.act_order and "gptq" not in methods:
        raise SchemeError("--act-order applies to --method gptq only")
    params = None
    if getattr(args, "imatrix", None):
        from pathlib import Path

        from ..schemes import RTNParams

        if methods != ["rtn"]:
            raise SchemeError("--imatrix applies to --method rtn (GPTQ and AWQ weigh errors by their own calibration "
                              "statistics)")
        if not Path(args.imatrix).is_file():
            raise SchemeError(f"--imatrix {args.imatrix!r} is not a file (write one with `llmquant imatrix`)")
        params = RTNParams(observer="imse", imatrix=args.imatrix)
    if args.act_order:
        gp = GPTQParams(act_order=True)
        params = gp if method == "gptq" else [gp if m == "gptq" else None for m in methods]
    cfg = QuantConfig(weight=weight, activation=activation, method=method, targets=tuple(args.targets or ()),
                      observer=args.observer, smooth_alpha=_float_alpha(args.alpha), method_params=params,
                      **({"ignore": tuple(args.ignore)} if args.ignore is not None else {}),
                      **({"head": args.head} if getattr(args, "head", None) else {}))
    if needs_calibration(cfg):
        given = {k: v for k, v in (("source", None if args.calib in (None, "default") else args.calib),
                                   ("samples", args.calib_samples), ("seq_len", args.seq_len)) if v is not None}
        if getattr(args, "one_pass", False):
            given["sequential"] = False
        if getattr(args, "calib_compute", None):
            given["compute"] = args.calib_compute
        if getattr(args, "two_pass", False):
            given["true_sequential"] = False
        cfg = cfg.with_(calibration=CalibSpec(**given))
    return cfg


def _summary_row(summary, scheme_name: str) -> dict:
    """The one-row table ``quantize`` prints for a QuantSummary."""
    return {
        "layers": len(summary.layers),
        "scheme": scheme_name,
        "embedding/head": (summary.head["format"] + (" tied" if summary.head.get("tied") else "")) if summary.head
        else "as loaded",
        "bits/w": summary.bits_per_weight,
        "fp32 MB": summary.float_bytes / 1e6,
        "packed MB": summary.packed_bytes / 1e6,
        "weight SQNR dB": summary.mean_sqnr_db,
        "kernel": ",".join(summary.kernels),
        "seconds": summary.seconds,
        "peak MB": summary.peak_memory_mb,
    }


def _plan_row(llmquant, model, summary) -> dict:
    size = llmquant.model_size(model)
    counts: dict[str, int] = {}
    for l in summary.layers:
        counts[l.scheme] = counts.get(l.scheme, 0) + 1
    return {
        "layers": len(summary.layers),
        "formats": " ".join(f"{k}:{v}" for k, v in sorted(counts.items())),
        "bits/w (planned layers)": summary.bits_per_weight,
        "model MB": size.total_bytes / 1e6,
        "x fp32": size.ratio_to_fp32,
        "seconds": summary.seconds,
    }


def _plan_method(args, method: str | None = None):
    """(method, params, calibration) for a plan or a llama.cpp mixture from ``--method`` (rtn or gptq; or
    ``method``), ``--act-order`` and the calibration flags."""
    import argparse

    from ..errors import SchemeError
    from ..schemes.plan import PLAN_METHODS

    method = method or args.method
    if method not in PLAN_METHODS:
        raise SchemeError(f"a plan's formats are made by --method {' or '.join(PLAN_METHODS)}, got {method!r}")
    cfg = config_from_args(argparse.Namespace(**{**vars(args), "scheme": None, "method": method}))
    return cfg.method, (cfg.method_params if cfg.method != "rtn" or args.imatrix else None), cfg.calibration


def _with_method(plan, method):
    import dataclasses

    return dataclasses.replace(plan, method=method[0], params=method[1])


def cmd_quantize(args) -> int:
    import llmquant
    from ..errors import SchemeError
    from ..report import format_table

    recipe = getattr(args, "plan", None) or getattr(args, "recipe", None)
    plan_method = None  # for a plan or a llama.cpp mixture: (method, its params, calibration)
    if recipe:
        rest = [f for f in ("scheme", "bits", "group_size", "asym", "granularity", "targets", "observer", "alpha",
                            "head", *DYNAMIC_FLAGS) if getattr(args, f) not in (None, False)]
        if args.recipe:
            rest += [f for f in ("act_order", "imatrix") if getattr(args, f)]
        if rest or args.ignore is not None or (args.recipe and args.method != "rtn"):
            what = "--plan names each layer's format" if args.plan else "--recipe gives the whole config"
            raise SchemeError(f"{what}; leave out --scheme/--bits/... (got {', '.join(rest) or '--method/--ignore'})")
        if args.plan:
            from ..schemes import Plan, QuantConfig

            plan = Plan.load(args.plan)
            if args.method != "rtn" or args.act_order or args.imatrix:  # the plan's formats made by GPTQ, or RTN
                # weighted by the imatrix
                plan = _with_method(plan, _plan_method(args))
            config = QuantConfig(method="plan", method_params=plan,
                                 calibration=_plan_method(args, plan.method)[2] if plan.calibrated else None)
        else:
            config = llmquant.flows.registry.resolve(llmquant.io.read_recipe(recipe))
    elif args.scheme and llmquant.flows.registry.is_llama_mixture(args.scheme):
        rest = [f for f in ("bits", "group_size", "asym", "granularity", "targets", "observer", "alpha",
                            "head", *DYNAMIC_FLAGS) if getattr(args, f) not in (None, False)]
        if rest or args.ignore is not None:
            raise SchemeError(f"--scheme {args.scheme} is llama.cpp's per-tensor mixture (each tensor's type is "
                              f"llama.cpp's); leave out --bits/... (got {', '.join(rest) or '--ignore'})")
        plan_method = _plan_method(args)
        config = None  # made from the model once it is loaded
    else:
        config = config_from_args(args)
    _check_out(args.output, args.overwrite)
    if args.resume and llmquant.io.read_progress(args.output) is None:  # before the model is loaded
        from ..errors import CheckpointError

        raise CheckpointError(f"there is no interrupted run to resume for {args.output!r}; run without --resume")
    model, tok = llmquant.load_model(args.model, stream=args.stream)
    if config is None:  # a llama.cpp mixture: its per-tensor types for this model, made by --method
        from ..schemes import QuantConfig

        plan = _with_method(llmquant.llama_cpp_plan(model, args.scheme), plan_method)
        config = QuantConfig(method="plan", method_params=plan, calibration=plan_method[2] if plan.calibrated else None)
    summary = llmquant.quantize(model, config, tokenizer=tok, output=args.output, overwrite=args.overwrite,
                                shard_size=args.shard_size, max_memory=args.max_memory, resume=args.resume)
    if not llmquant.flows.distributed.is_writer():  # rank 0 of a distributed run reports
        return 0
    if summary.resumed_after:
        print(f"resumed after decoder layer {summary.resumed_after}: the layers before it come from the checkpoint")
    if config.method == "plan":
        row = _plan_row(llmquant, model, summary)
    else:
        name = summary.layers[0].scheme if config.method == "dynamic" and summary.layers else config.weight.name
        row = _summary_row(summary, name)
    print(format_table([row]))
    if summary.phase_seconds:
        print("seconds by phase: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.phase_seconds.items()))
    print(f"saved to {args.output}")
    return 0
