"""``llmquant eval --tasks``: lm-evaluation-harness tasks on the model and its float original, side by side;
and the figures ``llmquant eval`` measured, kept in the folder for its model card."""

from __future__ import annotations

import logging
from pathlib import Path

from . import args as A

log = logging.getLogger(__name__)


def add_task_args(e) -> None:
    e.add_argument("--tasks", nargs="+", metavar="TASK",
                   help="lm-evaluation-harness tasks to score, on the model and its float original (needs "
                        "pip install 'llmquant[lmeval]'); llmquant_pydoc_cloze needs no download")
    e.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of lm-eval tasks in its local format (YAML + data files); repeatable")
    e.add_argument("--limit", type=A.positive_int, help="lm-eval: score only the first N items of each task")
    e.add_argument("--num-fewshot", type=A.count, help="lm-eval: examples shown before each item")


def _flat(scores: dict) -> dict:
    return {f"{task} {metric}": v for task, metrics in scores.items() for metric, v in metrics.items()}


def run(args, model, tok, ref, figures: dict, name: str) -> list[dict]:
    """Score ``--tasks`` on ``model`` (row ``name``) and ``ref`` (row "float original"): table rows; each
    model's scores join its row of ``figures``."""
    from ..eval import run_tasks

    if not args.verbose:  # lm-eval warns about every local task's data hook; llmquant logs what matters
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    kw = dict(include_paths=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot)
    rows = []
    for label, m in (("float original", ref), (name, model)):
        if m is None:
            continue
        scores = _flat(run_tasks(m, tok, args.tasks, **kw))
        figures.setdefault(label, {}).update(scores)
        rows.append({"model": label, **scores})
    return rows


def record(args, figures: dict) -> None:
    """Keep the figures in the evaluated llmquant folder (its model card shows them)."""
    from ..io.folder import MANIFEST
    from ..io.model_card import record_figures

    if not args.folder or not (Path(args.folder) / MANIFEST).is_file():
        return
    try:
        for name, row in figures.items():
            record_figures(args.folder, name, row)
    except OSError as e:
        log.warning("figures not recorded in %s (%s)", args.folder, e)
