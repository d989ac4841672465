"""Each observer on constructed distributions gives the range it should (uniform, outliers, heavy tails),
per tensor and per channel, symmetric and asymmetric, through the one set of grid conventions."""

import pytest
import torch

from llmquant.errors import CalibrationError, SchemeError
from llmquant.observers import OBSERVERS, make_observer
from llmquant.schemes import QuantScheme, qparams_from_minmax

T = QuantScheme(bits=8, granularity="tensor")
TA = QuantScheme(bits=8, granularity="tensor", symmetric=False)
CH = QuantScheme(bits=8, granularity="channel")


def feed(spec, scheme, x, chunks=8, **kw):
    o = make_observer(spec, scheme, **kw)
    for c in x.chunk(chunks):
        o(c)
    return o


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spec", ["minmax", "moving_average", "percentile", "mse", "histogram"])
@pytest.mark.parametrize("scheme", [T, TA], ids=["sym", "asym"])
def test_uniform_keeps_the_whole_range(spec, scheme):
    """Uniform data has no outliers: every rule keeps (nearly) the full range."""
    x = torch.rand(200_000, generator=gen()) * 3 - 1  # [-1, 2]
    lo, hi = feed(spec, scheme, x, chunks=1).range()
    if scheme.symmetric:  # the grid covers [-amax, amax]
        amax = max(abs(lo.item()), abs(hi.item()))
        assert 1.96 < amax <= 2.0 + 1e-6
    else:
        assert -1.0 - 1e-6 <= lo.item() < -0.98 and 1.96 < hi.item() <= 2.0 + 1e-6


def test_minmax_is_exact_and_uses_the_scheme_grid():
    x = torch.randn(1000, generator=gen())
    for scheme in (T, TA):
        o = feed("minmax", scheme, x)
        lo, hi = o.range()
        assert lo.item() == x.min().item() and hi.item() == x.max().item()
        s, z = o.calculate_qparams()
        s2, z2 = qparams_from_minmax(x.min().reshape(1, 1), x.max().reshape(1, 1), scheme)
        assert torch.equal(s, s2) and (z is None) == (z2 is None) and (z is None or torch.equal(z, z2))


def test_moving_average_damps_one_extreme_batch():
    batches = [torch.randn(4096, generator=gen(i)) for i in range(20)]
    batches[3] = batches[3] * 50
    mm, ema = make_observer("minmax", T), make_observer("moving_average:0.1", T)
    for b in batches:
        mm(b), ema(b)
    assert mm.range()[1].item() > 100
    assert ema.range()[1].item() < 0.5 * mm.range()[1].item()


def outlier_data(n=1_000_000, value=30.0):
    x = torch.randn(n, generator=gen(1))
    x[:1] = value  # one outlier in a million
    return x


@pytest.mark.parametrize("spec", ["percentile", "mse", "histogram"])
def test_clipping_observers_ignore_a_lone_outlier(spec):
    x = outlier_data()
    hi = feed(spec, T, x).range()[1].item()
    assert feed("minmax", T, x).range()[1].item() == 30.0
    assert 3.5 < hi < 8.0, hi  # the Gaussian body reaches about +-5; the outlier is clipped


def test_mse_finds_the_analytic_optimum():
    """One value at 200 among a million N(0, 1): E(t) = 1e6 (t / 127.5)^2 / 12 + (200 - t)^2 is smallest
    at t = 200 / (1 + 1e6 / (12 * 127.5^2)) = 32.6, a range that neither min-max nor a percentile gives."""
    x = outlier_data(value=200.0)
    t = 200 / (1 + 1e6 / (12 * 127.5**2))
    assert feed("mse", T, x).range()[1].item() == pytest.approx(t, rel=0.05)


def test_mse_keeps_outliers_that_carry_the_error():
    """Ten thousand values at 20 among a million: clipping them would cost more than the coarser step."""
    x = torch.randn(1_000_000, generator=gen(2))
    x[:10_000] = 20.0
    hi = feed("mse", T, x).range()[1].item()
    assert hi > 18.0


def test_percentile_value_on_heavy_tails():
    x = torch.distributions.StudentT(2.0).sample((400_000,))
    for p in (99.0, 99.9):
        hi = feed(f"percentile:{p}", T, x).range()[1].item()
        exact = torch.quantile(x.abs()[:100_000], p / 100).item()  # the |x| percentile (subsample for quantile)
        assert hi == pytest.approx(exact, rel=0.15)
    lo, hi = feed("percentile:99", TA, x).range()
    assert lo.item() == pytest.approx(torch.quantile(x[:100_000], 0.01).item(), rel=0.15)
    assert hi.item() == pytest.approx(torch.quantile(x[:100_000], 0.99).item(), rel=0.15)


