"""Architecture facts read off the model itself: one decoder layer run on a tiny input, with hooks.

What a scale fold needs to know is which module's output reaches which linears and nothing else:

- **Candidates** come from the values passed between modules: linear ``L`` is fed by module ``S`` when
  every row of ``L``'s input is a row of ``S``'s output (a view, a reshape or a routed subset of tokens
  counts; anything computed from it does not).
- **A fold holds** when dividing ``S``'s output channels by ``s`` and multiplying the consumers' input
  channels by ``s`` leaves the layer's output unchanged. With ``s`` made of powers of two every step is
  exact in floating point, so a fold that holds gives the very same output, and one that misses a consumer
  (a residual add, a router, an activation between two linears) changes it by far more than rounding.
  This is also how a declared pair is checked.
- **A norm's kind**: its output is ``n(x) * (offset + w) + b``; running it with ``w = 0`` and ``w = 1``
  gives ``n(x)`` and ``offset`` (0 for RMSNorm/LayerNorm, 1 for Gemma's RMSNorm), and shows whether the
  weight scales per channel at all.

One decoder layer of each structure is traced (most models repeat one; a model mixing dense and MoE
blocks has two): :func:`llmquant.flows.folds.fold_plan` asks for each.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

#: tokens of the tracing input: enough that every routed expert of a small MoE sees some
TRACE_TOKENS = 32


class _Stop(Exception):
    pass


def decoder_layers(model: nn.Module, arch) -> tuple[str, nn.ModuleList] | None:
    """(path, ModuleList) of the decoder layers: from the architecture record, else the first list of
    repeated blocks holding linears; None for a model without such a list."""
    if arch is not None:
        try:
            return arch.layers, model.get_submodule(arch.layers)
        except AttributeError:
            pass
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and all(any(is_linear(c) for c in b.modules()) for b in mod):
            return name, mod
    return None


def fused_expert_params(model: nn.Module) -> list[str]:
    """Names of 3-D parameters: mixture-of-experts weights kept fused, (experts, out, in) or (experts, in,
    out), as transformers keeps Mixtral's and Qwen-MoE's; they are not linears llmquant can select."""
    return [f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules() if not isinstance(m, nn.modules.conv._ConvNd)
            for pn, p in m.named_parameters(recurse=False) if p.dim() == 3]


def is_linear(m: nn.Module) -> bool:
    """An ``nn.Linear`` or a module with the same role (GPT-2's ``Conv1D``: weight (in, out), ``nf`` = out)."""
    return isinstance(m, nn.Linear) or (getattr(m, "nf", None) is not None and getattr(m, "weight", None) is not None)


def _in_features(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]


def _out_features(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.nf


def is_norm(m: nn.Module) -> bool:
    """A module with a per-channel (1-D) weight and no children: a norm, as far as a fold is concerned."""
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and not is_linear(m) and not list(m.children())


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return getattr(out, "last_hidden_state", None)


def _rows(t: torch.Tensor) -> set[bytes]:
    flat = t.detach().reshape(-1, t.shape[-1]).contiguous().cpu()
    return {r.numpy().tobytes() for r in flat}


@contextlib.contextmanager
def _eval(module: nn.Module):
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


class LayerTrace:
    """One decoder layer with the arguments the model called it with on a tiny input, its output, and
    what each of its modules received and returned."""

    def __init__(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        self.layer, self.args, self.kwargs = layer, args, kwargs
        self.modules = dict((n, m) for n, m in layer.named_modules() if n)
        self.linears = [n for n, m in self.modules.items() if is_linear(m)]
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        handles = []
        for name, mod in self.modules.items():
            handles.append(mod.register_forward_hook(self._keeper(name)))
        try:
            self.reference = self._run()
        finally:
            for h in handles:
                h.remove()

    def _keeper(self, name):
        def hook(mod, args, out):
            if name not in self.outputs:  # the first call (a module may be called twice)
                if args and isinstance(args[0], torch.Tensor):
                    self.inputs[name] = args[0].detach()
                t = _first_tensor(out)
                if t is not None:
                    self.outputs[name] = t.detach()
        return hook

    @torch.no_grad()
    def _run(self) -> torch.Tensor:
        with _eval(self.layer):
            return _first_tensor(self.layer(*self.args, **self.kwargs)).detach().clone()

    def fold_holds(self, source: str, consumers: tuple[str, ...], seed: int = 0) -> bool:
        """True when dividing ``source``'s output channels by a per-channel power of two and multiplying
        ``consumers``' input channels by it leaves the layer's output unchanged (see the module docs)."""
        out = self.outputs.get(source)
        if out is None or any(c not in self.modules for c in consumers):
            return False
        g = torch.Generator().manual_seed(seed)
        s = (2.0 ** torch.randint(-2, 3, (out.shape[-1],), generator=g)).to(out.device)

        def shrink(mod, args, y):
            return y / s.to(y.dtype) if isinstance(y, torch.Tensor) else y

        def grow(mod, args):
            return (args[0] * s.to(args[0].dtype), *args[1:]) if args else None

        handles = [self.modules[source].register_forward_hook(shrink)]
        handles += [self.modules[c].register_forward_pre_hook(grow) for c in consumers]
        try:
            y = self._run()
        except RuntimeError:  # a consumer whose input width is not the source's
            return False
        finally:
            for h in handles:
                h.remove()
        ref = self.reference
        return bool((y.float() - ref.float()).abs().max() <= 1e-5 * ref.float().abs().max().clamp(min=1e-30))

    @torch.no_grad()
    def norm_offset(self, name: str) -> float | None:
        """``offset`` of a norm computing ``n(x) * (offset + w) + b``, or None when the module does not
        scale its output channels by its weight that way (a fold cannot go into it)."""
        mod, x = self.modules.get(name), self.inputs.get(name)
        if mod is None or x is None or not is_norm(mod):
            return None
        w = mod.weight
        saved = w.detach().clone()
        try:
            w.data.zero_()
            y0 = _first_tensor(mod(x)).float()
            w.data.fill_(1)
            y1 = _first_tensor(mod(x)).float()
        except Exception:  # noqa: BLE001  (a module that cannot be run alone is not one to fold into)
            return None
        finally:
            w.data.copy_(saved)
        bias = getattr(mod, "bias", None)
        n = y1 - y0
        r = y0 - (bias.detach().float() if isinstance(bias, torch.Tensor) else 0.0)
        offset = float((r * n).sum() / (n * n).sum().clamp(min=1e-30))
        tol = 1e-3 * float(n.abs().max()) + 1e-12
        if (r - offset * n).abs().max() > tol:
            return None
        if (self.outputs[name].float() - (y0 + saved.float() * n)).abs().max() > tol * (1 + float(saved.abs().max())):
            return None
        return round(offset, 4)

    def consumers_of(self, source: str) -> list[str]:
        """The linears whose every input row is a row of ``source``'s output (module order)."""
        out = self.outputs.get(source)
        if out is None:
            return []
        rows = None
        found = []
        for n in self.linears:
            x = self.inputs.get(n)
            if n == source or x is None or x.shape[-1] != out.shape[-1]:
                continue
            rows = rows if rows is not None else _rows(out)
            if _rows(x) <= rows:
                found.append(n)
        return found

    def discover(self) -> tuple[tuple, tuple, dict[str, float]]:
        """(norm -> linears pairs, linear -> linears pairs, each source norm's offset) of the layer: every
        norm whose output reaches only linears, with a fold that holds; every linear whose output
        channels can be scaled into a later linear's input."""
        unseen = [n for n in self.linears if n not in self.inputs]
        unseen_widths = {_in_features(self.modules[n]) for n in unseen}
        n2l, offsets, fed = [], {}, set()
        for name, mod in self.modules.items():
            if not is_norm(mod):
                continue
            consumers = self.consumers_of(name)
            if not consumers:
                continue
            offset = self.norm_offset(name)
            # a linear the tiny input never reached (an expert no token was routed to) may be fed too
            if offset is None or mod.weight.shape[0] in unseen_widths:
                log.debug("trace: %s feeds %s but cannot take a fold", name, consumers)
                continue
            if self.fold_holds(name, tuple(consumers)):
                n2l.append((name, tuple(consumers)))
                offsets[name] = offset
                fed.update(consumers)
            else:
                log.debug("trace: %s feeds %s and other operations; no fold", name, consumers)
        l2l = []
        for src in self.linears:
            width = _out_features(self.modules[src])
            if src not in self.outputs or width in unseen_widths:
                continue
            for dst in self.linears:
                if dst == src or dst in fed or _in_features(self.modules[dst]) != width:
                    continue
                if self.fold_holds(src, (dst,)):
                    l2l.append((src, (dst,)))
                    fed.add(dst)
        return tuple(n2l), tuple(l2l), offsets


def trace_layer(model: nn.Module, arch=None, index: int = 0) -> LayerTrace | None:
    """Decoder layer ``index`` of ``model`` traced on ``TRACE_TOKENS`` tokens, or None when the model cannot
    be traced (no decoder layers, no vocabulary size, weights not loaded (a streamed model), a forward
    that fails on plain token ids)."""
    found = decoder_layers(model, arch)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if found is None or not isinstance(vocab, int) or any(p.is_meta for p in model.parameters()):
        return None
    layer = found[1][index]
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = (torch.arange(TRACE_TOKENS, device=dev) * 7919 % vocab).unsqueeze(0)
    seen: dict = {}

    def grab(mod, args, kwargs):
        seen["args"], seen["kwargs"] = args, dict(kwargs)
        raise _Stop

    h = layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), _eval(model):
            model(ids, attention_mask=torch.ones_like(ids), use_cache=False)
    except _Stop:
        pass
    except Exception as e:  # noqa: BLE001  (untraceable: the caller falls back to declared facts)
        log.debug("trace: the model's forward on token ids failed (%s)", e)
        return None
    finally:
        h.remove()
    if "args" not in seen:
        return None
    if not seen["args"] and "hidden_states" in seen["kwargs"]:
        seen["args"] = (seen["kwargs"].pop("hidden_states"),)
    return LayerTrace(layer, seen["args"], seen["kwargs"])
