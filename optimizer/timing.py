"""Latency of a predictor: wall time per predict() call after warm-up (garbage collector held off), and percentiles."""

from __future__ import annotations

import gc
import time

import numpy as np

from optimizer.base import Predictor


def time_predict(predictor: Predictor, feeds: dict[str, np.ndarray], warmup: int, iterations: int) -> np.ndarray:
    """Seconds per predict() call, after warm-up; the garbage collector is held off while timing."""
    for _ in range(warmup):
        predictor.predict(feeds)
    times = np.empty(iterations)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(iterations):
            start = time.perf_counter()
            predictor.predict(feeds)
            times[i] = time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()
    return times


def percentiles_ms(times: np.ndarray) -> tuple[float, float]:
    p50, p99 = np.percentile(times, [50, 99])
    return float(p50 * 1000.0), float(p99 * 1000.0)
