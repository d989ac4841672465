"""GPTQ on k-quant grids: llama.cpp's unweighted group search ("minmax") against the same search weighted by
the Hessian's diagonal ("imse"), on real layers of the default model. Error measured as the layer's output
error on held-out calibration inputs, tr(dW H_test dW^T) / tr(W H_test W^T) (relative), and on the inputs the
Hessian came from.

    PYTHONPATH=src python benchmarks/check_gptq_kquant_search.py [--layers 3,15,27] [--tokens 16]
"""

from __future__ import annotations

import argparse

import torch

import llmquant
from llmquant.algorithms.gptq import gptq_quantize
from llmquant.data import calibration_windows
from llmquant.schemes import dequantize, resolve_scheme


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", default="3,15,27")
    ap.add_argument("--windows", type=int, default=16, help="calibration windows of 512 (half fit, half test)")
    ap.add_argument("--types", default="Q2_K,Q3_K,Q4_K,Q6_K")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = llmquant.load_model()
    ids = calibration_windows(tok, None, args.windows, 512)
    names = [f"model.layers.{i}.mlp.down_proj" for i in map(int, args.layers.split(","))]
    xs = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1]).double()))
             for n in names]
    with torch.no_grad():
        for w in ids:
            model(w[None])
    for h in hooks:
        h.remove()
    half = args.windows // 2
    print("| layer | type | search | rel. output error (fit) | rel. output error (held out) |")
    print("|---|---|---|---|---|")
    for n in names:
        fit = torch.cat(xs[n][:half])
        test = torch.cat(xs[n][half:])
        h_fit = (2 * fit.T @ fit / fit.shape[0]).float()
        h_test = (test.T @ test / test.shape[0])
        h_f = (fit.T @ fit / fit.shape[0])
        w = model.get_submodule(n).weight.detach().float()
        for t in args.types.split(","):
            scheme = resolve_scheme(f"gguf:{t}")
            for search in ("minmax", "imse"):
                q, s, z = gptq_quantize(w, h_fit, scheme, damp=0.01, act_order="full", static_groups=True,
                                        observer=search)
                dw = (dequantize(q, s, z, scheme) - w).double()
                wd = w.double()
                rel = lambda H: float((dw @ H * dw).sum() / (wd @ H * wd).sum())
                print(f"| {n.split('.')[2]} | {t} | {search} | {rel(h_f):.5f} | {rel(h_test):.5f} |", flush=True)


if __name__ == "__main__":
    main()
