"""Speed and memory measurements (never used in tests: timings belong in benchmarks/)."""

from .speed import SpeedResult, measure_speed, peak_rss_mb

__all__ = ["SpeedResult", "measure_speed", "peak_rss_mb"]
