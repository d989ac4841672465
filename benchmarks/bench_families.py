"""Per decoder family: which strategies work, and each method's KL next to RTN's, on tiny models of every
family briefly trained on the default text (random weights make KL comparisons meaningless).

    python benchmarks/bench_families.py --steps 300 --out benchmarks/results/families.json

Each family's tiny model (tests/families.py: hidden 64, 2 layers, vocab 256) is trained from its random
init for ``--steps`` AdamW steps (lr 3e-3, batches of 16 x 128) on the default text as UTF-8 bytes (256
symbols, so no tokenizer is needed), then quantized from the same trained weights by each strategy:
RTN / GPTQ / AWQ at W4G32 and W3G32, SmoothQuant + static W8A8, dynamic int8. KL(float || quantized) per
position on 8 x 128-byte windows from the start of the text; calibration on 32 x 128 bytes from its end.
A strategy that refuses the family is reported with the refusal's first words.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]


def _bytes():
    import torch

    from llmquant.data import default_text

    return torch.tensor(list(default_text().encode("utf-8")), dtype=torch.long)


def _train(model, data, steps: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    train = data[: int(len(data) * 0.8)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(train) - 129, (16,), generator=g)
        batch = torch.stack([train[s:s + 129] for s in starts.tolist()])
        out = model(batch[:, :-1], use_cache=False)
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--families", nargs="*")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "families.json"))
    ap.add_argument("--head", default="fp32", help="the embedding / head format (QuantConfig.head; fp32: the "
                    "methods compared on the linears alone, as the first runs of this table)")
    a = ap.parse_args()
    import torch
    import torch.nn.functional as F

    import llmquant
    from llmquant import QuantConfig
    from llmquant.errors import LLMQuantError
    from families import FAMILIES, make_family

    data = _bytes()
    evalw = data[: 8 * 128].reshape(8, 128)
    calib = data[-32 * 128:].reshape(32, 128)
    a8 = llmquant.QuantScheme(bits=8, symmetric=True, granularity="tensor", dynamic=False)
    strategies = {
        "rtn W4G32": lambda m: llmquant.quantize(m, QuantConfig(weight="W4G32", head=a.head), progress=False),
        "gptq W4G32": lambda m: llmquant.quantize(m, QuantConfig(weight="W4G32", method="gptq", head=a.head), calib=calib,
                                                  progress=False),
        "awq W4G32": lambda m: llmquant.quantize(m, QuantConfig(weight="W4G32", method="awq", head=a.head), calib=calib,
                                                 progress=False),
        "rtn W3G32": lambda m: llmquant.quantize(m, QuantConfig(weight="W3G32", head=a.head), progress=False),
        "gptq W3G32": lambda m: llmquant.quantize(m, QuantConfig(weight="W3G32", method="gptq", head=a.head), calib=calib,
                                                  progress=False),
        "awq W3G32": lambda m: llmquant.quantize(m, QuantConfig(weight="W3G32", method="awq", head=a.head), calib=calib,
                                                 progress=False),
        "smoothquant W8A8": lambda m: llmquant.quantize(m, QuantConfig(weight="W8", activation=a8, method="smoothquant",
                                                                       smooth_alpha=0.5), calib=calib, progress=False),
        "dynamic W8A8": lambda m: llmquant.quantize_dynamic(m, progress=False),
    }
    rows = []
    for fam in a.families or list(FAMILIES):
        t = time.perf_counter()
        torch.manual_seed(0)
        base = make_family(fam)
        loss = _train(base, data, a.steps)
        with torch.no_grad():
            ref = base(evalw, use_cache=False).logits.float().log_softmax(-1)
        row = {"family": fam, "train_loss": round(loss, 3), "train_s": round(time.perf_counter() - t, 1)}
        for name, run in strategies.items():
            m = copy.deepcopy(base)
            try:
                run(m)
                with torch.no_grad():
                    out = m(evalw, use_cache=False).logits.float().log_softmax(-1)
                row[name] = float(F.kl_div(out, ref, log_target=True, reduction="sum")) / (ref.numel() / ref.shape[-1])
            except LLMQuantError as e:
                row[name] = "refused: " + " ".join(str(e).split()[:8])
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"steps": a.steps, "head": a.head, "rows": rows, "torch": torch.__version__}, indent=1))
    names = list(strategies)
    print("| family | train loss | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for r in rows:
        cells = [f"{r[n]:.4f}" if isinstance(r[n], float) else "refused" for n in names]
        print(f"| {r['family']} | {r['train_loss']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
