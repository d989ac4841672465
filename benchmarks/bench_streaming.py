"""Peak memory and time of quantizing a checkpoint loaded whole vs streamed layer by layer.

    python benchmarks/bench_streaming.py write DIR [--shape 0.8b]     # a random-weight bf16 checkpoint (shards)
    python benchmarks/bench_streaming.py run DIR --mode whole|stream --method rtn|gptq [--out results.json]
        [--output QDIR] [--max-memory 3GB]             # QDIR: the quantized folder, written layer by layer
    python benchmarks/bench_streaming.py generate QDIR [--out results.json]   # memory-mapped load + 32 tokens
    python benchmarks/bench_streaming.py run DIR --mode whole|stream --method reference [--out results.json]
        (the float model's log-probabilities on 4 x 512 random tokens: llmquant.ReferenceLogits)

Random weights make quality figures meaningless (none are reported); memory, time and sizes are real. Each
``run`` is one process, so its peak resident memory (the kernel's high-water mark, MB = 1e6 bytes) is the
run's own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHAPES = {
    # Llama-3-8B: 8.03 B parameters, 16.1 GB in bf16 (32 GB in fp32)
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    # Llama-3.2-3B: 3.2 B parameters (tied embeddings), 6.4 GB in bf16, 12.8 GB in fp32
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # Llama-shaped, about 0.84 B parameters (1.67 GB in bf16): TinyLlama's widths with 16 layers
    "0.8b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
    # about 0.9 B parameters: the same widths, 49152 tokens (the default model's tokenizer, so the checkpoint
    # exports to GGUF and runs in llama.cpp with it; benchmarks/bench_decode_llama_cpp.py --model)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=49152),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4000),
}


def write(folder: Path, shape: str) -> None:
    """A random-weight bf16 checkpoint of ``shape``, written tensor by tensor into 2 GB shards (the model is
    never whole in memory, so an 8B checkpoint can be written on a 24 GB machine)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmquant.io.shards import ShardWriter

    kw = {"tie_word_embeddings": False, **SHAPES[shape]}
    cfg = LlamaConfig(**kw, max_position_embeddings=8192, torch_dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    writer = ShardWriter(folder, 2 * 10**9, metadata={"format": "pt"})  # a plain float checkpoint, no llmquant manifest
    n = 0
    for name, p in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = torch.empty(p.shape, dtype=torch.float32)
        t.normal_(0, 0.02, generator=gen) if p.dim() > 1 else t.fill_(1.0)
        writer.add(name, t.to(torch.bfloat16))
        n += t.numel()
        del t
    writer.close()
    cfg.save_pretrained(str(folder))
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    print(f"wrote {folder}: {n / 1e9:.2f} B parameters, {size / 1e9:.2f} GB")


def _record(out: Path | None, result: dict) -> None:
    print(json.dumps(result), flush=True)
    if out is not None:
        rows = json.loads(out.read_text()) if out.is_file() else []
        out.write_text(json.dumps(rows + [result], indent=1))


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run(folder: Path, mode: str, method: str, out: Path | None, output: Path | None = None,
        max_memory: str | None = None, calib_windows: int = 8) -> dict:
    import torch

    import llmquant
    from llmquant.resources import PeakMemory, peak_rss_mb

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    with PeakMemory() as load_mem:
        model, _ = llmquant.load_model(folder, stream=mode == "stream")
    t_load = time.perf_counter() - t0
    if method == "reference":
        ids = torch.randint(0, model.config.vocab_size, (4, 512), generator=torch.Generator().manual_seed(0))
        t1 = time.perf_counter()
        ref = llmquant.ReferenceLogits(model, ids)
        result = {"mode": mode, "method": method, "windows": 4, "load_s": t_load, "quantize_s": time.perf_counter() - t1,
                  "peak_after_load_mb": load_mem.peak_mb, "peak_rss_mb": peak_rss_mb(),
                  "logp_sum_first_window": float(ref.log_probs(0, ids[0])[:8].sum())}
        _record(out, result)
        return result
    cfg = llmquant.QuantConfig(
        weight="W4G128", method=method,
        calibration=llmquant.CalibSpec(samples=calib_windows, seq_len=512) if method == "gptq" else None)
    calib = None
    if method == "gptq":
        calib = torch.randint(0, model.config.vocab_size, (calib_windows, 512), generator=torch.Generator().manual_seed(0))
    n_params = None if mode == "stream" else sum(p.numel() for p in model.parameters()) / 1e9
    t1 = time.perf_counter()
    summary = llmquant.quantize(model, cfg, calib=calib, progress=False, output=output, overwrite=True,
                                max_memory=max_memory)
    t_q = time.perf_counter() - t1
    result = {
        "mode": mode, "method": method, "checkpoint": str(folder), "checkpoint_gb": _folder_bytes(folder) / 1e9,
        "layers": model.config.num_hidden_layers, "params_b": n_params, "calib_tokens": None if calib is None else list(calib.shape),
        "load_s": t_load, "quantize_s": t_q, "per_layer_s": t_q / model.config.num_hidden_layers,
        "packed_mb": summary.packed_bytes / 1e6, "peak_after_load_mb": load_mem.peak_mb,
        "peak_quantize_mb": summary.peak_memory_mb, "peak_rss_mb": peak_rss_mb(),
        "output": None if output is None else str(output),
        "output_gb": None if output is None else _folder_bytes(output) / 1e9,
        "max_memory": max_memory, "memory_budget": summary.memory_budget,
    }
    _record(out, result)
    return result


def generate(folder: Path, out: Path | None, tokens: int = 32) -> dict:
    """Load a quantized folder (memory-mapped) and generate ``tokens`` greedy tokens with the lean runtime."""
    import torch

    import llmquant
    from llmquant.resources import rss_bytes, peak_rss_mb
    from llmquant.runtime import GenerationStats

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model, _ = llmquant.load(folder)
    t_load = time.perf_counter() - t0
    rss_loaded = rss_bytes()
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    st = GenerationStats()
    ids = llmquant.generate(model, prompt, max_new_tokens=tokens, stats=st, use_eos=False)
    size = _folder_bytes(folder)
    result = {"folder": str(folder), "folder_gb": size / 1e9, "load_s": t_load, "rss_after_load_gb": rss_loaded / 1e9,
              "peak_rss_gb": peak_rss_mb() / 1e3, "peak_over_folder": peak_rss_mb() * 1e6 / size,
              "tokens": int(ids.shape[-1]), "decode_tok_s": st.decode_tok_s, "prefill_s": st.prefill_s}
    _record(out, result)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("folder", type=Path)
    w.add_argument("--shape", default="0.8b", choices=list(SHAPES))
    r = sub.add_parser("run")
    r.add_argument("folder", type=Path)
    r.add_argument("--mode", choices=["whole", "stream"], required=True)
    r.add_argument("--method", choices=["rtn", "gptq", "reference"], default="rtn")
    r.add_argument("--out", type=Path)
    r.add_argument("--output", type=Path, help="write the quantized model here, layer by layer")
    r.add_argument("--max-memory")
    r.add_argument("--calib-windows", type=int, default=8)
    g = sub.add_parser("generate")
    g.add_argument("folder", type=Path)
    g.add_argument("--out", type=Path)
    g.add_argument("--tokens", type=int, default=32)
    a = p.parse_args(argv)
    if a.cmd == "write":
        write(a.folder, a.shape)
    elif a.cmd == "generate":
        generate(a.folder, a.out, a.tokens)
    else:
        run(a.folder, a.mode, a.method, a.out, a.output, a.max_memory, a.calib_windows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
