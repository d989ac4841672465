"""Where a decode token's time goes in the lean runtime: the compiled kernels' calls against the whole token.

    flock /tmp/llmquant-bench.lock python benchmarks/bench_decode_breakdown.py [CONFIG [KERNEL [THREADS]]]

Defaults: gguf:Q4_0, packed_q8act, 1 thread. Every call into the extension (``native.load()``'s functions) is
timed from Python (so the time includes the argument conversion); the rest of a token is the runtime's own
(norms, RoPE, attention, sampling, Python). Best of 3 runs of 64 greedy tokens after a 32-token prompt.
This measures the lean runtime's Python decode step (``LeanModel(compiled=False)``): the compiled step calls
the kernels from C++, where Python cannot time them.
"""

from __future__ import annotations

import collections
import sys
import time

import torch

import llmquant
from llmquant.kernels import native, set_kernel
from llmquant.runtime import GenerationStats, LeanModel

config = sys.argv[1] if len(sys.argv) > 1 else "gguf:Q4_0"
kernel = sys.argv[2] if len(sys.argv) > 2 else "packed_q8act"
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
torch.set_num_threads(threads)
model, tok = llmquant.load_model()
llmquant.quantize(model, config, progress=False)
ext = native.load()
spent: dict = collections.defaultdict(float)
calls: collections.Counter = collections.Counter()


class Timed:
    """The extension module with each function call timed."""

    def __init__(self, mod):
        self.mod = mod

    def __getattr__(self, name):
        f = getattr(self.mod, name)

        def timed(*args):
            t = time.perf_counter()
            out = f(*args)
            spent[name] += time.perf_counter() - t
            calls[name] += 1
            return out

        return timed


native._state["module"] = Timed(ext)
set_kernel(model, kernel)
lean = LeanModel(model, compiled=False)
ids = torch.randint(100, 30000, (1, 32), generator=torch.Generator().manual_seed(0))
llmquant.generate(model, ids, 8, use_eos=False, lean=lean)  # warm-up
best = None
for _ in range(3):
    spent.clear()
    calls.clear()
    st = GenerationStats()
    llmquant.generate(model, ids, 64, use_eos=False, lean=lean, stats=st)
    steps = st.new_tokens - 1
    decode_ms = 1e3 * st.decode_s / steps
    # the decode steps' kernel calls: those with one row of x (the prompt pass's many-row calls excluded)
    row = (decode_ms, {k: 1e3 * v / steps for k, v in spent.items()}, {k: v / steps for k, v in calls.items()})
    if best is None or row[0] < best[0]:
        best = row
decode_ms, per_fn, per_calls = best
print(f"{config} {kernel} {threads} thread(s): {decode_ms:.2f} ms per decode token ({1e3 / decode_ms:.1f} tok/s)")
for name, ms in per_fn.items():
    print(f"  {name}: {ms:.2f} ms per token over {per_calls[name]:.0f} calls (prompt pass included)")
