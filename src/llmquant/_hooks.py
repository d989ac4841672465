"""Run a function right after a module is first imported (at once if it already is), without importing it:
``import llmquant`` makes transformers and lm-evaluation-harness know llmquant while importing neither."""

from __future__ import annotations

import importlib.abc
import logging
import importlib.machinery
import sys
from typing import Callable

_pending: dict[str, list[Callable[[], None]]] = {}


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _pending:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_then_run(module):
            exec_module(module)
            sys.modules[name] = module  # the callbacks import it by name
            for fn in _pending.pop(name, []):
                try:
                    fn()
                except Exception as e:  # a registration that fails must not break the user's import
                    logging.getLogger("llmquant").warning("llmquant could not register with %s: %s", name, e)

        spec.loader.exec_module = exec_then_run
        return spec


def after_import(module: str, fn: Callable[[], None]) -> None:
    """Call ``fn()`` once ``module`` is imported: now if it is, else right after its import."""
    if module in sys.modules:
        fn()
        return
    _pending.setdefault(module, []).append(fn)
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
