"""The lean runtime: text generation for Llama-family decoders without the per-token overhead of the
model's own forward (a layer between kernels/modules and flows; see README "Layering").

    import llmquant
    model, tok = llmquant.load("out/w4g64")
    ids = llmquant.generate(model, "The capital of France is", max_new_tokens=32)
    print(tok.decode(ids[0]))
"""

from .forward import ModelForward
from .generate import GenerationStats, chat_prompt, encode_prompt, generate
from .lean import KVCache, LeanModel
from .sampling import SamplingConfig, next_tokens

__all__ = ["GenerationStats", "KVCache", "LeanModel", "ModelForward", "SamplingConfig", "chat_prompt", "encode_prompt", "generate", "next_tokens"]
