"""Accuracy and size measurements: perplexity, KL to the unquantized model, top-1 agreement, packed size, and
lm-evaluation-harness tasks (:mod:`llmquant.eval.harness`, with the optional ``lm-eval`` package)."""

from .metrics import EvalResult, ReferenceLogits, evaluate
from .size import SizeInfo, model_size
from .._hooks import after_import
from ..errors import EvaluationError

__all__ = ["EvalResult", "ReferenceLogits", "evaluate", "SizeInfo", "model_size", "run_tasks"]


def run_tasks(model, tokenizer, tasks, **kw) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness scores of ``model`` on ``tasks``: ``{task: {metric: value}}`` (see
    :func:`llmquant.eval.harness.run_tasks` for the keywords)."""
    try:
        from . import harness
    except ImportError as e:
        if not (e.name or "").startswith(("lm_eval", "datasets")):
            raise
        raise EvaluationError("lm-evaluation-harness is not installed; pip install 'llmquant[lmeval]' "
                              "(or pip install lm-eval) to score tasks") from None
    return harness.run_tasks(model, tokenizer, list(tasks), **kw)


def _register_with_lm_eval() -> None:
    """lm-eval's registry learns the ``llmquant`` model (imported when first asked for)."""
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: it fills an empty registry only)
    from lm_eval.api.registry import model_registry

    if "llmquant" not in model_registry:
        model_registry.register("llmquant", target="llmquant.eval.harness:LLMQuantLM")


after_import("lm_eval.api.registry", _register_with_lm_eval)
