"""Passes over a model's decoder layers that the pipeline and streamed evaluation share: finding the
layers, recording each layer's call arguments in one pass where the layers stand aside, and (for a model
streamed from its checkpoint) running the float model one layer at a time."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import CalibrationError
from ..models import arch_for
from ..models.trace import decoder_layers  # noqa: F401  (the pipeline's import)
from .stats import PreHooks


class _Stop(Exception):
    pass


def _raise_stop(*args):
    raise _Stop


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes: the device of its first tensor that has data (a streamed model's layers
    wait on the meta device; its embedding may be a buffer)."""
    for t in (*model.parameters(), *model.buffers()):
        if not t.is_meta:
            return t.device
    return torch.device("cpu")



def _run(module: nn.Module, x, kwargs: dict):
    out = module(x, **kwargs) if isinstance(x, torch.Tensor) else module(*x, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "logits", out) if not isinstance(out, torch.Tensor) else out


class TailSkip(PreHooks):
    """Context manager that ends a layer's calibration pass early: once a first full pass has shown the order
    in which the layer calls its ``linears`` (after the statistics hooks, which it is entered after), an
    ``armed`` pass stops (raises ``_Stop``) as the last of them receives its input, so the rest of the layer
    (e.g. the MLP's down projection) is not computed for batches whose outputs nobody needs. It never arms
    when the first pass did not call every linear (e.g. a mixture of experts whose router skipped one)."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.linears, self.seq = linears, []
        self.target: str | None = None
        self.need = self.count = 0
        self.armed = False
        self._handles = []

    def _hook(self, name: str):
        def pre(mod, args):
            if self.target is None:
                self.seq.append(name)
            elif self.armed and name == self.target:
                self.count += 1
                if self.count == self.need:
                    raise _Stop
        return pre

    def full(self, layer: nn.Module, x, kwargs: dict):
        """A whole pass (its output returned); until a pass has called every linear, it learns where to stop."""
        self.seq = []
        y = _run(layer, x, kwargs)
        if self.target is None and self.seq and set(self.seq) == set(self.linears):
            self.target = self.seq[-1]
            self.need = self.seq.count(self.target)
        return y

    def run(self, layer: nn.Module, x, kwargs: dict) -> bool:
        """A pass whose output is not needed: it stops at the last linear when a full pass has shown which
        that is; True if it did."""
        if self.target is None:
            self.full(layer, x, kwargs)
            return False
        self.armed, self.count = True, 0
        try:
            _run(layer, x, kwargs)
            return False
        except _Stop:
            return True
        finally:
            self.armed = False



class _StandIn(nn.Module):
    """A module put in a decoder layer's place for one pass; attributes the model reads off its layers
    (``attention_type``, ...) are the layer's."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)


class _Recorder(_StandIn):
    """Stands in for decoder layer ``index`` during the recording pass: keeps its call's keyword
    arguments (and layer 0's input), passes the hidden states through, stops after the last layer."""

    def __init__(self, layer: nn.Module, index: int, last: bool, sink: Callable) -> None:
        super().__init__(layer)
        self.index, self.last, self.sink = index, last, sink

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        self.sink(self.index, h, kwargs)
        if self.last:
            raise _Stop
        return h


@torch.no_grad()
def record_layer_inputs(model, layers: nn.ModuleList, batches, kw, store=None) -> tuple[list, list[list[dict]]]:
    """Layer 0's inputs per batch (appended to ``store``, a list by default), and each layer's keyword
    arguments per batch ([layer][batch])."""
    inputs = [] if store is None else store
    kwargs: list[list[dict]] = [[] for _ in layers]

    def sink(i, h, k):
        if i == 0:
            inputs.append(h)
        prev = kwargs[i - 1][len(kwargs[i])] if i else None
        same = prev is not None and prev.keys() == k.keys() and all(prev[a] is k[a] for a in k)
        kwargs[i].append(prev if same else dict(k))  # share the dict when a layer gets the very same objects

    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Recorder(layer, i, i == len(originals) - 1, sink)
    try:
        for b in batches:
            try:
                model(b, **kw)
            except _Stop:
                pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    if len(inputs) != len(batches) or any(len(k) != len(batches) for k in kwargs):
        raise CalibrationError("the model did not call its decoder layers in order on the calibration data; "
                               "use CalibSpec(sequential=False) (one whole-model pass)")
    return inputs, kwargs


class _Replay(_StandIn):
    """Stands in for a decoder layer in :func:`streamed_logits`' last pass: the hidden states pass through,
    except at the last layer, which gives the outputs the layer-by-layer pass computed."""

    def __init__(self, layer: nn.Module, out: list | None) -> None:
        super().__init__(layer)
        self.out, self.current = out, 0

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return h if self.out is None else self.out[self.current]


def _unload(layer: nn.Module) -> None:
    """Put a streamed layer's weights back in the checkpoint (meta tensors), freeing their memory."""
    for mod in layer.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and not p.is_meta:
                mod._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)


@torch.no_grad()
def streamed_logits(model: nn.Module, windows: torch.Tensor, fn: Callable[[int, torch.Tensor], None]) -> None:
    """The logits of a streamed model (``load_model(..., stream=True)``) on each window (n, seq_len), one
    window at a time to ``fn(i, logits)``, reading one decoder layer at a time and putting it back after:
    peak memory is one layer plus the windows' hidden states. The model's own head (final norm, output
    projection, any logit scaling) computes the logits, so they are those of the model's own forward."""
    source = getattr(model, "llmquant_layer_source", None)
    found = decoder_layers(model, arch_for(model))
    if source is None or found is None:
        raise CalibrationError("streamed_logits takes a model loaded with stream=True")
    path, layers = found
    dev = model_device(model)
    batches = [w.unsqueeze(0).to(dev) for w in windows]
    xs, kwargs = record_layer_inputs(model, layers, batches, {"use_cache": False})
    for i in tqdm(range(len(layers)), desc="reference (streamed)", leave=False, unit="layer"):
        prefix = f"{path}.{i}"
        source.load(i, prefix, layers[i])
        for j, (x, k) in enumerate(zip(xs, kwargs[i])):
            xs[j] = _run(layers[i], x, k)
        _unload(layers[i])
        source.release(i, prefix, layers[i])
    originals = list(layers)
    replays = [_Replay(layer, xs if i == len(originals) - 1 else None) for i, layer in enumerate(originals)]
    for i, r in enumerate(replays):
        layers[i] = r
    try:
        for j, b in enumerate(batches):
            replays[-1].current = j
            fn(j, _run(model, b, {"use_cache": False}))
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
