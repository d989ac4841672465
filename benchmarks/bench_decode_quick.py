"""Quick decode check: tokens/s of the lean runtime on fp32, W8 and W4G32 (every linear, lm_head included),
batch 1, greedy, 32 random prompt tokens, 32 new, best of 3; fp32 measured in the same run.

    flock /work/wt/bench.lock python benchmarks/bench_decode_quick.py THREADS
"""
import copy
import sys

import torch

import llmquant
from llmquant.runtime import GenerationStats, LeanModel
from llmquant.schemes import QuantConfig

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
m, tok = llmquant.load_model()
ids = torch.randint(100, 1000, (1, 32))


def bench(model, name):
    lean = LeanModel(model)
    best, st = 0.0, None
    for _ in range(3):
        st = GenerationStats()
        llmquant.generate(model, ids, 32, use_eos=False, lean=lean, stats=st)
        best = max(best, st.decode_tok_s)
    print(name, round(best, 1), st.kernels, f"threads={st.threads}", flush=True)


bench(m, "fp32")
for s in ["W8", "W4G32"]:
    q = copy.deepcopy(m)
    llmquant.quantize(q, QuantConfig(weight=s, ignore=()), progress=False)
    bench(q, s)
