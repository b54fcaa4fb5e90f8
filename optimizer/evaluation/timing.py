"""Latency of a predictor: wall time per predict() call after warm-up (garbage collector held off), and percentiles."""

from __future__ import annotations

import gc
import time

import numpy as np

from slimserve.optimizer.base import Predictor


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


def interleaved_p50_ms(
    runs: dict[str, tuple[Predictor, dict[str, np.ndarray]]], rounds: int = 6, iterations: int = 40, warmup: int = 10
) -> dict[str, float]:
    """Median ms per predict() of each predictor, timed in alternating rounds so that a busy machine slows all alike.

    Two latencies measured minutes apart differ by more than a few percent on a shared CPU; taken in
    turns (the order reversed every round) and pooled, they compare like with like.
    """
    for predictor, feeds in runs.values():
        for _ in range(warmup):
            predictor.predict(feeds)
    samples: dict[str, list[np.ndarray]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            predictor, feeds = runs[name]
            samples[name].append(time_predict(predictor, feeds, 0, iterations))
    return {name: float(np.median(np.concatenate(s)) * 1000.0) for name, s in samples.items()}


def beats(candidate_ms: float, reference_ms: float, margin: float) -> bool:
    """True when the candidate is faster than the reference by more than the noise margin (0.05: at least 5% faster)."""
    return candidate_ms <= reference_ms * (1.0 - margin)
