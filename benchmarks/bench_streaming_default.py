"""Every layer-wise strategy on the default model, loaded whole vs streamed from its safetensors: peak
resident memory of each (one process per row) and whether the quantized layers are identical.

    python benchmarks/bench_streaming_default.py prepare DIR        # the default model as fp32 safetensors shards
    python benchmarks/bench_streaming_default.py run DIR --mode whole|stream --method M --output Q [--out results.json]
    python benchmarks/bench_streaming_default.py compare Q1 Q2      # are the quantized layers' tensors identical?

Calibrated methods use the same 8 x 512 token windows of the default text (saved by ``prepare``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PLAN = {"layers": {"re:.*self_attn.*": "W8", "re:.*mlp.*": "W4G64"}}


def configs(llmquant):
    from llmquant import AWQParams, BlockQATParams, QuantConfig

    return {
        "rtn": QuantConfig(weight="W4G128"),
        "gptq": QuantConfig(weight="W4G128", method="gptq"),
        "awq": QuantConfig(weight="W4G128", method="awq", method_params=AWQParams(grid=10)),
        "static": QuantConfig(method="static"),
        "smoothquant": QuantConfig(method="smoothquant"),
        "dynamic": QuantConfig(method="dynamic"),
        "plan": PLAN,
        "blockqat": QuantConfig(weight="W4G128", method="blockqat", method_params=BlockQATParams(steps=10)),
    }


def prepare(folder: Path) -> None:
    import torch

    import llmquant

    model, tok = llmquant.load_model()
    model.save_pretrained(str(folder), max_shard_size="100MB")
    tok.save_pretrained(str(folder))
    calib = llmquant.data.calibration_windows(tok, None, 8, 512)
    torch.save(calib, folder / "calib.pt")
    print(f"wrote {folder}: calib {tuple(calib.shape)}")


def run(folder: Path, mode: str, method: str, output: Path, out: Path | None) -> dict:
    import torch

    import llmquant
    from llmquant.resources import peak_rss_mb

    torch.set_num_threads(2)
    calib = torch.load(folder / "calib.pt")
    t0 = time.perf_counter()
    model, tok = llmquant.load_model(folder, stream=mode == "stream")
    cfg = configs(llmquant)[method]
    t1 = time.perf_counter()
    s = llmquant.quantize(model, cfg, calib=calib, progress=False, output=output, overwrite=True)
    row = {"mode": mode, "method": method, "load_s": t1 - t0, "quantize_s": time.perf_counter() - t1,
           "peak_quantize_mb": s.peak_memory_mb, "peak_rss_mb": peak_rss_mb(), "output": str(output)}
    print(json.dumps(row), flush=True)
    if out is not None:
        rows = json.loads(out.read_text()) if out.is_file() else []
        out.write_text(json.dumps(rows + [row], indent=1))
    return row


def compare(a: Path, b: Path) -> bool:
    ta = json.loads((a / "llmquant.json").read_text())["tensors"]
    tb = json.loads((b / "llmquant.json").read_text())["tensors"]
    layers = [k for k in ta if ".layers." in k]
    same = ta.keys() == tb.keys() and all(ta[k]["sha256"] == tb[k]["sha256"] for k in layers)
    print(json.dumps({"a": str(a), "b": str(b), "layer_tensors": len(layers), "identical": same}))
    return same


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("prepare")
    w.add_argument("folder", type=Path)
    r = sub.add_parser("run")
    r.add_argument("folder", type=Path)
    r.add_argument("--mode", choices=["whole", "stream"], required=True)
    r.add_argument("--method", required=True)
    r.add_argument("--output", type=Path, required=True)
    r.add_argument("--out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a.folder)
    elif a.cmd == "run":
        run(a.folder, a.mode, a.method, a.output, a.out)
    else:
        return 0 if compare(a.a, a.b) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
