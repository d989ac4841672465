"""The ``llmquant_pydoc_cloze`` task's data: 100 four-way multiple-choice items, each a sentence of CPython's
documentation (``pydoc_data.topics``, characters 35% to 60% of the default text: clear of the evaluation
windows at its start and of the calibration windows at its end) with its last word to choose among that word
and three last words of other sentences.

``load`` gives lm-evaluation-harness the items (its ``custom_dataset`` hook; no download). ``build`` wrote
``pydoc_cloze.jsonl`` once (``python pydoc_cloze.py``); the file, not the text of the Python at hand, is
the task, so the items are the same on every machine.
"""

import json
import random
import re
from pathlib import Path

DATA = Path(__file__).with_name("pydoc_cloze.jsonl")


def read_items() -> list[dict]:
    """The task's items: ``{"context", "choices", "answer"}`` dicts (``answer`` indexes ``choices``)."""
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def load(**kwargs):
    """lm-evaluation-harness's ``custom_dataset``: the items as a ``datasets.DatasetDict`` with one split."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(read_items())})


def build(n: int = 100, seed: int = 0) -> list[dict]:  # pragma: no cover - run once by hand
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    part = text[int(0.35 * len(text)):int(0.60 * len(text))]
    good = []
    for s in re.split(r"(?<=[.!?])\s+", " ".join(part.split())):
        words = s.split()
        last = words[-1].rstrip(".!?") if words else ""
        if 8 <= len(words) <= 30 and s.isascii() and re.fullmatch(r"[a-z]{4,}", last) and words[0][:1].isupper():
            good.append((" ".join(words[:-1]), last))
    rng = random.Random(seed)
    picked = rng.sample(good, n)
    pool = sorted({w for _, w in good})
    items = []
    for context, answer in picked:
        choices = rng.sample([w for w in pool if w != answer], 3) + [answer]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "answer": choices.index(answer)})
    return items


if __name__ == "__main__":  # pragma: no cover
    DATA.write_text("".join(json.dumps(item) + "\n" for item in build()))
