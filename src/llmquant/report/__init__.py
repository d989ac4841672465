"""Reports: tables for the terminal and Markdown; the ``compare`` run and its Markdown/JSON/HTML report."""

from .table import eval_row, format_table

__all__ = ["eval_row", "format_table", "compare"]


def compare(model_path=None, *, profile="quick", strategies=("ptq", "qat", "dynamic", "mixed"), out_dir=None,
            progress=True, candidates=None, threads=None):
    """Run every strategy on the same model and text; write report.md/.json/.html to ``out_dir`` if given.

    ``threads`` sets torch's CPU threads for the whole run (default: torch's own choice). Started as several
    processes (torchrun, ``--workers``), the calibrations and evaluations are split over them, the speed is
    measured by rank 0 alone (the others wait) and rank 0 writes the report.
    Returns the raw result dict (environment, profile, one row per configuration)."""
    from pathlib import Path

    from .candidates import default_candidates
    from .runner import run_compare, write_json
    from .render import html_report, markdown

    result = run_compare(candidates or default_candidates(), model_path=model_path, profile=profile,
                         strategies=tuple(s.strip().lower() for s in strategies), progress=progress,
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
