"""One pass per decoder layer for methods that quantize each linear on its own inputs (GPTQ, importance-
weighted RTN / HQQ): the "true sequential" order of the GPTQ paper's code, without a second pass.

Every calibration batch runs through the layer in its own thread, and the threads take turns (one runs at a
time, the others wait): a batch stops at each linear that is not quantized yet, after the linear's input
statistics have been gathered. When every batch has stopped (or finished), the linear they wait on is
quantized (``on_linear``, which may quantize the linears that share its input with it at the same time),
its float weight replaced by what the quantized one computes, and the batches go on. So each linear is
calibrated on the outputs of the linears before it, already quantized, and the layer's outputs, which feed
the next layer, come out of the same pass: one forward per layer where the two-pass pipeline needs a float
pass for the statistics and a quantized pass for the outputs.

Linears are taken in the order the batches reach them. When the batches wait on different linears (a
mixture of experts whose router skipped some for some batches), the one first in the layer's module order
goes first. A linear called again after it was quantized (within the same batch) computes quantized and adds
nothing to its statistics.

Memory: every batch's activations inside the layer are alive at once (at the MLP's down projection, about
two hidden states and one intermediate activation per token), against one batch's in the two-pass pipeline.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
import torch.nn as nn


class _Abort(BaseException):
    """Raised inside a waiting batch's thread to end it when the pass fails elsewhere."""


class _Batch(threading.Thread):
    def __init__(self, fn: Callable[[], object], turn: threading.Semaphore) -> None:
        super().__init__(daemon=True, name="llmquant-staged-batch")
        self.fn, self.turn = fn, turn
        self.go = threading.Semaphore(0)
        self.waiting: str | None = None  # the linear this batch stopped at
        self.finished = False
        self.result = None
        self.error: BaseException | None = None
        self.abort = False

    def run(self) -> None:
        self.go.acquire()
        try:
            if self.abort:
                raise _Abort
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001  (handed to the scheduler, which raises it)
            self.error = e
        finally:
            self.waiting = None
            self.finished = True
            self.turn.release()

    def stop_at(self, name: str) -> None:
        """In this batch's thread: hand the turn back and wait until ``name`` is quantized."""
        self.waiting = name
        self.turn.release()
        self.go.acquire()
        if self.abort:
            raise _Abort
        self.waiting = None


def staged_pass(linears: dict[str, nn.Module], batches: list[Callable[[], object]],
                stats_hook: Callable[[str], Callable] | None, on_linear: Callable[[str], object],
                choose: Callable[[list[str]], str | None] | None = None) -> list:
    """Run ``batches`` (callables, each one batch's forward through the layer, returning its output) with a stop
    at every linear of ``linears`` (name -> module) before it is quantized; ``stats_hook(name)``: the forward
    pre-hook that gathers the linear's input statistics (called before the stop); ``on_linear(name)``:
    quantize the linear (every batch that will call it has stopped there), and return the names of the linears
    it quantized (None: ``name`` alone; others that share its input and no batch has called yet may join);
    ``choose(waited)``: which of the waited linears goes next (None: none is left), e.g. agreed over the ranks
    of a distributed run (default: the first in ``linears``' order). Returns the batches' outputs, in order.
    The batches run under the caller's grad mode; an error in one ends the others and is raised."""
    order = {n: i for i, n in enumerate(linears)}
    done: set[str] = set()
    turn = threading.Semaphore(0)
    grad = torch.is_grad_enabled()
    local = threading.local()

    def wrap(fn):
        def run():
            local.batch = threading.current_thread()
            with torch.set_grad_enabled(grad):
                return fn()
        return run

    workers = [_Batch(wrap(fn), turn) for fn in batches]
    hooks = []

    def make_hook(name: str):
        stat = stats_hook(name) if stats_hook is not None else None

        def pre(mod, args):
            me = getattr(local, "batch", None)
            if name in done or me is None:  # quantized already, or a call outside the pass
                return
            if stat is not None:
                stat(mod, args)
            me.stop_at(name)

        return pre

    def first(waited: list[str]) -> str | None:
        return min(waited, key=order.__getitem__) if waited else None

    choose = choose or first
    try:
        for n, m in linears.items():
            hooks.append(m.register_forward_pre_hook(make_hook(n)))
        for w in workers:
            w.start()
        while True:
            for w in workers:  # each batch runs until it stops at a linear not quantized yet, or ends
                if not w.finished and (w.waiting is None or w.waiting in done):
                    w.go.release()
                    turn.acquire()
                    if w.error is not None:
                        raise w.error
            name = choose(sorted({w.waiting for w in workers if not w.finished}, key=order.__getitem__))
            if name is None:
                break
            done.update(on_linear(name) or (name,))
    finally:
        for h in hooks:
            h.remove()
        for w in workers:  # a failure: end the batches still waiting
            if w.is_alive():
                w.abort = True
                w.go.release()
        for w in workers:
            w.join()
    return [w.result for w in workers]

