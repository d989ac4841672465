"""``llmquant compare``: the same model through each strategy, measured side by side in one run.

Every figure comes from this run: the fp32 baseline is evaluated and timed first, then each candidate is
built (quantized, calibrated or trained) while its wall time, CPU seconds and peak memory are recorded,
then evaluated (perplexity, KL vs fp32, top-1) and timed (prefill/decode). A candidate that raises is
recorded as failed with its error and the run goes on.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import shutil
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..bench import measure_speed
from ..data import token_windows
from ..errors import LLMQuantError
from ..eval import ReferenceLogits, evaluate
from ..io import load_model
from ..resources import PeakMemory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Profile:
    """How much work a comparison does. ``quick`` fits in about 15 minutes on 2 cores."""

    name: str
    eval_windows: int  # 512-token evaluation windows (from the start of the text)
    calib_samples: int  # 512-token calibration windows (from the end of the text)
    qat_steps: int  # QAT optimizer steps
    sensitivity_samples: int  # windows for per-layer sensitivity
    prefill_len: int
    new_tokens: int
    speed_repeats: int
    seq_len: int = 512  # tokens per evaluation / calibration window


PROFILES = {
    "quick": Profile("quick", eval_windows=4, calib_samples=16, qat_steps=40, sensitivity_samples=2,
                     prefill_len=256, new_tokens=32, speed_repeats=1),
    "full": Profile("full", eval_windows=40, calib_samples=64, qat_steps=300, sensitivity_samples=8,
                    prefill_len=512, new_tokens=128, speed_repeats=3),
}


@dataclass
class Context:
    """What every candidate builder gets."""

    model_path: str | None
    profile: Profile
    reference: Any
    tokenizer: Any
    load: Callable[[], Any]  # a fresh float copy of the model
    shared: dict = field(default_factory=dict)  # results one candidate leaves for others / the report
    on_step: Callable[[str], None] = lambda step: None  # progress: the step a builder is in
    reference_logits: Any = None  # the fp32 model's log-probabilities on the evaluation windows, computed once
    scratch: dict = field(default_factory=dict)  # files builders share during the run (not reported)

    def step(self, name: str) -> None:
        """Builders call this as they go (``ctx.step("calibrate")``); the progress bar shows it."""
        log.info("compare step: %s", name)
        self.on_step(name)


@dataclass(frozen=True)
class Candidate:
    strategy: str  # "fp32", "PTQ", "QAT", "Dynamic", "Mixed"
    label: str
    build: Callable[[Context], tuple[Any, dict]]  # -> (model, info: steps, data, notes)
    profiles: tuple[str, ...] = ("quick", "full")
    # Estimated build seconds under a profile (2 threads, default model): weights the progress bar so its
    # time-left estimate does not treat a GPTQ or QAT build like an RTN one. Only the estimate uses it.
    cost: "float | Callable[[Profile], float]" = 1.0

    def build_cost(self, p: Profile) -> float:
        return float(self.cost(p) if callable(self.cost) else self.cost)


def measure_cost(p: Profile) -> float:
    """Estimated seconds to evaluate and time one configuration (default model, 2 threads)."""
    return 2.0 * p.eval_windows * p.seq_len / 512 + p.speed_repeats * (p.prefill_len / 256 + p.new_tokens / 16)


def environment() -> dict:
    from importlib.metadata import version

    from ..version import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
            text=True, timeout=5,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "llmquant": __version__,
        "commit": commit,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def _measure(ctx: Context, cand: Candidate, model, info: dict, wall: float, cpu: float, mem: PeakMemory) -> dict:
    import contextlib

    p = ctx.profile
    # A candidate that is a way of *running* the float model (autocast) hands over the context to run it in.
    run_ctx = info.get("run_context") or contextlib.nullcontext
    ctx.step("evaluate")
    t0 = time.perf_counter()
    gguf_file = info.get("llama_cpp")  # a GGUF file llama.cpp runs: evaluated and timed inside llama.cpp
    with run_ctx():
        if gguf_file is not None:
            from ..eval.llama_cpp import evaluate_llama_cpp

            res = evaluate_llama_cpp(gguf_file, ctx.reference_logits.ids, ctx.reference_logits,
                                     threads=torch.get_num_threads())
        else:
            res = evaluate(model, reference=ctx.reference_logits or ctx.reference, tokenizer=ctx.tokenizer,
                           windows=p.eval_windows, seq_len=p.seq_len, progress=False)
    t_eval = time.perf_counter() - t0
    ctx.step("speed")
    t0 = time.perf_counter()
    with run_ctx():
        sp = _speed(model, p, gguf_file)
    t_speed = time.perf_counter() - t0
    return {
        "strategy": cand.strategy,
        "label": cand.label,
        "status": "ok",
        "perplexity": res.perplexity,
        "kl": res.kl,
        "top1": res.top1,
        "size_bytes": info["size_bytes"] if "size_bytes" in info else res.size["total_bytes"],
        "bits_per_weight": info["bits_per_weight"] if "bits_per_weight" in info else res.size["bits_per_weight_model"],
        "prefill_tok_s": sp.prefill_tokens_per_s,
        "decode_tok_s": sp.decode_tokens_per_s,
        "build_wall_s": wall,
        "build_cpu_s": cpu,
        "build_peak_rss_mb": mem.peak_mb,
        "build_rss_increase_mb": mem.delta_mb,
        "steps": info.get("steps", []),
        "data": info.get("data", "none"),
        "notes": info.get("notes", ""),
        "kernel": info.get("kernel", ""),
        "eval_wall_s": t_eval,
        "speed_wall_s": t_speed,
    }


def _speed(model, p: Profile, gguf_file=None):
    """measure_speed's result (llama.cpp's own speed for a GGUF file); in a distributed run measured by rank
    0 alone (the machine otherwise runs every rank's measurement at once) and sent to the others."""
    from ..flows import distributed

    group = distributed.active()
    sp = None
    if (group is None or group.rank == 0) and gguf_file is not None:
        from ..eval.llama_cpp import LlamaCpp

        with LlamaCpp(gguf_file, threads=torch.get_num_threads()) as m:
            sp = m.speed(prefill_len=p.prefill_len, new_tokens=p.new_tokens, repeats=p.speed_repeats)
    elif group is None or group.rank == 0:
        sp = measure_speed(model, prefill_len=p.prefill_len, new_tokens=p.new_tokens, repeats=p.speed_repeats)
    return sp if group is None else group.broadcast(sp, 0, "the speed measurement")


def run_compare(
    candidates: list[Candidate],
    *,
    model_path: str | None = None,
    profile: "str | Profile" = "quick",
    strategies: tuple[str, ...] = ("ptq", "qat", "dynamic", "mixed"),
    progress: bool = True,
    threads: int | None = None,
) -> dict:
    """Run every candidate of the chosen strategies; returns {"env", "profile", "rows", "shared"}.

    ``threads`` sets ``torch.set_num_threads`` for the whole run (all timings, the fp32 baseline included)."""

    from ..flows import distributed

    if not isinstance(profile, Profile) and profile not in PROFILES:
        raise LLMQuantError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    known = {c.strategy.lower() for c in candidates} - {"fp32"}
    bad = [s for s in strategies if s.lower() not in known]
    if bad:
        raise LLMQuantError(f"unknown strategies {bad}; choose from {', '.join(sorted(known))}")
    prof = profile if isinstance(profile, Profile) else PROFILES[profile]
    if threads is not None and threads < 1:
        raise LLMQuantError(f"threads must be >= 1, got {threads}")
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        ref, tok = load_model(model_path)
        ctx = Context(model_path, prof, ref, tok, load=lambda: load_model(model_path)[0])
        # One fp32 forward per evaluation window for the whole run, instead of one per configuration.
        ids = token_windows(tok, None, prof.eval_windows, prof.seq_len)
        progress = progress and distributed.is_writer()
        ctx.reference_logits = ReferenceLogits(ref, ids, progress=progress)
        chosen = [c for c in candidates
                  if (prof.name in c.profiles or prof.name not in PROFILES)
                  and (c.strategy == "fp32" or c.strategy.lower() in strategies)]
        try:
            rows = _run_all(chosen, ctx, progress)
        finally:
            for path in ctx.scratch.values():  # e.g. the GGUF files made for llama.cpp's rows
                shutil.rmtree(path, ignore_errors=True)
        ctx.reference_logits.close()
        _remeasure_baseline(rows, ctx)
        return {"env": environment(), "profile": prof.__dict__, "rows": rows, "shared": ctx.shared}
    finally:
        torch.set_num_threads(old_threads)


def _run_all(chosen: list[Candidate], ctx: Context, progress: bool) -> list[dict]:
    rows: list[dict] = []
    # The bar advances by estimated seconds, not configurations, so "time left" weighs the slow builds.
    p, m_cost = ctx.profile, measure_cost(ctx.profile)
    bar = tqdm(total=sum(c.build_cost(p) + m_cost for c in chosen), desc="compare", disable=not progress,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining} left]{postfix}")
    for i, cand in enumerate(chosen, 1):
        where = f"{i}/{len(chosen)} {cand.strategy}: {cand.label}"
        ctx.on_step = lambda step, where=where: bar.set_postfix_str(f"{where} - {step}")
        ctx.step("build")
        log.info("compare: %s / %s", cand.strategy, cand.label)
        gc.collect()
        model, done = None, 0.0
        try:
            with PeakMemory() as mem:
                t0, c0 = time.perf_counter(), time.process_time()
                model, info = cand.build(ctx)
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            bar.update(cand.build_cost(p))
            done = cand.build_cost(p)
            rows.append(_measure(ctx, cand, model, info, wall, cpu, mem))
        except Exception as e:  # noqa: BLE001 - a failing strategy is reported, the run goes on
            log.warning("%s failed: %s", cand.label, e)
            rows.append({
                "strategy": cand.strategy, "label": cand.label, "status": "failed",
                "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=3),
            })
        finally:
            model = None
            gc.collect()
            bar.update(cand.build_cost(p) + m_cost - done)
    bar.close()
    ctx.on_step = lambda step: None
    return rows


def _remeasure_baseline(rows: list[dict], ctx: Context) -> None:
    """Time fp32 again at the end of the run; speed-ups use the faster of the two fp32 measurements.

    A machine that got slower (or faster) during the run shows up as the gap between the two, and taking
    the faster baseline keeps a drift from inflating the speed-ups."""
    base = next((r for r in rows if r["strategy"] == "fp32" and r["status"] == "ok"), None)
    if base is None:
        return
    sp = _speed(ctx.reference, ctx.profile)
    for key, again in (("prefill_tok_s", sp.prefill_tokens_per_s), ("decode_tok_s", sp.decode_tokens_per_s)):
        base[key + "_runs"] = [base[key], again]
        base[key] = max(base[key], again)


def write_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=1, default=str))
