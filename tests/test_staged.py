"""The one-pass layer (true sequential): batches take turns in threads, stopping at each linear until it is
quantized."""

import copy
import threading

import pytest
import torch
import torch.nn as nn

import llmquant
from llmquant import CalibSpec, QuantConfig
from llmquant.flows.staged import staged_pass
from conftest import calib_ids, make_tiny_llama


class _Two(nn.Module):
    """a -> b, with b also called a second time on its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.b(self.a(x)))


def _threads() -> int:
    return sum(t.name == "llmquant-staged-batch" for t in threading.enumerate())


def test_each_linear_waits_for_every_batch_and_later_ones_see_it_quantized():
    torch.manual_seed(0)
    m = _Two()
    xs = [torch.randn(3, 4) for _ in range(5)]
    seen, log = {"a": 0, "b": 0}, []

    def stats(name):
        def pre(mod, args):
            seen[name] += 1
        return pre

    def on_linear(name):
        log.append((name, dict(seen)))
        with torch.no_grad():
            getattr(m, name).weight.mul_(0.5)  # "quantized": what the later calls compute

    with torch.no_grad():
        out = staged_pass({"a": m.a, "b": m.b}, [(lambda x=x: m(x)) for x in xs], stats, on_linear)
    # a is quantized once all 5 batches reached it (b not yet); b once all 5 reached it, and its second call
    # per batch computes quantized without adding to its statistics
    assert log == [("a", {"a": 5, "b": 0}), ("b", {"a": 5, "b": 5})]
    with torch.no_grad():
        assert all(torch.allclose(o, m(x)) for o, x in zip(out, xs))
    assert _threads() == 0


def test_batches_waiting_on_different_linears_go_in_module_order():
    """A router that skips a linear for some batches: the batches stop at different linears; the first in
    module order is quantized first, and nobody waits forever."""
    lin = {n: nn.Linear(2, 2) for n in ("e0", "e1", "e2")}

    def route(j):
        def run():
            x = torch.ones(1, 2)
            for n in (("e0", "e2") if j % 2 else ("e1", "e2")):
                x = lin[n](x)
            return x
        return run

    order = []
    with torch.no_grad():
        staged_pass(lin, [route(j) for j in range(4)], None, order.append)
    assert order == ["e0", "e1", "e2"]


def test_an_error_in_one_batch_ends_the_others_and_is_raised():
    lin = {"a": nn.Linear(2, 2)}

    def ok():
        return lin["a"](torch.ones(1, 2))

    def bad():
        lin["a"](torch.ones(1, 2))
        raise ValueError("batch 2 failed")

    with pytest.raises(ValueError, match="batch 2 failed"):
        staged_pass(lin, [ok, ok, bad, ok], None, lambda n: None)
    assert _threads() == 0
    with pytest.raises(RuntimeError, match="quantizer failed"):  # and one in the quantizer
        staged_pass(lin, [ok, ok], None, lambda n: (_ for _ in ()).throw(RuntimeError("quantizer failed")))
    assert _threads() == 0


def test_rtn_imse_runs_in_one_pass_and_old_specs_read_as_two_passes():
    """RTN's importance-weighted search runs in one pass too; a version-1 CalibSpec dict (written before the
    option) reads as the two passes it ran."""
    tiny = make_tiny_llama(vocab_size=1000, layers=2)
    calib = calib_ids(8, 32)
    a = copy.deepcopy(tiny)
    s = llmquant.quantize(a, QuantConfig(weight="W4G32", method="rtn", method_params={"observer": "imse"}),
                          calib=calib, progress=False)
    assert s.true_sequential and set(s.phase_seconds) >= {"float pass", "quantized pass", "quantize"}
    old = CalibSpec.from_dict({"samples": 8, "version": 1})
    assert old.true_sequential is False and CalibSpec().true_sequential is True
    assert CalibSpec.from_dict(CalibSpec(true_sequential=False).to_dict()) == CalibSpec(true_sequential=False)
    with pytest.raises(llmquant.errors.SchemeError):
        CalibSpec(true_sequential="yes")


def test_a_budget_without_room_for_the_one_pass_layer_takes_two_passes(monkeypatch):
    import llmquant.flows.budget as budget

    tiny = make_tiny_llama(vocab_size=1000, layers=2)
    calib = calib_ids(8, 32)
    real = budget.estimate

    def big(*a, **k):  # the one-pass layer's activations alone would need 1 TB
        e = real(*a, **k)
        e.staged = 10 ** 12
        return e

    monkeypatch.setattr(budget, "estimate", big)
    m = copy.deepcopy(tiny)
    s = llmquant.quantize(m, QuantConfig(weight="W4G32", method="gptq"), calib=calib, progress=False,
                          max_memory="64GB")
    assert not s.true_sequential and s.memory_budget["true_sequential"] is False
    ref = copy.deepcopy(tiny)
    llmquant.quantize(ref, QuantConfig(weight="W4G32", method="gptq",
                                       calibration=CalibSpec(true_sequential=False)), calib=calib, progress=False)
    sa, sb = m.state_dict(), ref.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_owner_probe_finds_shared_inputs_without_accumulating():
    from llmquant.flows.stats import StatsCollector

    m = make_tiny_llama(vocab_size=1000, layers=1)
    lin = {n: mod for n, mod in m.model.layers[0].named_modules() if isinstance(mod, nn.Linear)}
    probe = StatsCollector(lin, accumulate=False)
    with probe, torch.no_grad():
        m(calib_ids(1, 16))
    groups = sorted(sorted(g) for g in probe.groups().values())
    assert ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"] in groups
    assert ["mlp.gate_proj", "mlp.up_proj"] in groups and not probe.stats