def test_heavy_tails_order_of_ranges():
    """Student-t(2): min-max follows the extreme, percentile/MSE/KL clip in between."""
    x = torch.distributions.StudentT(2.0).sample((400_000,))
    amax = x.abs().max().item()
    for spec in ("percentile", "mse", "histogram"):
        hi = feed(spec, T, x).range()[1].item()
        assert 2.0 < hi < 0.9 * amax, (spec, hi, amax)


def test_mse_minimises_the_actual_error():
    """The MSE observer's range quantizes the data with lower error than min-max's."""
    from llmquant.schemes import dequantize, quantize_to_int

    x = torch.distributions.StudentT(3.0).sample((200_000,))
    s4 = QuantScheme(bits=4, granularity="tensor")

    def err(o):
        s, z = o.calculate_qparams()
        return (dequantize(quantize_to_int(x, s, z, s4), s, z, s4) - x).pow(2).mean().item()

    assert err(feed("mse", s4, x)) < 0.5 * err(feed("minmax", s4, x))


@pytest.mark.parametrize("spec", ["minmax", "percentile", "mse", "histogram"])
@pytest.mark.parametrize("scheme", [CH, QuantScheme(bits=8, granularity="group", group_size=32, symmetric=False)],
                         ids=["channel", "g32-asym"])
def test_per_row_shapes_match_the_primitives(spec, scheme):
    w = torch.randn(24, 80, generator=gen(3)) * torch.linspace(0.1, 3, 24)[:, None]
    o = feed(spec, scheme, w, chunks=1)
    s, z = o.calculate_qparams()
    rows_groups = (24, scheme.num_groups(80))
    assert s.shape == rows_groups and (z is None) == scheme.symmetric
    lo, hi = o.range()
    amax = w.abs().amax(dim=1)
    if scheme.granularity == "channel":  # ranges follow each row's scale
        assert torch.all(hi.reshape(-1) <= amax + 1e-5) and torch.all(hi.reshape(-1) > 0.5 * amax)


def test_per_input_channel_activation_ranges():
    x = torch.randn(64, 10, 16, generator=gen(4))
    x[..., 5] *= 100  # one outlier channel
    lo, hi = feed("minmax", T, x, ch_axis=-1).range()
    assert hi.shape == (1, 16)
    assert torch.allclose(hi.reshape(-1), x.reshape(-1, 16).amax(0))
    assert hi[0, 5] > 50 * hi[0, 4]


def test_histogram_rebins_when_the_range_grows():
    """Later batches with a wider range: counts are kept, the percentile still lands right."""
    g = gen(5)
    o = make_observer("percentile:99", T)
    for scale in (1.0, 2.0, 4.0):
        o(torch.randn(100_000, generator=g) * scale)
    assert o.hist.sum().item() == 300_000
    x = torch.cat([torch.randn(100_000, generator=gen(5)) * s for s in (1.0, 2.0, 4.0)])
    assert o.range()[1].item() == pytest.approx(torch.quantile(x.abs()[::3], 0.99).item(), rel=0.05)


def test_derive_reads_the_same_statistics():
    x = outlier_data(200_000)
    h = feed("histogram", T, x)
    for spec in ("minmax", "percentile", "mse"):
        assert torch.equal(h.derive(spec).range()[1], feed(spec, T, x).range()[1])
    with pytest.raises(SchemeError, match="cannot be derived"):
        h.derive("moving_average")


def test_errors():
    with pytest.raises(SchemeError, match="unknown observer"):
        make_observer("nope", T)
    with pytest.raises(SchemeError, match="dynamic"):
        make_observer("minmax", QuantScheme(bits=8, granularity="token", dynamic=True))
    o = make_observer("mse", T, label="layer.0")
    with pytest.raises(CalibrationError, match="saw no data"):
        o.calculate_qparams()
    with pytest.raises(CalibrationError, match="NaN/Inf.*layer.0"):
        o(torch.tensor([1.0, float("nan")]))
    assert {"minmax", "moving_average", "percentile", "mse", "histogram"} <= set(OBSERVERS)
