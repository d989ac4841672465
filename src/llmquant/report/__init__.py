"""Reports: tables for the terminal and Markdown; the ``compare`` run and its Markdown/JSON/HTML report."""

from .table import eval_row, format_table

__all__ = ["eval_row", "format_table", "compare"]


def compare(model_path=None, *, profile="quick", strategies=("ptq", "qat", "dynamic", "mixed"), out_dir=None,
            progress=True, candidates=None, threads=None, llama_cpp=None):
    """Run every strategy on the same model and text; write report.md/.json/.html to ``out_dir`` if given.

    ``threads`` sets torch's CPU threads for the whole run (default: torch's own choice). ``llama_cpp``: True
    (or file type names, e.g. ``["Q4_K_M", "Q2_K"]``) adds llama.cpp's own quantizations of the same model as
    rows, made by its quantizer and evaluated and timed inside llama.cpp (the ``llamacpp`` extra). Started as several
    processes (torchrun, ``--workers``), the calibrations and evaluations are split over them, the speed is
    measured by rank 0 alone (the others wait) and rank 0 writes the report.
    Returns the raw result dict (environment, profile, one row per configuration)."""
    from pathlib import Path

    from .candidates import default_candidates
    from .runner import run_compare, write_json
    from .render import html_report, markdown

    strategies = tuple(s.strip().lower() for s in strategies)
    candidates = list(candidates or default_candidates())
    if llama_cpp:  # llama.cpp's own quantizations of the same model, run in llama.cpp
        from ..errors import LLMQuantError
        from ..eval.llama_cpp import FTYPES
        from .candidates import LLAMA_CPP_TYPES, llama_cpp_candidates

        types = LLAMA_CPP_TYPES if llama_cpp is True else tuple(t.upper() for t in llama_cpp)
        bad = [t for t in types if t not in FTYPES]
        if bad:
            raise LLMQuantError(f"llama.cpp file type {bad[0]!r} unknown; choose from {', '.join(FTYPES)}")
        candidates += llama_cpp_candidates(types)
        strategies += ("llama.cpp",)
    result = run_compare(candidates, model_path=model_path, profile=profile, strategies=strategies, progress=progress,
                         threads=threads)
    result["model"] = model_path
    from ..flows import distributed

    if out_dir is not None and distributed.is_writer():  # a distributed run: rank 0 writes the report
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(markdown(result))
        write_json(result, out / "report.json")
        (out / "report.html").write_text(html_report(result))
    return result


from .planning import plan_row, sensitivity_chart  # noqa: E402

__all__ += ["plan_row", "sensitivity_chart"]
