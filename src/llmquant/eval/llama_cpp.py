"""llama.cpp in the loop: the logits llama.cpp itself computes from a GGUF file, through the prebuilt wheel
``cyllama`` (it bundles llama.cpp; ``pip install --no-deps cyllama``), and llama.cpp's activation rounding
as llmquant activation schemes, so llmquant's own evaluation of a model can compute what llama.cpp computes.

llama.cpp's CPU matmuls round each activation row to 8 bits in the block format its weight type pairs
with (``vec_dot_type`` in ggml-cpu): Q8_0 (blocks of 32, fp16 scale) for Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0
weights, Q8_K (blocks of 256, float32 scale max|x| / 127) for the k-quants. :func:`emulate_llama_cpp` gives
every packed linear the matching scheme (``gguf:Q8_0-act`` / ``gguf:Q8_K-act``).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch.nn as nn

from ..errors import UsageError


def _cyllama():
    try:
        import cyllama.llama.llama_cpp as cpp
    except ImportError:
        raise UsageError("running llama.cpp needs the prebuilt wheel cyllama: pip install --no-deps cyllama==0.2.18 "
                         "(Linux x86-64, Python 3.11)") from None
    return cpp


def llama_cpp_logits(path: str | os.PathLike, ids: Sequence[int], *, threads: int = 1) -> np.ndarray:
    """Next-token logits (len(ids), vocab) float32 that llama.cpp computes for the token ids ``ids`` (one
    sequence, one batch) from the GGUF file ``path``."""
    cpp = _cyllama()
    cpp.disable_logging()

    class _Model(cpp.LlamaModel):  # cyllama 0.2.18's get_logits* read model.n_vocab, which it lacks
        @property
        def n_vocab(self):
            return self.get_vocab().n_vocab

    mp = cpp.LlamaModelParams()
    mp.use_mmap = False
    model = _Model(str(path), mp)
    n = len(ids)
    cp = cpp.LlamaContextParams()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = max(n, 8)
    cp.n_threads = cp.n_threads_batch = threads
    ctx = cpp.LlamaContext(model, cp)
    batch = cpp.LlamaBatch(n_tokens=n, embd=0, n_seq_max=1)
    for i, t in enumerate(ids):
        batch.add(int(t), i, [0], True)
    ctx.decode(batch)
    out = np.stack([np.asarray(ctx.get_logits_ith(i), dtype=np.float32) for i in range(n)])
    ctx.close()
    model.close()
    return out


def emulate_llama_cpp(model: nn.Module) -> nn.Module:
    """Give each packed linear of ``model`` (weight-only, on a GGUF grid) the activation rounding llama.cpp's
    CPU matmul applies for its block type, in place; returns the model."""
    from ..io.ggml_blocks import exact_blocks
    from ..modules import QuantLinear
    from ..schemes import PRESETS

    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            found = exact_blocks(mod)
            if found is None:
                continue
            mod.activation_scheme = PRESETS["gguf:Q8_K-act" if found[0].kquant else "gguf:Q8_0-act"]
            mod.reset_kernel()
    return model
