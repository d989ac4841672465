"""``python -m llmquant.eval``: lm-evaluation-harness's command line with the ``llmquant`` model registered
and llmquant's own tasks on its task path (lm-eval's ``lm_eval`` command loads no plug-ins)."""

from .harness import main

raise SystemExit(main())
