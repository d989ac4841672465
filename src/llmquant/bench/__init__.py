"""Speed and memory measurements (never used in tests: timings belong in benchmarks/)."""

from ..resources import peak_rss_mb
from .speed import SpeedResult, measure_speed

__all__ = ["SpeedResult", "measure_speed", "peak_rss_mb"]
