"""Latency of a predictor: wall time per predict() call after warm-up (garbage collector held off), and percentiles."""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass

import numpy as np

from slimserve.optimizer.base import ConfigValueError, PassConfig, Predictor
from slimserve.optimizer.evaluation.resumes import resumed

# What one timed call feeds: one dict of arrays, or a list of them taken in turn (a text model's rows at their real
# lengths, as the server runs them: slimserve.optimizer.evaluation.measure.served_calls).
Feeds = dict[str, np.ndarray] | list[dict[str, np.ndarray]]


def timed_call(predictor: Predictor, feed: dict[str, np.ndarray]) -> float:
    """Seconds of one predict() call; a call the process was stopped in (resumed meanwhile: evaluation/resumes.py) is
    timed again, up to 3 times."""
    resumed()  # a resume before the call is not this call's
    for _ in range(3):
        start = time.perf_counter()
        predictor.predict(feed)
        elapsed = time.perf_counter() - start
        if not resumed():
            break
    return elapsed


def calls_of(feeds: Feeds) -> list[dict[str, np.ndarray]]:
    return feeds if isinstance(feeds, list) else [feeds]


def time_predict(predictor: Predictor, feeds: Feeds, warmup: int, iterations: int, start_at: int = 0) -> np.ndarray:
    """Seconds per predict() call, after warm-up; the garbage collector is held off while timing.

    A list of feeds is taken in turn, from `start_at` (two predictors timed in turns start at the same one)."""
    calls = calls_of(feeds)
    for i in range(warmup):
        predictor.predict(calls[i % len(calls)])
    times = np.empty(iterations)
    enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(iterations):
            times[i] = timed_call(predictor, calls[(start_at + i) % len(calls)])
    finally:
        if enabled:
            gc.enable()
    return times


def percentiles_ms(times: np.ndarray) -> tuple[float, float]:
    p50, p99 = np.percentile(times, [50, 99])
    return float(p50 * 1000.0), float(p99 * 1000.0)


def interleaved_p50_ms(
    runs: dict[str, tuple[Predictor, Feeds]], rounds: int = 6, iterations: int = 40, warmup: int = 10
) -> dict[str, float]:
    """Median ms per predict() of each predictor, timed in alternating rounds so that a busy machine slows all alike.

    Two latencies measured minutes apart differ by more than a few percent on a shared CPU; taken in
    turns (the order reversed every round) and pooled, they compare like with like.
    """
    for predictor, feeds in runs.values():
        time_predict(predictor, feeds, warmup, 0)
    samples: dict[str, list[np.ndarray]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            predictor, feeds = runs[name]
            samples[name].append(time_predict(predictor, feeds, 0, iterations, start_at=r * iterations))
    return {name: float(np.median(np.concatenate(s)) * 1000.0) for name, s in samples.items()}


def beats(candidate_ms: float, reference_ms: float, margin: float) -> bool:
    """True when the candidate is faster than the reference by more than the noise margin (0.05: at least 5% faster)."""
    return candidate_ms <= reference_ms * (1.0 - margin)


# ---------------------------------------------------------------------------------------------
# Timing that stops when it knows enough: a latency's median, and a speed-up measured in turns


@dataclass(frozen=True)
class TimingOptions(PassConfig):
    """How long a recipe's measures may time (a recipe file's `"timing": {...}`).

    A latency is timed until the 95% confidence interval of its median is within `rel_ci` of it, or for `max_seconds`,
    at least `min_calls` and at most `max_calls` calls after a warm-up of `warmup_calls` calls or `warmup_seconds`. The
    speed-up against the FP32 reference is timed in turns (rounds of `round_calls` calls each, the order reversed every
    round) until the confidence interval of the ratio is within `rel_ci`, or for `ratio_seconds`.
    """

    rel_ci: float = 0.02
    max_seconds: float = 5.0
    ratio_seconds: float = 10.0
    min_calls: int = 5
    max_calls: int = 200
    round_calls: int = 5
    warmup_calls: int = 20
    warmup_seconds: float = 1.0

    def __post_init__(self) -> None:
        if not (0 < self.rel_ci < 1):
            raise ConfigValueError(f"timing rel_ci must be between 0 and 1 (0.02: 2%), got {self.rel_ci}")
        if self.max_seconds <= 0 or self.ratio_seconds <= 0 or self.warmup_seconds < 0:
            raise ConfigValueError("timing max_seconds and ratio_seconds must be positive, warmup_seconds 0 or more")
        if self.min_calls < 1 or self.max_calls < self.min_calls or self.round_calls < 1 or self.warmup_calls < 0:
            raise ConfigValueError(
                f"timing needs 1 <= min_calls <= max_calls and round_calls >= 1, got {self.min_calls}, {self.max_calls}, {self.round_calls}"
            )


def median_ci(times: np.ndarray) -> float:
    """Half the width of the median's 95% confidence interval (order statistics), relative to the median."""
    n = len(times)
    if n < 3:
        return float("inf")
    ordered = np.sort(times)
    half = 1.96 * math.sqrt(n) / 2.0
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half))
    median = float(np.median(ordered))
    return float((ordered[hi] - ordered[lo]) / 2.0 / median) if median > 0 else float("inf")


