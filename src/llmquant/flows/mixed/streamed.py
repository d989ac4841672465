"""The Fisher sensitivity of a model streamed from its checkpoint (``load_model(..., stream=True)``), one
decoder layer in memory at a time.

The same estimate as :func:`~llmquant.flows.mixed.sensitivity._fisher_scan` (see that module's docstring):
per calibration window, labels drawn from the model's own distribution, and the gradient of their
log-likelihood with respect to every planned weight. The backward pass is cut at the decoder layers:

1. forward, layer by layer: each layer's input on every window is kept (calibration windows are few and
   short: 4 x 128 tokens of an 8B model's hidden states are 8 MB per layer), the layer goes back to the
   checkpoint;
2. the model's own head (final norm, output projection, any logit scaling) turns the last hidden states
   into log-probabilities; the labels are drawn in the same order, from the same generator, as the
   whole-model scan; the gradient of each draw's log-likelihood with respect to the last hidden states
   starts the backward pass;
3. backward, layer by layer from the last: the layer is read again, run on its kept inputs with autograd,
   and each draw's upstream gradient gives its planned weights' gradients (summed into the damages as the
   whole-model scan does, in the same groups) and the gradient to pass to the layer before.

Each layer is read twice; memory is one layer, its autograd graph for one window, and the kept hidden
states. The damages equal the whole-model scan's up to float rounding (tested).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...errors import SchemeError
from ...models import arch_for
from ..passes import _Replay, _run, _unload, decoder_layers, record_layer_inputs


def _layer_weights(layer: nn.Module, prefix: str, units) -> list[tuple[int, nn.Parameter]]:
    """(index in ``units``, weight) of the planned units inside ``layer``."""
    mods = dict(layer.named_modules())
    out = []
    for k, u in enumerate(units):
        name = u.modules[0]
        if name.startswith(prefix + "."):
            out.append((k, mods[name[len(prefix) + 1:]].weight))
    return out


def _head_grads(model, layers, last_inputs, batches, samples, seed):
    """Per window: (number of predicted positions, the upstream gradient of each label draw) at the
    input of the last layer's output, i.e. d sum log p(y) / d h_L, computed through the model's own head.
    Window j's labels are drawn as the whole model's Fisher scan draws them (a generator seeded by j)."""
    originals = list(layers)
    out = []
    for j, b in enumerate(batches):
        h = last_inputs[j].detach().requires_grad_(True)
        replays = [_Replay(layer, [h] if i == len(originals) - 1 else None) for i, layer in enumerate(originals)]
        for i, r in enumerate(replays):
            layers[i] = r
        try:
            with torch.enable_grad():
                res = model(b, use_cache=False)
                logits = (res.logits if hasattr(res, "logits") else res)[:, :-1].float()
                logp = F.log_softmax(logits[0], -1)
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
        probs = logp.detach().exp()
        gen = torch.Generator().manual_seed(seed * 1000003 + j)
        ups = []
        for s in range(samples):
            y = torch.multinomial(probs, 1, generator=gen)
            (g,) = torch.autograd.grad(logp.gather(1, y).sum(), h, retain_graph=s < samples - 1)
            ups.append(g)
        out.append((logp.shape[0], ups))
    return out


def fisher_scan_streamed(model, units, fmts, ids, samples, progress, seed=0, flush_every=4):
    from .sensitivity import _Deltas, _flush

    source = getattr(model, "llmquant_layer_source", None)
    found = decoder_layers(model, arch_for(model))
    if source is None or found is None:
        raise SchemeError("the streamed sensitivity takes a model loaded with stream=True")
    outside = [u.name for u in units if u.block is None]
    if outside:
        raise SchemeError(f"a streamed model's sensitivity covers the linears inside its decoder layers; {outside[:2]} "
                          "are outside them (leave the head out: no --include-head)")
    path, layers = found
    batches = [w[None] for w in ids]
    with torch.no_grad():
        xs, kwargs = record_layer_inputs(model, layers, batches, {"use_cache": False})
        kept = []
        for i in tqdm(range(len(layers)), desc="sensitivity (fisher, forward)", disable=not progress, leave=False):
            source.load(i, f"{path}.{i}", layers[i])
            kept.append(list(xs))
            xs = [_run(layers[i], x, k) for x, k in zip(xs, kwargs[i])]
            _unload(layers[i])
            source.release(i, f"{path}.{i}", layers[i])
    heads = _head_grads(model, layers, xs, batches, samples, seed)
    n = sum(h[0] for h in heads)
    upstream = [h[1] for h in heads]  # [window][draw]
    acc = torch.zeros(len(units), len(fmts), dtype=torch.float64)
    diag = torch.zeros_like(acc)
    for i in tqdm(reversed(range(len(layers))), total=len(layers), desc="sensitivity (fisher, backward)",
                  disable=not progress, leave=False):
        prefix = f"{path}.{i}"
        source.load(i, prefix, layers[i])
        mine = _layer_weights(layers[i], prefix, units)
        for p in layers[i].parameters():
            p.requires_grad_(False)
        weights = [w for _, w in mine]
        for w in weights:
            w.requires_grad_(True)
        lo = mine[0][0] if mine else 0
        hi = mine[-1][0] + 1 if mine else 0
        if [k for k, _ in mine] != list(range(lo, hi)):
            raise SchemeError("planned units of one decoder layer must be consecutive in the model's order")
        pending, below, deltas = [], [], _Deltas()  # this layer's k-quant weight changes, made once
        for j, x in enumerate(kept[i]):
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                y = _run(layers[i], x, kwargs[i][j])
                ups = []
                for s, g in enumerate(upstream[j]):
                    grads = torch.autograd.grad(y, [*weights, x], grad_outputs=g, retain_graph=s < len(upstream[j]) - 1)
                    ups.append(grads[-1])
                    if weights:
                        pending.append([gw.detach().to(torch.bfloat16) for gw in grads[:-1]])
                    if len(pending) == flush_every:
                        _flush(weights, fmts, pending, acc[lo:hi], diag[lo:hi], deltas)
                        pending = []
            below.append(ups)
            del y
        if pending:
            _flush(weights, fmts, pending, acc[lo:hi], diag[lo:hi], deltas)
        upstream = below
        kept[i] = None
        _unload(layers[i])
        source.release(i, prefix, layers[i])
    scale = 0.5 / (samples * max(n, 1))
    return (scale * diag).tolist(), (scale * acc).tolist()
