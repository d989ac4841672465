"""lm-evaluation-harness scores llmquant models: the ``llmquant`` model of its registry, and task runs for
``llmquant eval --tasks``.

``LLMQuantLM(path=...)`` loads what :func:`llmquant.load_model` loads (a folder llmquant saved, a Hugging
Face folder, a ``.gguf`` file, or the default model for ``path=default``) and answers lm-eval's three
requests with one forward per request, in the model's own dtypes and kernels:

* ``loglikelihood``: the sum of log p(continuation token | everything before it) and whether each of them
  was the most likely token (greedy);
* ``loglikelihood_rolling``: the same over a whole text, in windows of the model's context;
* ``generate_until``: greedy decoding (the model's ``generate``), cut at the first stop string.

Needs the optional ``lm-eval`` package (``pip install 'llmquant[lmeval]'``). After ``import llmquant``
lm-eval's registry knows ``llmquant`` (``lm_eval.simple_evaluate(model="llmquant", ...)``); from the
shell, ``python -m llmquant.eval`` takes lm-eval's own command line with that model known.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from ..errors import EvaluationError

log = logging.getLogger(__name__)

#: the folder of the tasks llmquant ships in lm-eval's local format (YAML + data), always on the task path
TASKS_DIR = Path(__file__).with_name("tasks")


@register_model("llmquant")
class LLMQuantLM(TemplateLM):
    """lm-eval's view of a model llmquant loads. ``path``: a folder or file (``default``: the default model);
    ``max_length``: the most tokens one forward sees (default: the model's context)."""

    def __init__(self, path: str | None = None, model=None, tokenizer=None, max_length: int | None = None,
                 batch_size=1, device: str | None = None, **kwargs) -> None:
        super().__init__()
        if model is None:
            from ..io import load_model

            model, tokenizer = load_model(None if path in (None, "", "default") else path)
        if tokenizer is None:
            raise EvaluationError(f"{path or 'the model'} has no tokenizer; lm-eval needs one to read its tasks")
        if kwargs:
            log.info("llmquant's lm-eval model ignores %s", sorted(kwargs))
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = getattr(model, "config", None)
        self._max_length = int(max_length or getattr(cfg, "max_position_embeddings", None) or 2048)
        self._device = next(model.parameters()).device

    # ---- what TemplateLM asks ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "llmquant")).replace("/", "__")

    # ---- scoring ----------------------------------------------------------------------------------
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether every continuation token was the argmax."""
        whole = (context + continuation)[-(self.max_length + 1):]
        ids = torch.tensor([whole[:-1]], device=self._device)
        with torch.inference_mode():
            out = self.model(ids)
        logits = (out.logits if hasattr(out, "logits") else out)[0, -len(continuation):].float()
        logp = F.log_softmax(logits, dim=-1)
        target = torch.tensor(continuation, device=logp.device)
        total = logp.gather(1, target[:, None]).sum().item()
        greedy = bool((logp.argmax(-1) == target).all())
        return total, greedy

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for key, context, continuation in tqdm(requests, desc="llmquant loglikelihood", disable=disable_tqdm):
            if not continuation:
                raise EvaluationError(f"an lm-eval request has an empty continuation (context {key[0][-40:]!r})")
            result = self._score(context, continuation)
            self.cache_hook.add_partial("loglikelihood", key, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="llmquant rolling", disable=disable_tqdm):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            total = sum(self._score(list(ctx), list(cont))[0] for ctx, cont in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="llmquant generate", disable=disable_tqdm):
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            ids_t = torch.tensor([ids], device=self._device)
            with torch.inference_mode():
                gen = self.model.generate(ids_t, attention_mask=torch.ones_like(ids_t), max_new_tokens=max_new,
                                          do_sample=False, pad_token_id=self.eot_token_id)
            text = self.tok_decode(gen[0, len(ids):].tolist())
            cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
            text = text[:cut]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def task_manager(include_paths=()):
    """lm-eval's TaskManager with llmquant's own tasks (and ``include_paths``) on its path (one per set of
    paths: indexing lm-eval's few hundred task folders takes seconds)."""
    return _task_manager(tuple(str(Path(p).expanduser().resolve()) for p in include_paths))


@functools.lru_cache(maxsize=4)
def _task_manager(include_paths: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    for p in include_paths:
        if not Path(p).is_dir():
            raise EvaluationError(f"--include-path {p!r} is not a folder; give a folder of lm-eval task YAML files")
    return TaskManager(include_path=[str(TASKS_DIR), *include_paths])


def run_tasks(model, tokenizer, tasks: list[str], *, include_paths=(), limit: int | None = None,
              num_fewshot: int | None = None) -> dict[str, dict[str, float]]:
    """Score ``model`` on lm-eval ``tasks``: ``{task: {metric: value}}``. Tasks lm-eval cannot find, or whose
    data cannot be read offline, raise :class:`EvaluationError` saying what to do."""
    import lm_eval

    tm = task_manager(include_paths)
    missing = [t for t in tasks if not tm.match_tasks([t])]
    if missing:
        raise EvaluationError(
            f"lm-eval task(s) {', '.join(missing)} not found; llmquant ships llmquant_pydoc_cloze, and other tasks "
            "are lm-eval's names or local YAML tasks in a folder given with --include-path")
    try:
        tm.load(list(tasks))  # reads the data: offline, a hub data set not in the cache fails here
    except Exception as e:  # datasets' offline and connection errors have no common base class
        raise EvaluationError(
            f"the data of lm-eval task(s) {', '.join(tasks)} could not be loaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); nothing is downloaded here: copy the data set into the "
            "Hugging Face datasets cache (HF_DATASETS_CACHE) from a machine with network, or write the task in "
            "lm-eval's local format (YAML + json files) and pass its folder with --include-path") from None
    lm = LLMQuantLM(model=model, tokenizer=tokenizer)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                  task_manager=tm, log_samples=False, bootstrap_iters=0)
    out = {}
    for task, metrics in res["results"].items():
        out[task] = {k.split(",")[0]: float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and "_stderr" not in k and k != "sample_len"}
    return out


def main(argv=None) -> int:
    """lm-eval's own command line, with the ``llmquant`` model registered and llmquant's tasks on the path:
    ``python -m llmquant.eval --model llmquant --model_args path=out/w4g64 --tasks ...``."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv:
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0

