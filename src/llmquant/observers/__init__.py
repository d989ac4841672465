"""Observers: statistics of tensors seen during calibration -> (scale, zero), by name from a registry.

    obs = make_observer("percentile:99.9", QuantScheme(bits=8, granularity="tensor"))
    for x in batches: obs(x)
    scale, zero = obs.calculate_qparams()

Names: ``minmax``, ``moving_average`` (``ema``), ``percentile[:p]``, ``mse[:min_fraction]``,
``histogram`` (``kl``, ``entropy``).
"""

from .base import OBSERVERS, Observer, make_observer, parse_spec, register_observer
from .minmax import MinMaxObserver, MovingAverageMinMaxObserver
from .histogram import EntropyObserver, HistogramObserver, MSEObserver, PercentileObserver

__all__ = [
    "OBSERVERS",
    "Observer",
    "make_observer",
    "parse_spec",
    "register_observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "HistogramObserver",
    "PercentileObserver",
    "MSEObserver",
    "EntropyObserver",
]
