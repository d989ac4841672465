import json

import pytest
import torch

from llmquant.errors import SchemeError
from llmquant.schemes import PRESETS, QuantConfig, QuantScheme, dequantize, compute_qparams, quantize_to_int, resolve_scheme


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_round_trip_json(name):
    s = PRESETS[name]
    assert QuantScheme.from_json(s.to_json()) == s
    assert json.loads(s.to_json())["version"] == 1


def test_config_round_trip():
    c = QuantConfig(weight="W4G64", targets=("re:.*mlp.*",), ignore=("lm_head", "model.layers.0.mlp.down_proj"))
    assert QuantConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("bits", [1, 9, 0, 4.5, True])
def test_bad_bits(bits):
    with pytest.raises(SchemeError, match="bits"):
        QuantScheme(bits=bits)


@pytest.mark.parametrize("gs", [0, -1, None])
def test_bad_group_size(gs):
    with pytest.raises(SchemeError, match="group size"):
        QuantScheme(bits=4, granularity="group", group_size=gs)


def test_unknown_things():
    with pytest.raises(SchemeError, match="preset"):
        resolve_scheme("W5G7X")
    with pytest.raises(SchemeError, match="version"):
        QuantScheme.from_dict({**PRESETS["W8"].to_dict(), "version": 99})
    with pytest.raises(SchemeError, match="unknown scheme fields"):
        QuantScheme.from_dict({"bits": 4, "colour": "red"})


def test_grid_and_names():
    s = QuantScheme(bits=4, symmetric=True, granularity="group", group_size=64)
    assert (s.qmin, s.qmax, s.name) == (-8, 7, "int4-g64")
    r = QuantScheme(bits=8, granularity="group", group_size=32, restricted_range=True)
    assert (r.qmin, r.qmax, r.name) == (-127, 127, "int8-g32-r")
    a = QuantScheme(bits=3, symmetric=False, granularity="channel")
    assert (a.qmin, a.qmax, a.name, a.group_size) == (0, 7, "int3-ch-asym", None)
    # 4 bits + one fp32 scale per 64 weights (the one stored-size count); an integer zero point takes a byte
    from llmquant.schemes import format_bytes

    assert 8 * format_bytes(s, 10, 128) / (10 * 128) == pytest.approx(4 + 32 / 64)
    assert format_bytes(QuantScheme(bits=4, symmetric=False, group_size=64), 10, 128) == 640 + 20 * (4 + 1)


@pytest.mark.parametrize("k,gs", [(576, 128), (72, 32), (5, 64), (130, 1)])
def test_ragged_groups_error_bounded(k, gs):
    """A width that is not a multiple of the group size gets a short last group with its own range."""
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(k))
    w[:, -1] = 50.0  # an outlier in the ragged group only affects that group
    for sym in (True, False):
        s = QuantScheme(bits=4, symmetric=sym, granularity="group", group_size=gs)
        scale, zero = compute_qparams(w, s)
        assert scale.shape == (6, -(-k // gs))
        q = quantize_to_int(w, scale, zero, s)
        assert int(q.min()) >= s.qmin and int(q.max()) <= s.qmax
        err = (dequantize(q, scale, zero, s) - w).abs()
        from llmquant.schemes import expand_groups

        assert (err <= expand_groups(scale, k, s) / 2 * (1 + 1e-5) + 1e-6).all()
        if k > gs:  # groups before the outlier's group keep a small step
            assert scale[:, 0].max() < scale[:, -1].min()


def test_float_zero_point_reproduces_min():
    """Float minimum (GGUF Q4_1 style): the group's minimum and maximum are on the grid."""
    s = PRESETS["gguf:Q4_1"]
    w = torch.rand(4, 64) * 3 + 1  # all positive: an integer zero point would waste part of the range
    scale, zero = compute_qparams(w, s)
    deq = dequantize(quantize_to_int(w, scale, zero, s), scale, zero, s)
    for r in range(4):
        for g in range(2):
            blk = w[r, g * 32 : (g + 1) * 32]
            dblk = deq[r, g * 32 : (g + 1) * 32]
            assert abs(float(dblk.min() - blk.min())) < 2e-3
            assert abs(float(dblk.max() - blk.max())) < 2e-3
