"""Where packed_q8act's greedy tokens part from the reference path with the same int8 activation rounding,
with the fp32 prefill and with the int8 prefill (no timing).

    python benchmarks/check_q8act_prompt.py [--scheme gguf:Q8_0]

The default model quantized to ``--scheme``, every linear packed_q8act runs given the ``gguf:Q8_0-act``
activation scheme (so the reference kernel, ``dequant_cached``, rounds activations as packed_q8act does, prompt
and decode); a 32-token prompt of the default text, 64 greedy tokens, the Python decode step. Prints the first
token that differs, the largest difference of the prompt's last logits over the largest logit, and the
reference's gap between its two best next tokens at the prompt.
"""

from __future__ import annotations

import argparse
import os

import torch

import llmquant
from llmquant.data import default_text
from llmquant.kernels import set_kernel
from llmquant.runtime.lean import LeanModel
from llmquant.schemes import PRESETS

from bench_decode_llama_cpp import q8act_modules


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", default="gguf:Q8_0")
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    m, tok = llmquant.load_model()
    ids = tok(default_text()[:4000], return_tensors="pt").input_ids[:, :32]
    llmquant.quantize(m, args.scheme, progress=False)
    for mod in q8act_modules(m):
        mod.activation_scheme = PRESETS["gguf:Q8_0-act"]

    def greedy(kernel):
        set_kernel(m, kernel)
        lean = LeanModel(m, compiled=False)
        cache = lean.new_cache(1, ids.shape[1] + args.new)
        first = lean(ids, cache)[0].reshape(-1)
        out = [int(first.argmax())]
        for _ in range(args.new - 1):
            out.append(int(lean(torch.tensor([[out[-1]]]), cache)[0].argmax()))
        return out, first

    ref, lref = greedy("dequant_cached")
    top2 = lref.topk(2).values
    for mode in ("fp32", "int8"):
        os.environ["LLMQUANT_Q8ACT_PREFILL"] = mode
        got, lgot = greedy("packed_q8act")
        same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), args.new)
        print(f"{args.scheme}, {mode} prefill: first differing token {same} of {args.new}; prompt logits differ by "
              f"{float((lgot - lref).abs().max() / lref.abs().max()):.4f} of the largest; reference top-2 gap at the "
              f"prompt {float(top2[0] - top2[1]):.3f}")


if __name__ == "__main__":
    main()