def warm_up(predictor: Predictor, feeds: Feeds, options: TimingOptions) -> None:
    calls = calls_of(feeds)
    deadline = time.perf_counter() + options.warmup_seconds
    for i in range(max(1, options.warmup_calls, len(calls) if len(calls) > 1 else 0)):  # every length once at least
        predictor.predict(calls[i % len(calls)])
        if time.perf_counter() > deadline:
            break


def time_until_tight(predictor: Predictor, feeds: Feeds, options: TimingOptions) -> np.ndarray:
    """Seconds per predict() call after a warm-up, until the median is known within rel_ci, the time cap or max_calls.

    A list of feeds (rows of several lengths) is taken in turn, and every one of them is timed once at least (within
    max_calls): the median is then over the lengths served, not over the first few."""
    calls = calls_of(feeds)
    warm_up(predictor, feeds, options)
    times: list[float] = []
    enabled = gc.isenabled()
    gc.disable()
    started = time.perf_counter()
    try:
        at_least = min(options.max_calls, max(options.min_calls, len(calls)))
        while len(times) < options.max_calls:
            times.append(timed_call(predictor, calls[len(times) % len(calls)]))
            if len(times) >= at_least and (
                time.perf_counter() - started > options.max_seconds or median_ci(np.asarray(times)) <= options.rel_ci
            ):
                break
    finally:
        if enabled:
            gc.enable()
    return np.asarray(times)


# Two-sided 95% quantiles of Student's t by degrees of freedom (rounds - 1); 1.96 beyond.
_T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13, 20: 2.09, 30: 2.04}


def _t95(df: int) -> float:
    return next((v for k, v in sorted(_T95.items()) if df <= k), 1.96)


@dataclass(frozen=True)
class Ratio:
    """reference ms / candidate ms, timed in turns: the geometric mean of the rounds' ratios and its 95% interval."""

    speedup: float
    low: float
    high: float
    rounds: int
    seconds: float
    candidate_ms: float  # median ms per call over all rounds
    reference_ms: float


def interleaved_ratio(candidate: tuple[Predictor, Feeds], reference: tuple[Predictor, Feeds], options: TimingOptions) -> Ratio:
    """The candidate's speed-up over the reference, timed in alternating rounds until its 95% interval is within rel_ci
    of it or ratio_seconds have passed (at least 3 rounds): a busy machine slows both alike."""
    for predictor, feeds in (candidate, reference):
        warm_up(predictor, feeds, options)
    logs: list[float] = []
    cand_all: list[np.ndarray] = []
    ref_all: list[np.ndarray] = []
    started = time.perf_counter()
    low = high = math.nan
    while True:
        pair = [candidate, reference] if len(logs) % 2 == 0 else [reference, candidate]
        got = {}
        for predictor, feeds in pair:
            got[id(predictor)] = time_predict(predictor, feeds, 0, options.round_calls, start_at=len(logs) * options.round_calls)
        c, r = got[id(candidate[0])], got[id(reference[0])]
        cand_all.append(c)
        ref_all.append(r)
        logs.append(math.log(float(np.median(r)) / float(np.median(c))))
        n = len(logs)
        mean = float(np.mean(logs))
        if n >= 3:
            half = _t95(n - 1) * float(np.std(logs, ddof=1)) / math.sqrt(n)
            low, high = math.exp(mean - half), math.exp(mean + half)
            if math.exp(half) - 1.0 <= options.rel_ci or time.perf_counter() - started > options.ratio_seconds or n >= 200:
                break
    return Ratio(
        math.exp(mean),
        low,
        high,
        len(logs),
        time.perf_counter() - started,
        float(np.median(np.concatenate(cand_all)) * 1000.0),
        float(np.median(np.concatenate(ref_all)) * 1000.0),
    )
