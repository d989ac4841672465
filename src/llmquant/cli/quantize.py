"""`llmquant quantize`: RTN, calibrated (GPTQ/AWQ/static/SmoothQuant), dynamic and plan-driven."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("llmquant")


def _scheme_from_args(args):
    from ..errors import SchemeError
    from ..schemes import QuantScheme, resolve_scheme

    explicit = args.bits is not None or args.group_size is not None or args.asym or args.granularity
    if args.scheme:
        if explicit:
            raise SchemeError("give either --scheme PRESET or --bits/--group-size/--asym/--granularity, not both")
        return resolve_scheme(args.scheme)
    bits = 4 if args.bits is None else args.bits
    if args.group_size is not None:
        gran = args.granularity or "group"
        if gran != "group":
            raise SchemeError(f"--group-size goes with group granularity, not {gran!r}")
        return QuantScheme(bits=bits, symmetric=not args.asym, granularity="group", group_size=args.group_size)
    gran = args.granularity or ("channel" if args.bits == 8 else "group")
    return QuantScheme(
        bits=bits, symmetric=not args.asym, granularity=gran, group_size=128 if gran == "group" else None
    )


def _check_out(out: str, overwrite: bool) -> None:
    from ..errors import OutputExistsError

    p = Path(out).expanduser()
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not overwrite:
        raise OutputExistsError(f"{out!r} exists and is not empty; choose another -o or pass --overwrite")


def _calibrated_kwargs(args) -> dict:
    """method_params / calibration for calibrated methods (gptq, awq) from --act-order, --calib..."""
    from ..schemes import CalibSpec, GPTQParams

    if args.method not in ("gptq", "awq"):
        return {}
    calib = CalibSpec(source=None if args.calib in (None, "default") else args.calib,
                      samples=args.calib_samples, seq_len=args.seq_len)
    params = GPTQParams(act_order=args.act_order) if args.method == "gptq" else None
    return {"method_params": params, "calibration": calib}


def _summary_row(summary, scheme_name: str) -> dict:
    """The one-row table ``quantize`` prints for a QuantSummary."""
    return {
        "layers": len(summary.layers),
        "scheme": scheme_name,
        "bits/w": summary.bits_per_weight,
        "fp32 MB": summary.float_bytes / 1e6,
        "packed MB": summary.packed_bytes / 1e6,
        "weight SQNR dB": summary.mean_sqnr_db,
        "kernel": ",".join(summary.kernels),
        "seconds": summary.seconds,
    }


def cmd_quantize(args) -> int:
    import llmquant
    from ..report import format_table
    from ..schemes import QuantConfig

    if args.method == "dynamic":
        return _quantize_dynamic(args)

    if getattr(args, "plan", None):
        return _quantize_with_plan(args)
    scheme = _scheme_from_args(args)
    cfg = QuantConfig(
        weight=scheme,
        method=args.method,
        targets=tuple(args.targets or ()),
        ignore=tuple(args.ignore) if args.ignore is not None else ("lm_head",),
        **_calibrated_kwargs(args),
    )
    _check_out(args.output, args.overwrite)
    model, tok = llmquant.load_model(args.model)
    if args.method in CALIBRATED_STATIC:
        scheme = _static_weight_scheme(args)
        cfg = _static_config(args, cfg.with_(weight=scheme))
        summary = llmquant.quantize_static(model, cfg, tok, _calib_text(args.calib), samples=args.calib_samples,
                                           seq_len=args.seq_len)
    else:
        summary = llmquant.quantize(model, cfg)
    llmquant.save(model, tok, args.output, overwrite=args.overwrite)
    print(format_table([_summary_row(summary, scheme.name)]))
    print(f"saved to {args.output}")
    return 0


# ---- calibrated static W8A8 (issue 3) -----------------------------------------------------------------
CALIBRATED_STATIC = ("static", "smoothquant")


def _static_weight_scheme(args):
    """int8 per channel unless the user named a weight scheme."""
    explicit = args.scheme or args.bits is not None or args.group_size is not None or args.asym or args.granularity
    return _scheme_from_args(args) if explicit else __import__("llmquant").PRESETS["W8"]


def _static_config(args, cfg):
    from ..schemes import QuantScheme

    act = QuantScheme(bits=8, granularity="tensor", dynamic=False)
    alpha = None
    if args.method == "smoothquant":
        alpha = "search" if args.alpha == "search" else _float_alpha(args.alpha)
    # measured defaults (BENCHMARKS.md): MSE clipping without smoothing, min-max after SmoothQuant
    observer = args.observer or ("minmax" if args.method == "smoothquant" else "mse")
    return cfg.with_(activation=act, observer=observer, smooth_alpha=alpha)


def _float_alpha(v: str) -> float:
    from ..errors import SchemeError

    try:
        return float(v)
    except ValueError:
        raise SchemeError(f"--alpha takes a number in [0, 1] or 'search', got {v!r}") from None


def _calib_text(calib: str | None):
    return None if calib in (None, "default") else Path(calib)


def _quantize_dynamic(args) -> int:
    """``quantize --method dynamic``: int8 activations quantized at run time (see llmquant.quantize_dynamic)."""
    import llmquant
    from ..errors import SchemeError
    from ..report import format_table

    if args.scheme or args.bits is not None or args.group_size is not None or args.granularity or args.asym:
        raise SchemeError(
            "--method dynamic takes --weight-bits 8|4, --act-granularity token|tensor, --act-asym, --weight-sym, "
            "--outlier-threshold and --rotation, not --scheme/--bits/--group-size/--granularity/--asym"
        )
    _check_out(args.output, args.overwrite)
    model, tok = llmquant.load_model(args.model)
    summary = llmquant.quantize_dynamic(
        model,
        targets=args.targets or None,
        act_granularity=args.act_granularity,
        symmetric=not args.act_asym,
        weight_bits=args.weight_bits,
        weight_symmetric=args.weight_sym,
        outlier_threshold=args.outlier_threshold,
        rotation=args.rotation,
        ignore=tuple(args.ignore) if args.ignore is not None else ("lm_head",),
    )
    llmquant.save(model, tok, args.output, overwrite=args.overwrite)
    print(format_table([_summary_row(summary, summary.layers[0].scheme if summary.layers else "-")]))
    print(f"saved to {args.output}")
    return 0


def _quantize_with_plan(args) -> int:
    import llmquant
    from ..errors import SchemeError
    from ..report import format_table
    from ..schemes import Plan

    if args.scheme or args.bits is not None or args.group_size is not None or args.asym or args.granularity or args.targets or args.ignore is not None:
        raise SchemeError("--plan names each layer's format; leave out --scheme/--bits/--group-size/--asym/--granularity/--targets/--ignore")
    plan = Plan.load(args.plan)
    _check_out(args.output, args.overwrite)
    model, tok = llmquant.load_model(args.model)
    summary = llmquant.quantize(model, plan)
    llmquant.save(model, tok, args.output, overwrite=args.overwrite)
    size = llmquant.model_size(model)
    counts: dict[str, int] = {}
    for l in summary.layers:
        counts[l.scheme] = counts.get(l.scheme, 0) + 1
    print(format_table([{
        "layers": len(summary.layers),
        "formats": " ".join(f"{k}:{v}" for k, v in sorted(counts.items())),
        "bits/w (planned layers)": summary.bits_per_weight,
        "model MB": size.total_bytes / 1e6,
        "x fp32": size.ratio_to_fp32,
        "seconds": summary.seconds,
    }]))
    print(f"saved to {args.output}")
    return 0
